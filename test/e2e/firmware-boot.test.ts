/**
 * Firmware boot (the path real desktop images take) through libvirt: the domain XML starts under
 * SeaBIOS and OVMF, and both report on the serial log. The test guest's disks have no
 * bootloader, so the firmware's own "nothing to boot" lines are the markers here.
 */
import { existsSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage } from '../../src/qcow2/create.js';
import { bootGuest } from '../../src/virt/boot.js';
import { ensureFixture, type Fixture } from '../../src/virt/fixture.js';
import { tempDir } from '../helpers/qemu.js';
import { qlayerDomains } from './guest-helpers.js';

let fixture: Fixture;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-fw-'));
});
afterAll(async () => {
  await cleanup?.();
});

describe('firmware boot', () => {
  it('BIOS: SeaBIOS starts and tries the disk (serial via useserial)', async () => {
    const disk = `${dir}/bios.qcow2`;
    await createImage({ path: disk, backing: { path: fixture.images['base-gpt'].path, format: 'qcow2' } });
    const guest = await bootGuest({ name: `e2e-bios-${process.pid}`, disk, firmware: 'bios', accel: 'tcg', until: 'Booting from Hard Disk', timeoutMs: 60_000, serialLog: `${dir}/bios.log` });
    try {
      expect(guest.serial).toContain('SeaBIOS');
    } finally {
      await guest.destroy();
    }
    expect(await qlayerDomains()).not.toContain(`qlayer-e2e-bios-${process.pid}`);
  });

  it.runIf(existsSync('/usr/share/OVMF'))('EFI (q35): OVMF starts and reports its boot options', async () => {
    const disk = `${dir}/efi.qcow2`;
    await createImage({ path: disk, backing: { path: fixture.images['base-gpt'].path, format: 'qcow2' } });
    const guest = await bootGuest({ name: `e2e-efi-${process.pid}`, disk, firmware: 'efi', machine: 'q35', memoryMiB: 256, accel: 'tcg', until: 'BdsDxe', timeoutMs: 90_000, serialLog: `${dir}/efi.log` });
    await guest.destroy();
    expect(await qlayerDomains()).not.toContain(`qlayer-e2e-efi-${process.pid}`);
  });
});
