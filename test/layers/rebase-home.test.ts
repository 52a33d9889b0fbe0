/**
 * The home disk's offline pieces (issue 13), each against a tool we did not write:
 * - createHomeDisk: qemu-img check / info (a qcow2 with no backing file), dumpe2fs and e2fsck
 *   on its raw export (an ext4 labelled qlayer-home, clean);
 * - prepareHomeMount: debugfs reads the base's /etc/fstab back (whole disk and GPT partition),
 *   e2fsck finds the filesystem clean, a second run changes nothing, and an fstab that is a
 *   symlink is refused with the image left as it was;
 * - withHomeDisk: virt-xml-validate accepts the domain XML with the second disk, and the first
 *   disk stays the system chain;
 * - parseHomeSize: sizes and their refusals.
 */
import { createHash } from 'node:crypto';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHomeDisk, FSTAB_LINE, parseHomeSize, prepareHomeMount } from '../../src/layers/home-disk.js';
import { buildDomainXml, diskSources, withHomeDisk } from '../../src/virt/domain-xml.js';
import { ensureFixture, type Fixture } from '../../src/virt/fixture.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';

let dir: string;
let cleanup: () => Promise<void>;
let fixture: Fixture;

const fileHash = async (path: string): Promise<string> => createHash('sha256').update(await readFile(path)).digest('hex');

async function raw(image: string): Promise<string> {
  const out = `${image}.raw`;
  await execa('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, out]);
  return out;
}

beforeAll(async () => {
  fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-home-disk-'));
}, 120_000);

afterAll(async () => {
  await cleanup?.();
});

describe('home disk', () => {
  it('parseHomeSize: binary units, and clear refusals', () => {
    expect(parseHomeSize('20G')).toBe(20 * 1024 ** 3);
    expect(parseHomeSize('512M')).toBe(512 * 1024 ** 2);
    expect(parseHomeSize('1T')).toBe(1024 ** 4);
    expect(parseHomeSize('128MiB')).toBe(128 * 1024 ** 2);
    expect(() => parseHomeSize('lots')).toThrow(expect.objectContaining({ code: 'home.bad-size' }));
    expect(() => parseHomeSize('1M')).toThrow(expect.objectContaining({ code: 'home.too-small' }));
    expect(() => parseHomeSize('17T')).toThrow(expect.objectContaining({ code: 'home.too-large' }));
  });

  it('createHomeDisk: a qcow2 with no backing file holding a clean ext4 labelled qlayer-home', async () => {
    const path = join(dir, 'home.qcow2');
    await createHomeDisk(path, 256 * 1048576);
    expect((await qemuCheck(path)).corruptions).toBe(0);
    const info = JSON.parse((await execa('qemu-img', ['info', '--output=json', path])).stdout) as Record<string, unknown>;
    expect(info['virtual-size']).toBe(256 * 1048576);
    expect(info['backing-filename']).toBeUndefined();
    const image = await raw(path);
    const header = (await execa('dumpe2fs', ['-h', image])).stdout;
    expect(header).toMatch(/^Filesystem volume name:\s+qlayer-home$/m);
    expect(header).toMatch(/^Filesystem state:\s+clean$/m);
    expect(header).toMatch(/^Block size:\s+4096$/m);
    expect((await execa('e2fsck', ['-fn', image], { reject: false })).exitCode).toBe(0);
    // A folder that does not exist: a clear failure, not a half-made disk somewhere else.
    await expect(createHomeDisk(join(dir, 'no-such-folder', 'home.qcow2'), 64 * 1048576)).rejects.toThrow();
  }, 120_000);

  it('prepareHomeMount on a whole-disk ext4 and on a GPT partition: debugfs reads the new fstab back, e2fsck finds it clean, a rerun changes nothing', async () => {
    for (const [name, offset] of [
      ['base', 0],
      ['base-gpt', fixture.images['base-gpt'].filesystemOffset],
    ] as const) {
      const image = join(dir, `${name}.qcow2`);
      await copyFile(fixture.images[name].path, image);
      const prepared = await prepareHomeMount(image);
      expect(prepared).toMatchObject({ changed: true, partition: offset ? 1 : 0, fstab: `${FSTAB_LINE}\n` });
      expect((await qemuCheck(image)).corruptions).toBe(0);
      const exported = await raw(image);
      const device = offset ? `${exported}?offset=${offset}` : exported;
      expect((await execa('debugfs', ['-R', 'cat /etc/fstab', device])).stdout).toBe(FSTAB_LINE);
      const stat = (await execa('debugfs', ['-R', 'stat /etc/fstab', device])).stdout;
      expect(stat).toMatch(/Mode:\s+0644/);
      expect(stat).toMatch(/User:\s+0\s+Group:\s+0/);
      expect((await execa('e2fsck', ['-fn', device], { reject: false })).exitCode).toBe(0);
      const before = await fileHash(image);
      expect(await prepareHomeMount(image)).toMatchObject({ changed: false });
      expect(await fileHash(image)).toBe(before);
    }
  }, 300_000);

  it('prepareHomeMount keeps the lines an fstab had, and refuses an fstab that is a symlink (image unchanged)', async () => {
    const image = join(dir, 'lines.qcow2');
    const work = await raw(fixture.images.base.path).then(async (r) => {
      const lines = join(dir, 'fstab.old');
      await writeFile(lines, 'proc /proc proc defaults 0 0\n');
      await execa('debugfs', ['-w', '-R', `write ${lines} /etc/fstab`, r]);
      await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', r, image]);
      return r;
    });
    await prepareHomeMount(image);
    expect((await execa('debugfs', ['-R', 'cat /etc/fstab', await raw(image)])).stdout).toBe(`proc /proc proc defaults 0 0\n${FSTAB_LINE}`);

    const linked = join(dir, 'linked.qcow2');
    await execa('debugfs', ['-w', '-R', 'rm /etc/fstab', work]);
    await execa('debugfs', ['-w', '-R', 'symlink /etc/fstab /run/fstab', work]);
    await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', work, linked]);
    const before = await fileHash(linked);
    await expect(prepareHomeMount(linked)).rejects.toMatchObject({ code: 'home.fstab-not-file' });
    expect(await fileHash(linked)).toBe(before);
  }, 300_000);
});

describe('the home disk in the domain XML', () => {
  const spec = {
    name: 'qlayer-test-home',
    type: 'qemu' as const,
    memoryMiB: 256,
    vcpus: 1,
    boot: { kind: 'kernel' as const, kernel: '/boot/vmlinuz' },
    disks: [
      { path: '/store/desktops/d/user.qcow2', format: 'qcow2' as const, backingChain: [{ path: '/store/bases/b.qcow2', format: 'qcow2' as const }] },
      { path: '/store/desktops/d/home.qcow2', format: 'qcow2' as const, backingChain: [] },
    ],
  };

  it('a new definition: two virtio disks, the chain first; virt-xml-validate accepts it', async () => {
    const xml = buildDomainXml(spec);
    expect(diskSources(xml)).toEqual(['/store/desktops/d/user.qcow2', '/store/desktops/d/home.qcow2']);
    const file = join(dir, 'two-disks.xml');
    await writeFile(file, xml);
    expect((await execa('virt-xml-validate', [file, 'domain'], { reject: false })).exitCode).toBe(0);
  });

  it('withHomeDisk adds it after the first disk on a free name, once; the system chain stays first', async () => {
    const one = buildDomainXml({ ...spec, disks: [spec.disks[0]!, { path: '/other/data.qcow2', format: 'qcow2', target: 'vdb' }] });
    const withHome = withHomeDisk(one, '/store/desktops/d/home.qcow2');
    expect(diskSources(withHome)).toEqual(['/store/desktops/d/user.qcow2', '/store/desktops/d/home.qcow2', '/other/data.qcow2']);
    expect(withHome).toMatch(/<source file='\/store\/desktops\/d\/home.qcow2'>[\s\S]*?<target dev='vdc' bus='virtio'\/>/);
    expect(withHomeDisk(withHome, '/store/desktops/d/home.qcow2')).toBe(withHome);
    const file = join(dir, 'with-home.xml');
    await writeFile(file, withHome);
    expect((await execa('virt-xml-validate', [file, 'domain'], { reject: false })).exitCode).toBe(0);
    expect(() => withHomeDisk(one, 'relative/home.qcow2')).toThrow(/absolute/);
  });
});
