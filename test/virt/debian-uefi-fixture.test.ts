/**
 * vm-fixtures/build-debian.sh --firmware uefi, checked offline with tools we did not write:
 * sgdisk reads the partition table, mtools the EFI system partition, file(1) the loader, debugfs
 * the root filesystem, qemu-img the image. Then a throwaway bootGuest with firmware efi reaches
 * OVMF's boot manager starting the disk's loader, and keeps its NVRAM file beside its serial log
 * (not in /var/lib/libvirt/qemu/nvram, where libvirt leaves a transient domain's file behind).
 * The whole boot, through grub and systemd to the agent, is test/e2e/debian-uefi.test.ts.
 */
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bootGuest } from '../../src/virt/boot.js';
import { ensureDebianFixture, fixtureCacheDir, loadDebianFixture, type DebianFixture } from '../../src/virt/fixture.js';
import { VirtError } from '../../src/virt/errors.js';
import { qemuCheck, qemuImg } from '../helpers/qemu.js';

let fixture: DebianFixture;
let dir: string;
let raw: string;

interface Partition {
  number: number;
  type: string;
  offset: number;
  size: number;
  filesystem?: { type: string; uuid: string; label: string };
  bootFile?: string;
}

beforeAll(async () => {
  fixture = await ensureDebianFixture({ firmware: 'uefi' });
  dir = await mkdtemp(join(tmpdir(), 'qlayer-uefi-fixture-'));
  raw = join(dir, 'disk.raw');
  await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', fixture.image.path, raw]);
}, 900_000);
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const partitions = (): Partition[] => (fixture.manifest as { image: { partitions: Partition[] } }).image.partitions;

describe('the UEFI Debian guest (build-debian.sh --firmware uefi)', () => {
  it('is its own cache entry (debian-uefi-KEY) with a grub-efi manifest', () => {
    expect(fixture.firmware).toBe('uefi');
    expect(fixture.dir).toMatch(/\/debian-uefi-[0-9a-f]{16}$/);
    expect((fixture.manifest as { boot: { firmware: string; bootloader: string } }).boot).toMatchObject({ firmware: 'uefi', bootloader: expect.stringMatching(/^grub-efi-amd64-bin /) });
    expect(loadDebianFixture(fixtureCacheDir(), 'uefi').key).toBe(fixture.key);
  });

  it('sgdisk: partition 1 is an EFI system partition, partition 2 the root, where the manifest says', async () => {
    const [esp, root] = partitions();
    for (const [number, part, code] of [[1, esp!, 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B'], [2, root!, '0FC63DAF-8483-4772-8E79-3D69D8477DE4']] as const) {
      const info = (await execa('sgdisk', ['-i', String(number), raw])).stdout;
      expect(info).toContain(`Partition GUID code: ${code}`);
      expect(info).toContain(`First sector: ${part.offset / 512} `);
      expect(Number(/Partition size: (\d+) sectors/.exec(info)?.[1]) * 512).toBe(part.size);
    }
    expect(root!.offset).toBe(fixture.image.filesystemOffset);
    expect(fixture.image.rootDevice).toBe('/dev/vda2');
  });

  it('mtools: the ESP is FAT32 (volume 51A7-E0F1) holding EFI/BOOT/BOOTX64.EFI, an x86-64 EFI application', async () => {
    const esp = partitions()[0]!;
    const image = `${raw}@@${esp.offset}`;
    const env = { ...process.env, MTOOLS_SKIP_CHECK: '1' };
    const info = (await execa('minfo', ['-i', image, '::'], { env })).stdout;
    expect(info).toMatch(/serial number:\s*51A7E0F1/i); // fstab's UUID=51A7-E0F1
    expect(info).toMatch(/disk type="FAT32/);
    expect(esp.filesystem).toEqual({ type: 'vfat', uuid: '51A7-E0F1', label: 'EFI' });
    const loader = join(dir, 'BOOTX64.EFI');
    await execa('mcopy', ['-i', image, '::/EFI/BOOT/BOOTX64.EFI', loader], { env });
    expect((await execa('file', ['-b', loader])).stdout).toMatch(/PE32\+ executable \(EFI application\) x86-64/);
    // grub's embedded early config finds the root by its filesystem UUID.
    expect(readFileSync(loader).includes(Buffer.from(`search.fs_uuid ${fixture.image.filesystemUuid} root`))).toBe(true);
  });

  it('debugfs: the root holds grub.cfg, the x86_64-efi modules and an fstab that mounts the ESP; qemu-img check is clean', async () => {
    const root = join(dir, 'root.ext4');
    const fs = (fixture.manifest as { image: { filesystem: { offset: number; size: number } } }).image.filesystem;
    await execa('dd', [`if=${raw}`, `of=${root}`, 'bs=1M', `skip=${fs.offset / 1048576}`, `count=${fs.size / 1048576}`, 'status=none']);
    const cat = async (path: string): Promise<string> => (await execa('debugfs', ['-R', `cat ${path}`, root])).stdout;
    expect(await cat('/boot/grub/grub.cfg')).toContain(`root=UUID=${fixture.image.filesystemUuid} ro console=ttyS0`);
    expect((await execa('debugfs', ['-R', 'stat /boot/grub/x86_64-efi/normal.mod', root])).stdout).toMatch(/Type: regular/);
    expect(await cat('/etc/fstab')).toMatch(/^UUID=51A7-E0F1 \/boot\/efi vfat /m);
    expect((await execa('e2fsck', ['-fn', root], { reject: false })).exitCode).toBe(0);
    expect((await qemuCheck(fixture.image.path)).exitCode).toBe(0);
  });

  it('a missing UEFI guest, or a BIOS build in its place, is refused with how to build it', async () => {
    const cache = join(dir, 'cache');
    await mkdir(cache);
    expect(() => loadDebianFixture(cache, 'uefi')).toThrow(VirtError);
    expect(() => loadDebianFixture(cache, 'uefi')).toThrow(/not built .*build-debian\.sh --firmware uefi/);
    // The UEFI guest's manifest, relabelled as a BIOS build, under the UEFI name.
    const fake = join(cache, 'debian-uefi-0000000000000000');
    await mkdir(fake);
    const manifest = JSON.parse(readFileSync(join(fixture.dir, 'manifest.json'), 'utf8')) as { boot: { firmware: string } };
    manifest.boot.firmware = 'bios';
    await writeFile(join(fake, 'manifest.json'), JSON.stringify(manifest));
    await symlink('debian-uefi-0000000000000000', join(cache, 'debian-uefi-current'));
    expect(() => loadDebianFixture(cache, 'uefi')).toThrow(/is a bios build, not uefi; rebuild with vm-fixtures\/build-debian\.sh --firmware uefi/);
  });

  it('bootGuest with firmware efi: OVMF starts the disk loader, the NVRAM file is beside the serial log', async () => {
    const top = join(dir, 'top.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', fixture.image.path, top]);
    const serialLog = join(dir, 'efi-boot.serial.log');
    const guest = await bootGuest({ disk: top, firmware: 'efi', accel: 'tcg', memoryMiB: 512, serialLog, until: /BdsDxe: starting Boot\d+/, timeoutMs: 240_000 });
    try {
      expect(existsSync(join(dir, 'efi-boot.nvram.fd'))).toBe(true);
      expect(existsSync(`/var/lib/libvirt/qemu/nvram/${guest.name}_VARS.fd`)).toBe(false);
    } finally {
      await guest.destroy();
    }
    expect(readFileSync(serialLog, 'latin1')).toMatch(/BdsDxe: (loading|starting) Boot\d+ "UEFI Misc Device"/);
  }, 300_000);
});
