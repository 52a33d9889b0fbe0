/**
 * The CLI (`qlayer vm boot/check`, `qlayer host check`) driven in-process against the real
 * libvirtd; the GPT variant of the test guest; and boot timing (start to marker, several runs),
 * printed so the report can quote it.
 */
import { createHash } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { main } from '../../src/cli/main.js';
import { setStdoutWriter } from '../../src/cli/output.js';
import { createImage } from '../../src/qcow2/create.js';
import { bootGuest } from '../../src/virt/boot.js';
import { ensureFixture, type Fixture } from '../../src/virt/fixture.js';
import { parseSha256Events } from '../../src/virt/serial.js';
import { tempDir } from '../helpers/qemu.js';
import { fileSha256, qlayerDomains } from './guest-helpers.js';

let fixture: Fixture;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-cli-'));
});

afterAll(async () => {
  await cleanup?.();
});

/** Run the CLI in-process; capture stdout/stderr and the exit code. */
async function cli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  let stdout = '';
  let stderr = '';
  // Results go through writeStdout (straight to descriptor 1 unless told otherwise), streams
  // through process.stdout: keep both.
  setStdoutWriter((text) => {
    stdout += text;
  });
  const out = vi.spyOn(process.stdout, 'write').mockImplementation((chunk: string | Uint8Array) => {
    stdout += String(chunk);
    return true;
  });
  const err = vi.spyOn(process.stderr, 'write').mockImplementation((chunk: string | Uint8Array) => {
    stderr += String(chunk);
    return true;
  });
  const before = process.exitCode;
  process.exitCode = undefined;
  try {
    const code = await main(['node', 'qlayer', ...args]);
    return { code, stdout, stderr };
  } finally {
    process.exitCode = before;
    setStdoutWriter();
    out.mockRestore();
    err.mockRestore();
  }
}

async function overlayOn(base: string, name: string): Promise<string> {
  const path = `${dir}/${name}.qcow2`;
  await createImage({ path, backing: { path: base, format: 'qcow2' } });
  return path;
}

const sha = (text: string): string => createHash('sha256').update(text).digest('hex');

describe('qlayer vm / host CLI', () => {
  it('host check --json: every item named; libvirt reachable; ok overall here', async () => {
    const { code, stdout } = await cli(['host', 'check', '--json', '--image', fixture.images.base.path]);
    const report = JSON.parse(stdout) as { ok: boolean; checks: Array<{ name: string; ok: boolean; detail: string }> };
    expect(code).toBe(0);
    expect(report.ok).toBe(true);
    const names = report.checks.map((c) => c.name);
    expect(names).toEqual(expect.arrayContaining(['qemu-system-x86_64', 'qemu-img', 'virsh', 'libvirtd', 'libvirt connection', 'kvm', `image ${fixture.images.base.path}`]));
  });

  it('host check against a bogus socket: exit 1, names the unreachable libvirt', async () => {
    const { code, stdout } = await cli(['host', 'check', '--json', '--uri', `qemu:///system?socket=${dir}/nope.sock`]);
    expect(code).toBe(1);
    const report = JSON.parse(stdout) as { ok: boolean; checks: Array<{ name: string; ok: boolean; detail: string }> };
    const connection = report.checks.find((c) => c.name === 'libvirt connection');
    expect(connection?.ok).toBe(false);
    expect(connection?.detail).toContain('nope.sock');
  });

  it('vm boot --json: exit 0 at the boot marker, guest stopped, no domain left', async () => {
    const overlay = await overlayOn(fixture.images.base.path, 'boot');
    const { code, stdout } = await cli(['vm', 'boot', overlay, '--accel', 'tcg', '--name', `cli-boot-${process.pid}`, '--json']);
    expect(code).toBe(0);
    const result = JSON.parse(stdout) as { matched: string; poweredOff: boolean; domainType: string; stop: string; ms: number };
    expect(result.matched).toMatch(/^QLAYER: booted /);
    expect(result.poweredOff).toBe(false);
    expect(result.domainType).toBe('qemu');
    expect(['agent', 'destroyed']).toContain(result.stop);
    expect(await qlayerDomains()).not.toContain(`qlayer-cli-boot-${process.pid}`);
  });

  it('vm boot: exit 0 when the guest powers off before the marker', async () => {
    const overlay = await overlayOn(fixture.images.base.path, 'poweroff');
    const { code, stdout } = await cli(['vm', 'boot', overlay, '--accel', 'tcg', '--cmdline', `${fixture.cmdline} qlayer.then=poweroff`, '--until', 'QLAYER: never', '--json']);
    expect(code).toBe(0);
    expect(JSON.parse(stdout)).toMatchObject({ matched: null, poweredOff: true });
  });

  it('vm boot: non-zero on timeout, with the serial log so far', async () => {
    const overlay = await overlayOn(fixture.images.base.path, 'timeout');
    const { code, stderr } = await cli(['vm', 'boot', overlay, '--accel', 'tcg', '--until', 'QLAYER: never', '--timeout', '12', '--name', `cli-timeout-${process.pid}`]);
    expect(code).not.toBe(0);
    expect(stderr).toContain('no "QLAYER: never" on the serial console within');
    expect(stderr).toContain('QLAYER: booted');
    expect(await qlayerDomains()).not.toContain(`qlayer-cli-timeout-${process.pid}`);
  });

  it('vm boot --keep leaves it running; vm list shows it with its owner; vm stop stops and removes it', async () => {
    const overlay = await overlayOn(fixture.images.base.path, 'keep');
    const name = `qlayer-cli-keep-${process.pid}`;
    const boot = await cli(['vm', 'boot', overlay, '--accel', 'tcg', '--name', name, '--until', fixture.readyMarker, '--keep', '--json']);
    expect(boot.code).toBe(0);
    expect(JSON.parse(boot.stdout)).toMatchObject({ name, stop: 'left running' });
    try {
      const list = JSON.parse((await cli(['vm', 'list', '--json'])).stdout) as Array<{ name: string; state: string; owner?: { pid: number } }>;
      expect(list.find((d) => d.name === name)).toMatchObject({ state: 'running', owner: { pid: process.pid } });
      // Its owner (this process) is alive: cleanup leaves it alone.
      expect((JSON.parse((await cli(['vm', 'cleanup', '--json'])).stdout) as { removed: string[] }).removed).not.toContain(name);
      const stop = await cli(['vm', 'stop', name, '--json']);
      expect(stop.code).toBe(0);
      expect(JSON.parse(stop.stdout)).toMatchObject({ name, how: 'agent' });
    } finally {
      await cli(['vm', 'stop', name, '--timeout', '5']);
    }
    expect(await qlayerDomains()).not.toContain(name);
  });

  it('vm check: the sha256 of each file as the guest reads it (serial and agent), exit 1 for a missing one', async () => {
    const overlay = await overlayOn(fixture.images.base.path, 'check');
    const serial = await cli(['vm', 'check', overlay, '--accel', 'tcg', '--file', '/etc/hostname', '/etc/passwd', '--json']);
    expect(serial.code).toBe(0);
    const files = (JSON.parse(serial.stdout) as { files: Record<string, string | null> }).files;
    expect(files['/etc/hostname']).toBe(sha('qlayer-guest\n'));
    expect(files['/etc/passwd']).toBe(sha('root:x:0:0:root:/root:/bin/sh\nqlayer:x:1000:1000:qlayer:/home/qlayer:/bin/sh\n'));

    const agent = await cli(['vm', 'check', overlay, '--accel', 'tcg', '--via', 'agent', '--file', '/etc/hostname', '/missing', '--json']);
    expect(agent.code).toBe(1);
    expect((JSON.parse(agent.stdout) as { files: Record<string, string | null> }).files).toEqual({ '/etc/hostname': sha('qlayer-guest\n'), '/missing': null });
  });
});

describe('the GPT variant of the test guest', () => {
  it('boots from partition 1 (found without root=) on an engine overlay', async () => {
    const overlay = await overlayOn(fixture.images['base-gpt'].path, 'gpt');
    const guest = await bootGuest({
      name: `e2e-gpt-${process.pid}`,
      disk: overlay,
      kernel: fixture.kernel,
      initrd: fixture.initrd,
      cmdline: `${fixture.cmdline} qlayer.sha256=/etc/hostname qlayer.then=poweroff`,
      accel: 'tcg',
      until: 'QLAYER: poweroff',
      serialLog: `${dir}/gpt.log`,
      persistent: true, // define + start: stopping must also undefine it
    });
    try {
      expect(await guest.waitForShutoff(15_000)).toBe(true);
      expect(await guest.state()).toBe('shutoff'); // defined domains stay known while off
      expect(parseSha256Events(guest.serial).get('/etc/hostname')).toBe(sha('qlayer-guest\n'));
    } finally {
      await guest.destroy();
    }
    expect(await qlayerDomains()).not.toContain(`qlayer-e2e-gpt-${process.pid}`);
    expect(await fileSha256(fixture.images['base-gpt'].path)).toBe(fixture.images['base-gpt'].sha256);
  });
});

describe('boot timing (TCG)', () => {
  it('measures start -> "booted" and start -> "ready" over several runs, PVH vmlinux and bzImage', async () => {
    const runs = 3;
    const rows: Array<{ kernel: string; run: number; bootedMs: number; readyMs: number; agentMs: number }> = [];
    for (const [label, kernel] of [
      ['vmlinux (PVH)', fixture.kernel],
      ['bzImage', fixture.bzImage],
    ] as const) {
      for (let run = 1; run <= runs; run++) {
        const overlay = await overlayOn(fixture.images.base.path, `timing-${label.split(' ')[0]}-${run}`);
        const started = Date.now();
        const guest = await bootGuest({
          name: `e2e-timing-${process.pid}-${run}`,
          disk: overlay,
          kernel,
          initrd: fixture.initrd,
          cmdline: fixture.cmdline,
          accel: 'tcg',
          until: fixture.bootMarker,
          serialLog: `${dir}/timing.log`,
        });
        try {
          const bootedMs = Date.now() - started;
          await guest.waitFor(fixture.readyMarker, 30_000);
          const readyMs = Date.now() - started;
          await guest.agent.waitReady(30_000);
          rows.push({ kernel: label, run, bootedMs, readyMs, agentMs: Date.now() - started });
        } finally {
          await guest.destroy();
        }
      }
    }
    const summary = rows.map((r) => `${r.kernel.padEnd(14)} run ${r.run}: booted ${r.bootedMs} ms, ready ${r.readyMs} ms, agent answers ${r.agentMs} ms`).join('\n');
    console.log(`boot timing under TCG (libvirt create -> serial marker):\n${summary}`);
    for (const r of rows) expect(r.bootedMs).toBeLessThan(30_000);
  });
});
