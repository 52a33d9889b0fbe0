/**
 * vm-fixtures/build.sh: the cache works (a second run only checks the key), the manifest
 * describes the files truthfully, the images are what the README promises (checked with
 * qemu-img, e2fsprogs, sgdisk and the initramfs listing), and a forced rebuild in another cache
 * gives byte-identical disk images and kernel (reproducible), and an initramfs with the same files.
 */
import { mkdtemp, readFile, rm, symlink } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureFixture, fixtureCacheDir, repoRoot, type Fixture } from '../../src/virt/fixture.js';
import { qemuCheck, qemuImg } from '../helpers/qemu.js';
import { fileSha256, superblock } from '../e2e/guest-helpers.js';

let fixture: Fixture;
let dir: string;

beforeAll(async () => {
  fixture = await ensureFixture();
  dir = await mkdtemp(join(tmpdir(), 'qlayer-fixture-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('vm-fixtures/build.sh', () => {
  it('a second run with the same inputs only checks the key', async () => {
    const started = Date.now();
    const result = await execa('bash', [join(repoRoot(), 'vm-fixtures/build.sh'), '--print-dir']);
    expect(result.stderr).toContain('up to date');
    expect(result.stdout.trim()).toBe(fixture.dir);
    expect(Date.now() - started).toBeLessThan(20_000); // ~2 s on an idle machine
  });

  it('the manifest tells the truth about every file', async () => {
    const manifest = JSON.parse(await readFile(join(fixture.dir, 'manifest.json'), 'utf8')) as {
      kernel: { path: string; sha256: string; size: number; release: string };
      initrd: { path: string; sha256: string };
      images: Record<string, { path: string; sha256: string; virtualSize: number }>;
      packages: Array<{ name: string; version: string }>;
    };
    for (const entry of [manifest.kernel, manifest.initrd, ...Object.values(manifest.images)]) {
      expect(await fileSha256(join(fixture.dir, entry.path)), entry.path).toBe(entry.sha256);
    }
    for (const [name, image] of Object.entries(manifest.images)) {
      const info = JSON.parse((await qemuImg(['info', '--output=json', join(fixture.dir, image.path)])).stdout) as { format: string; 'virtual-size': number };
      expect(info.format, name).toBe('qcow2');
      expect(info['virtual-size'], name).toBe(image.virtualSize);
      expect((await qemuCheck(join(fixture.dir, image.path))).exitCode, name).toBe(0);
    }
    expect(manifest.packages.map((p) => p.name)).toEqual(expect.arrayContaining(['busybox-static', 'qemu-guest-agent', 'libc6', 'libglib2.0-0']));
    expect(manifest.packages.find((p) => p.name.startsWith('linux-image-'))?.name).toBe(`linux-image-${manifest.kernel.release}`);
  });

  it('base.qcow2: clean ext4 with 4 KiB blocks at offset 0, holding init, shutdown, busybox and qemu-ga', async () => {
    const raw = join(dir, 'base.raw');
    await qemuImg(['convert', '-O', 'raw', fixture.images.base.path, raw]);
    const sb = await superblock(raw);
    expect(sb.clean).toBe(true);
    expect(sb.needsRecovery).toBe(false);
    expect(sb.text).toMatch(/^Block size:\s+4096$/m);
    expect(sb.text).toMatch(/^Filesystem UUID:\s+5f1c0a7e-91d2-4b6e-8f3a-0c1d2e3f4a5b$/m);
    expect((await execa('e2fsck', ['-fn', raw], { reject: false })).exitCode).toBe(0);
    const ls = await execa('debugfs', ['-R', 'ls -l /sbin', raw]);
    expect(ls.stdout).toMatch(/\binit\b/);
    expect(ls.stdout).toMatch(/\bshutdown\b/);
    const ga = await execa('debugfs', ['-R', 'stat /usr/sbin/qemu-ga', raw]);
    expect(ga.stdout).toMatch(/Type: regular/);
    const loader = await execa('debugfs', ['-R', 'stat /lib64/ld-linux-x86-64.so.2', raw]);
    expect(loader.stdout).toMatch(/Type: regular/);
  });

  it('base-gpt.qcow2: partition 1 at 1 MiB holds the same filesystem', async () => {
    const raw = join(dir, 'gpt.raw');
    await qemuImg(['convert', '-O', 'raw', fixture.images['base-gpt'].path, raw]);
    const info = await execa('sgdisk', ['-i', '1', raw]);
    expect(info.stdout).toMatch(/First sector: 2048 /);
    expect(info.stdout).toMatch(/Partition name: 'qlayer-root'/);
    const part = join(dir, 'part.raw');
    await execa('dd', [`if=${raw}`, `of=${part}`, 'bs=1M', 'skip=1', 'count=256', 'status=none']);
    const base = join(dir, 'base.raw');
    // The filesystem bytes equal base.qcow2's disk.
    expect(await fileSha256(part)).toBe(await fileSha256(base));
  });

  it('the initramfs holds busybox, the init and the virtio modules', async () => {
    const listing = await execa('sh', ['-c', `zcat '${fixture.initrd}' | busybox cpio -t 2>/dev/null`]);
    const names = listing.stdout.split('\n');
    for (const m of ['virtio_ring', 'virtio', 'virtio_pci_legacy_dev', 'virtio_pci_modern_dev', 'virtio_pci', 'virtio_blk', 'virtio_console']) {
      expect(names).toContain(`lib/modules/${m}.ko`);
    }
    expect(names).toEqual(expect.arrayContaining(['init', 'bin/busybox', 'dev/console']));
  });

  it('a forced rebuild in another cache is byte-identical (reproducible)', async () => {
    const other = join(dir, 'cache');
    await execa('mkdir', ['-p', other]);
    await symlink(join(fixtureCacheDir(), 'debs'), join(other, 'debs')); // no second download
    const result = await execa('bash', [join(repoRoot(), 'vm-fixtures/build.sh'), '--force', '--print-dir'], { env: { QLAYER_FIXTURES_CACHE: other } });
    const rebuilt = result.stdout.trim();
    expect(rebuilt.endsWith(fixture.key)).toBe(true);
    for (const file of ['base.qcow2', 'base-gpt.qcow2', 'vmlinux', 'vmlinuz']) {
      expect(await fileSha256(join(rebuilt, file)), file).toBe(await fileSha256(join(fixture.dir, file)));
    }
    // busybox cpio records the staging files' inode numbers, so the initramfs bytes differ;
    // its members and their contents do not.
    const members = async (initrd: string): Promise<string> =>
      (await execa('sh', ['-c', `d=$(mktemp -d) && cd "$d" && zcat '${initrd}' | busybox cpio -i -d 2>/dev/null && find . -type f | LC_ALL=C sort | xargs sha256sum; rm -rf "$d"`])).stdout;
    expect(await members(join(rebuilt, 'initramfs.img'))).toBe(await members(fixture.initrd));
  });
});
