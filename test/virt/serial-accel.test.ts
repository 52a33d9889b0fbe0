/**
 * The serial protocol parser and watcher (a real file appended to while it is watched), and
 * accel resolution on this host.
 */
import { appendFile, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { kvmStatus, resolveAccel } from '../../src/virt/accel.js';
import { VirtError } from '../../src/virt/errors.js';
import { SerialLog, findLine, parseSerialEvents, parseSha256Events, tail } from '../../src/virt/serial.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qlayer-serial-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const log = [
  '[    0.013110] ACPI: something',
  'QLAYER: initramfs\r',
  'QLAYER: booted 6.1.0-56-cloud-amd64\r',
  '[    1.2] kernel line QLAYER: wrote 0123 /a b\r', // interleaved with a kernel message
  `QLAYER: sha256 ${'a'.repeat(64)} /opt/app/tool.bin\r`,
  'QLAYER: missing /nope\r',
  'QLAYER: agent started\r',
  'QLAYER: ready\r',
  '',
].join('\n');

describe('serial protocol', () => {
  it('parses events, including ones after other text on the line', () => {
    const events = parseSerialEvents(log);
    expect(events.map((e) => e.event)).toEqual(['initramfs', 'booted', 'wrote', 'sha256', 'missing', 'agent', 'ready']);
    expect(events[1]?.args).toEqual(['6.1.0-56-cloud-amd64']);
    expect(events[2]?.line).toBe('QLAYER: wrote 0123 /a b');
    const hashes = parseSha256Events(log);
    expect(hashes.get('/opt/app/tool.bin')).toBe('a'.repeat(64));
    expect(hashes.get('/nope')).toBeNull();
    expect(hashes.size).toBe(2);
  });

  it('finds lines by substring and regex, and tails', () => {
    expect(findLine(log, 'QLAYER: booted')).toBe('QLAYER: booted 6.1.0-56-cloud-amd64');
    expect(findLine(log, /sha256 [0-9a-f]{64}/g)).toBe(`QLAYER: sha256 ${'a'.repeat(64)} /opt/app/tool.bin`);
    expect(findLine(log, 'QLAYER: poweroff')).toBeUndefined();
    expect(tail(log, 2)).toBe('QLAYER: agent started\nQLAYER: ready');
  });

  it('waits for a marker that a writer appends later, and times out with the caller error', async () => {
    const path = join(dir, 'grow.log');
    const serial = new SerialLog(path);
    expect(serial.text()).toBe(''); // not created yet
    const waiting = serial.waitFor('QLAYER: ready', { timeoutMs: 5000, onTimeout: () => new Error('timeout') });
    await writeFile(path, 'QLAYER: booted x\n');
    setTimeout(() => void appendFile(path, 'QLAYER: rea'), 100);
    setTimeout(() => void appendFile(path, 'dy\n'), 200);
    expect(await waiting).toBe('QLAYER: ready');
    expect(serial.text()).toBe('QLAYER: booted x\nQLAYER: ready\n');

    const started = Date.now();
    await expect(serial.waitFor('never', { timeoutMs: 300, onTimeout: () => new Error('timed out') })).rejects.toThrow('timed out');
    expect(Date.now() - started).toBeGreaterThanOrEqual(300);
  });

  it('lets a check abort the wait', async () => {
    const serial = new SerialLog(join(dir, 'none.log'));
    await expect(
      serial.waitFor('x', {
        timeoutMs: 5000,
        checkEveryMs: 10,
        check: async () => {
          throw new VirtError('virt.guest-stopped', 'stopped');
        },
        onTimeout: () => new Error('timeout'),
      }),
    ).rejects.toMatchObject({ code: 'virt.guest-stopped' });
  });

  it('starts over when the file is truncated (a new run)', async () => {
    const path = join(dir, 'trunc.log');
    await writeFile(path, 'QLAYER: booted old-run-with-long-text\n');
    const serial = new SerialLog(path);
    expect(serial.text()).toContain('old-run');
    await writeFile(path, 'QLAYER: x\n');
    expect(serial.text()).toBe('QLAYER: x\n');
  });
});

describe('accel', () => {
  it('maps tcg to qemu, refuses unknown values, and probes only for auto', async () => {
    expect((await resolveAccel('tcg')).type).toBe('qemu');
    await expect(resolveAccel('fast' as 'tcg')).rejects.toMatchObject({ code: 'virt.invalid-spec' });
    const status = kvmStatus();
    let probes = 0;
    const probe = async (): Promise<{ works: boolean; detail: string }> => {
      probes += 1;
      return { works: false, detail: 'probe says no' };
    };
    const auto = await resolveAccel('auto', { probe, probeKey: `test-${Math.random()}` });
    if (!status.present || !status.accessible || status.pvm) {
      expect(auto.type).toBe('qemu');
      expect(probes).toBe(0); // known-unusable KVM is not even probed
    } else {
      expect(auto).toEqual({ type: 'qemu', reason: 'TCG: KVM probe failed (probe says no)' });
      expect(probes).toBe(1);
    }
    if (status.present && status.accessible) expect((await resolveAccel('kvm')).type).toBe('kvm');
    else await expect(resolveAccel('kvm')).rejects.toMatchObject({ code: 'virt.kvm-absent' });
  });
});
