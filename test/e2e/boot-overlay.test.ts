/**
 * Boot the test guest through libvirt (TCG) on an overlay made by qlayer's own engine, write a
 * file through the guest agent, shut down cleanly, and check offline with qemu-img and
 * e2fsprogs that the write landed in the overlay only, the base is unchanged, and ext4 is clean.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage } from '../../src/qcow2/create.js';
import { bootGuest, type RunningGuest } from '../../src/virt/boot.js';
import { ensureFixture, type Fixture } from '../../src/virt/fixture.js';
import { parseSerialEvents } from '../../src/virt/serial.js';
import { qemuCheck, qemuCompare, tempDir } from '../helpers/qemu.js';
import { debugfsCat, fileSha256, fsckClean, qlayerDomains, rawExport, superblock } from './guest-helpers.js';

let fixture: Fixture;
let dir: string;
let cleanup: () => Promise<void>;
let baseSha: string;

beforeAll(async () => {
  fixture = await ensureFixture();
  baseSha = await fileSha256(fixture.images.base.path);
  expect(baseSha).toBe(fixture.images.base.sha256); // the cache was not modified by an earlier run
  ({ dir, cleanup } = await tempDir('qlayer-e2e-boot-'));
});

afterAll(async () => {
  await cleanup?.();
});

describe('boot on an engine-made overlay', () => {
  it('boots, takes an agent write, shuts down cleanly; the write is in the overlay only', async () => {
    const overlay = `${dir}/user.qcow2`;
    await createImage({ path: overlay, backing: { path: fixture.images.base.path, format: 'qcow2' } });
    expect((await qemuCheck(overlay)).exitCode).toBe(0);

    const payload = randomBytes(300_000); // several agent write chunks
    const payloadSha = (await import('node:crypto')).createHash('sha256').update(payload).digest('hex');
    let guest: RunningGuest | undefined;
    try {
      guest = await bootGuest({
        name: `e2e-overlay-${process.pid}`,
        disk: overlay,
        kernel: fixture.kernel,
        initrd: fixture.initrd,
        cmdline: `${fixture.images.base.cmdline} qlayer.sha256=/etc/hostname`,
        accel: 'tcg',
        memoryMiB: 256,
        vcpus: 1,
        until: fixture.readyMarker,
        waitForAgent: true,
        timeoutMs: 60_000,
        serialLog: `${dir}/serial.log`,
      });
      // The serial protocol: booted first, then the requested hash, then the agent, then ready.
      const events = parseSerialEvents(guest.serial).map((e) => e.event);
      expect(events.indexOf('booted')).toBeGreaterThanOrEqual(0);
      expect(events.indexOf('sha256')).toBeGreaterThan(events.indexOf('booted'));
      expect(events.indexOf('ready')).toBeGreaterThan(events.indexOf('sha256'));
      const hostnameHash = parseSerialEvents(guest.serial).find((e) => e.event === 'sha256')?.args;
      expect(hostnameHash?.[1]).toBe('/etc/hostname');
      expect(hostnameHash?.[0]).toBe((await import('node:crypto')).createHash('sha256').update('qlayer-guest\n').digest('hex'));

      await guest.agent.mkdirP('/srv/qlayer', 0o755);
      await guest.agent.writeFile('/srv/qlayer/payload.bin', payload, { mode: 0o640 });
      await guest.agent.createZeroFile('/srv/qlayer/zeros.bin', 1_000_000);
      await guest.agent.sync();
      expect(await guest.agent.sha256('/srv/qlayer/payload.bin')).toBe(payloadSha);
      const stat = await guest.agent.exec('/bin/stat', ['-c', '%a %s', '/srv/qlayer/payload.bin', '/srv/qlayer/zeros.bin']);
      expect(stat.exitCode).toBe(0);
      expect(stat.stdout.trim().split('\n')).toEqual(['640 300000', '644 1000000']);
      expect((await guest.agent.readFile('/srv/qlayer/payload.bin')).equals(payload)).toBe(true);

      const stopped = await guest.shutdown({ timeoutMs: 30_000 });
      expect(stopped.how).toBe('agent'); // it powered itself off; nothing was destroyed
      expect(guest.serial).toContain('QLAYER: poweroff');
    } finally {
      await guest?.destroy();
    }
    expect(await qlayerDomains()).not.toContain(`qlayer-e2e-overlay-${process.pid}`);

    // qemu-img: the overlay is clean, differs from the base; the base file did not change.
    const check = await qemuCheck(overlay);
    expect(check).toMatchObject({ exitCode: 0, corruptions: 0, leaks: 0 });
    expect(await qemuCompare(fixture.images.base.path, overlay, 'qcow2', 'qcow2')).toBe(false);
    expect(await fileSha256(fixture.images.base.path)).toBe(baseSha);

    // ext4 is clean (journal empty) and holds the file, read independently of the guest.
    const raw = await rawExport(overlay, `${dir}/user.raw`);
    const sb = await superblock(raw);
    expect(sb.needsRecovery).toBe(false);
    expect(sb.clean).toBe(true);
    const fsck = await fsckClean(raw);
    expect(fsck.ok, fsck.output).toBe(true);
    expect((await debugfsCat(raw, '/srv/qlayer/payload.bin')).equals(payload)).toBe(true);
    expect((await debugfsCat(raw, '/srv/qlayer/zeros.bin')).equals(Buffer.alloc(1_000_000))).toBe(true);
  });
});
