/**
 * Every way a boot can fail gives a typed error with a clear message within its timeout, and
 * leaves no domain behind: checked against the real libvirtd after each case.
 */
import { writeFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execa } from 'execa';
import { createImage } from '../../src/qcow2/create.js';
import { kvmStatus } from '../../src/virt/accel.js';
import { bootGuest, type BootOptions } from '../../src/virt/boot.js';
import { buildDomainXml } from '../../src/virt/domain-xml.js';
import { VirtError } from '../../src/virt/errors.js';
import { ensureFixture, type Fixture } from '../../src/virt/fixture.js';
import { LibvirtConnection } from '../../src/virt/libvirt.js';
import { fixtureKvmProbe } from '../../src/virt/kvm-probe.js';
import { tempDir } from '../helpers/qemu.js';
import { qlayerDomains } from './guest-helpers.js';

let fixture: Fixture;
let dir: string;
let cleanup: () => Promise<void>;
let overlay: string;

beforeAll(async () => {
  fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-fail-'));
  overlay = `${dir}/user.qcow2`;
  await createImage({ path: overlay, backing: { path: fixture.images.base.path, format: 'qcow2' } });
});

afterAll(async () => {
  await cleanup?.();
});

function options(name: string, extra: Partial<BootOptions> = {}): BootOptions {
  return {
    name: `${name}-${process.pid}`,
    disk: overlay,
    kernel: fixture.kernel,
    initrd: fixture.initrd,
    cmdline: fixture.images.base.cmdline,
    accel: 'tcg',
    timeoutMs: 30_000,
    until: fixture.bootMarker,
    serialLog: `${dir}/${name}.log`,
    ...extra,
  };
}

/** Run a boot that must fail; return the error and how long it took, and check nothing is left. */
async function failing(opts: BootOptions): Promise<{ error: VirtError; ms: number }> {
  const started = Date.now();
  let caught: unknown;
  try {
    const guest = await bootGuest(opts);
    await guest.destroy();
  } catch (error) {
    caught = error;
  }
  const ms = Date.now() - started;
  expect(caught, 'the boot should have failed').toBeInstanceOf(VirtError);
  expect(await qlayerDomains(), 'no domain left behind').not.toContain(`qlayer-${opts.name}`);
  return { error: caught as VirtError, ms };
}

describe('boot failures', () => {
  it('a missing kernel: virt.kernel-missing naming the file, before libvirt is asked', async () => {
    const { error, ms } = await failing(options('nokernel', { kernel: `${dir}/no-such-vmlinuz` }));
    expect(error.code).toBe('virt.kernel-missing');
    expect(error.message).toContain(`${dir}/no-such-vmlinuz`);
    expect(ms).toBeLessThan(2000);
  });

  it('an image that is not qcow2: libvirt cannot open it, virt.image-unreadable', async () => {
    const garbage = `${dir}/garbage.qcow2`;
    await writeFile(garbage, Buffer.alloc(1024 * 1024, 0x5a));
    const { error, ms } = await failing(options('garbage', { disk: garbage }));
    expect(error.code).toBe('virt.image-unreadable');
    expect(error.message).toContain(garbage);
    expect(ms).toBeLessThan(15_000);
  });

  it('an overlay whose backing file is gone: virt.image-unreadable naming it', async () => {
    const orphan = `${dir}/orphan.qcow2`;
    const gone = `${dir}/gone-base.qcow2`;
    await execa('cp', [fixture.images.base.path, gone]);
    await createImage({ path: orphan, backing: { path: gone, format: 'qcow2' } });
    await execa('rm', [gone]);
    const { error } = await failing(options('orphan', { disk: orphan }));
    expect(error.code).toBe('virt.image-unreadable');
    expect(error.message).toContain('gone-base.qcow2');
  });

  it('a disk image that does not exist: virt.image-unreadable at once', async () => {
    const { error, ms } = await failing(options('nodisk', { disk: `${dir}/nothing.qcow2` }));
    expect(error.code).toBe('virt.image-unreadable');
    expect(ms).toBeLessThan(2000);
  });

  it('a guest that never prints the marker: virt.boot-timeout after the timeout, with the serial tail', async () => {
    // 15 s: the guest must reach "ready" well inside the window even on a loaded CI machine
    // (it takes 3-4 s here), so that the serial tail can show it.
    const { error, ms } = await failing(options('nomarker', { until: 'QLAYER: never-printed', timeoutMs: 15_000 }));
    expect(error.code).toBe('virt.boot-timeout');
    expect(error.message).toContain('QLAYER: ready'); // the serial tail shows how far it got
    expect(ms).toBeGreaterThanOrEqual(15_000);
    expect(ms).toBeLessThan(15_000 + 10_000);
  });

  it('a guest that powers off before the marker: virt.guest-stopped, without waiting for the timeout', async () => {
    const { error, ms } = await failing(
      options('stops', { until: 'QLAYER: never-printed', timeoutMs: 60_000, cmdline: `${fixture.images.base.cmdline} qlayer.then=poweroff` }),
    );
    expect(error.code).toBe('virt.guest-stopped');
    expect(error.message).toContain('QLAYER: poweroff');
    expect(ms).toBeLessThan(20_000);
  });

  it('a guest whose root device is missing reports it on the serial console and stops', async () => {
    const { error } = await failing(options('noroot', { until: fixture.bootMarker, cmdline: `${fixture.cmdline} root=/dev/vdz` }));
    expect(error.code).toBe('virt.guest-stopped');
    expect(error.message).toContain('QLAYER: error initramfs: no root device /dev/vdz');
  });

  it('libvirtd not reachable (bogus socket): virt.libvirt-unreachable at once', async () => {
    const { error, ms } = await failing(options('nolibvirt', { uri: `qemu:///system?socket=${dir}/no-libvirt-sock` }));
    expect(error.code).toBe('virt.libvirt-unreachable');
    expect(error.message).toContain('no-libvirt-sock');
    expect(error.message).toMatch(/libvirtd running/);
    expect(ms).toBeLessThan(5000);
  });

  it.runIf(kvmStatus().present && kvmStatus().pvm)('a KVM that does not run guests (kvm_pvm here): virt.kvm-not-working suggesting tcg', async () => {
    const { error, ms } = await failing(options('kvm', { accel: 'kvm', kvmProgressMs: 6000 }));
    expect(error.code).toBe('virt.kvm-not-working');
    expect(error.message).toContain("accel: 'tcg'");
    expect(ms).toBeLessThan(6000 + 5000);
  });

  it.runIf(kvmStatus().present && kvmStatus().accessible)('the KVM probe boots the test guest under KVM, bounded, and leaves nothing behind', async () => {
    const started = Date.now();
    const result = await fixtureKvmProbe('qemu:///system', 6000)();
    expect(Date.now() - started).toBeLessThan(6000 + 5000);
    if (kvmStatus().pvm) expect(result.works, result.detail).toBe(false);
    expect((await qlayerDomains()).filter((n) => n.startsWith('qlayer-kvm-probe-'))).toEqual([]);
  });

  it('accel auto picks TCG on a host whose KVM cannot run guests', async () => {
    const guest = await bootGuest(options('auto', { accel: 'auto', until: fixture.bootMarker }));
    try {
      if (kvmStatus().pvm || !kvmStatus().present) expect(guest.domainType).toBe('qemu');
    } finally {
      await guest.destroy();
    }
    expect(await qlayerDomains()).not.toContain(`qlayer-auto-${process.pid}`);
  });

  it('a name taken by a live domain is refused; a stale one (owner process gone) is cleaned up', async () => {
    const connection = await LibvirtConnection.open();
    try {
      // A qlayer domain "left behind" by a process that no longer exists.
      // A pid that existed and has exited: its domain is the leftover of a dead run.
      const deadProcess = execa('true');
      const deadPid = deadProcess.pid;
      await deadProcess;
      const xml = buildDomainXml({
        name: `qlayer-stale-${process.pid}`,
        type: 'qemu',
        memoryMiB: 64,
        vcpus: 1,
        boot: { kind: 'kernel', kernel: fixture.kernel, initrd: fixture.initrd, cmdline: `${fixture.cmdline} qlayer.probe` },
        disks: [],
        owner: { pid: deadPid ?? 999_999, host: (await import('node:os')).hostname(), started: new Date().toISOString() },
      });
      await connection.defineAndStart(xml, `qlayer-stale-${process.pid}`);
      expect(await qlayerDomains()).toContain(`qlayer-stale-${process.pid}`);
      const removed = await connection.cleanupStale();
      expect(removed).toContain(`qlayer-stale-${process.pid}`);
      expect(await qlayerDomains()).not.toContain(`qlayer-stale-${process.pid}`);

      // A live one (ours) of the same name as a new boot: refused, and left alone.
      const live = await bootGuest(options('taken', { until: fixture.bootMarker }));
      try {
        const second = await bootGuest(options('taken')).then(
          () => undefined,
          (error: unknown) => error,
        );
        expect(second).toBeInstanceOf(VirtError);
        expect((second as VirtError).code).toBe('virt.domain-exists');
        expect(await live.state()).toBe('running');
      } finally {
        await live.destroy();
      }
    } finally {
      await connection.close();
    }
  });
});
