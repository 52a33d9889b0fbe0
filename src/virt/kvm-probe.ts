import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import type { KvmProbe } from './accel.js';
import { buildDomainXml } from './domain-xml.js';
import { messageOf } from './errors.js';
import { loadFixture } from './fixture.js';
import { DOMAIN_PREFIX, LibvirtConnection } from './libvirt.js';
import { SerialLog } from './serial.js';

/**
 * A KVM probe for accel 'auto': boot the test guest's kernel and initramfs (no disk) under KVM
 * with `qlayer.probe`, which prints `QLAYER: initramfs` and powers off. On a working KVM host
 * that takes well under a second; a KVM that cannot run guests either fails to start or prints
 * nothing. Bounded by `timeoutMs`; the probe domain is always removed. Without a built fixture
 * there is nothing to boot, and the probe reports KVM as working (the boot's own progress
 * timeout still catches a broken one).
 */
export function fixtureKvmProbe(uri: string, timeoutMs = 8000): KvmProbe {
  return async () => {
    let fixture;
    try {
      fixture = loadFixture();
    } catch {
      return { works: true, detail: 'not probed (no test guest built)' };
    }
    const name = `${DOMAIN_PREFIX}kvm-probe-${randomBytes(3).toString('hex')}`;
    const dir = mkdtempSync(join(tmpdir(), 'qlayer-kvm-probe-'));
    const serialLog = join(dir, 'serial.log');
    const xml = buildDomainXml({
      name,
      type: 'kvm',
      memoryMiB: 128,
      vcpus: 1,
      boot: { kind: 'kernel', kernel: fixture.kernel, initrd: fixture.initrd, cmdline: `${fixture.cmdline} qlayer.probe` },
      disks: [],
      serialLog,
      guestAgent: false,
      owner: { pid: process.pid, host: hostname(), started: new Date().toISOString() },
    });
    const connection = await LibvirtConnection.open(uri);
    const started = Date.now();
    try {
      await connection.createTransient(xml, name);
      const log = new SerialLog(serialLog);
      await log.waitFor('QLAYER: initramfs', { timeoutMs, onTimeout: () => new Error(`no output in ${timeoutMs} ms`) });
      return { works: true, detail: `a guest reached its initramfs in ${Date.now() - started} ms` };
    } catch (error) {
      return { works: false, detail: messageOf(error).split('\n')[0] ?? 'failed' };
    } finally {
      await connection.remove(name).catch(() => undefined);
      await connection.close();
      rmSync(dir, { recursive: true, force: true });
    }
  };
}
