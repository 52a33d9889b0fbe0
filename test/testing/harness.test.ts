/**
 * qlayer/testing against the tiny test guest under TCG: two VMs at once, commands and their
 * errors, the console, files, snapshot/restore, apps composed in, bad input. Boots are shared
 * (two VMs serve most tests) to keep this file near a minute on a 2-core machine.
 */
import { mkdirSync, mkdtempSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { boot, testGuest, TestingError, type TestGuest, type Vm } from '../../src/testing/index.js';
import { sha256File } from './helpers/image.js';

let guest: TestGuest;
let imageHash: string;
let a: Vm;
let b: Vm;

beforeAll(async () => {
  guest = await testGuest();
  imageHash = await sha256File(guest.image);
  [a, b] = await Promise.all([boot({ ...guest, memoryMiB: 256 }), boot({ ...guest, memoryMiB: 256 })]);
}, 600_000);

afterAll(async () => {
  await Promise.all([a?.close(), b?.close()]);
  // Every VM of this file ran on its own overlay: the image is byte for byte what it was.
  if (guest) expect(await sha256File(guest.image)).toBe(imageHash);
});

const codeOf = async (promise: Promise<unknown>): Promise<{ code: string; message: string }> => {
  try {
    await promise;
  } catch (error) {
    return { code: (error as TestingError).code, message: (error as Error).message };
  }
  throw new Error('expected a rejection');
};

describe('two VMs at once', () => {
  it('have their own names, folders and disks', async () => {
    expect(a.name).not.toBe(b.name);
    expect(a.name).toMatch(/^qlayer-test-[0-9a-f]{12}$/);
    expect(a.overlay).not.toBe(b.overlay);
    const [ra, rb] = await Promise.all([a.exec('uname -r'), b.exec('uname -r')]);
    expect(ra).toEqual({ exitCode: 0, stdout: `${guest.kernelRelease}\n`, stderr: '' });
    expect(rb.stdout).toBe(ra.stdout);
    await Promise.all([a.writeFile('/root/who', 'a'), b.writeFile('/root/who', 'b')]);
    expect(await a.readFile('/root/who')).toBe('a');
    expect(await b.readFile('/root/who')).toBe('b');
  });
});

describe('commands', () => {
  it('succeed returns stdout; a failing command throws with its exit code, stdout and stderr', async () => {
    expect(await a.succeed('echo hello')).toBe('hello\n');
    const failure = await codeOf(a.succeed('echo some output; echo some error >&2; exit 3'));
    expect(failure.code).toBe('testing.command-failed');
    expect(failure.message).toBe(
      `${a.name}: command failed with exit code 3: echo some output; echo some error >&2; exit 3\n--- stdout ---\nsome output\n--- stderr ---\nsome error`,
    );
    expect(await a.exec('exit 4')).toMatchObject({ exitCode: 4 });
  });

  it('a command that hangs fails after its timeout, and is killed', async () => {
    const started = Date.now();
    const failure = await codeOf(a.exec('sleep 300; echo never', { timeoutSec: 2 }));
    expect(failure.code).toBe('testing.command-timeout');
    expect(failure.message).toMatch(/"sleep 300; echo never" was still running after 2 s, so it was killed; if it is meant to run that long, pass \{ timeoutSec \}/);
    expect(Date.now() - started).toBeLessThan(30_000);
    expect((await a.exec('pgrep -x "sleep" || true')).stdout.trim()).toBe('');
  });

  it('waitUntilSucceeds retries until the command passes, and says what the last try printed otherwise', async () => {
    await a.succeed('rm -f /tmp/later; (sleep 2; touch /tmp/later) >/dev/null 2>&1 </dev/null &');
    await a.waitUntilSucceeds('test -e /tmp/later', { timeoutSec: 60 });
    const failure = await codeOf(a.waitUntilSucceeds('echo not yet; exit 1', { timeoutSec: 2 }));
    expect(failure.code).toBe('testing.wait-timeout');
    expect(failure.message).toMatch(/did not succeed within 2 s; last attempt:\n.*exit code 1.*\n--- stdout ---\nnot yet/);
  });

  it('files: text and bytes both ways', async () => {
    await b.writeFile('/tmp/x', 'data');
    expect(await b.readFile('/tmp/x')).toBe('data');
    const bytes = Buffer.from([0, 1, 2, 255, 254, 10]);
    await b.writeFile('/tmp/bin', bytes, { mode: 0o600 });
    expect(await b.readFile('/tmp/bin', 'buffer')).toEqual(bytes);
    expect(await b.succeed('stat -c %a /tmp/bin')).toBe('600\n');
  });
});

describe('the console', () => {
  it('waitForConsole sees the boot and later output; serialLog has all of it', async () => {
    expect(await b.waitForConsole(guest.readyMarker, { timeoutSec: 5 })).toContain('QLAYER: ready');
    const from = b.serialLog().length;
    await b.succeed('echo console-line-42 > /dev/ttyS0');
    expect(await b.waitForConsole(/console-line-\d+/, { timeoutSec: 30, after: from })).toBe('console-line-42');
    expect(b.serialLog()).toContain('QLAYER: booted');
    const failure = await codeOf(b.waitForConsole('never printed', { timeoutSec: 1 }));
    expect(failure.code).toBe('testing.console-timeout');
    expect(failure.message).toMatch(/did not show "never printed" within 1 s\nlast console lines:\n[\s\S]*console-line-42/);
  });
});

describe('snapshot and restore', () => {
  it('restore brings back the disk and a running guest; the console keeps what came before', async () => {
    await b.writeFile('/root/state', 'before');
    await b.succeed('sync');
    const snap = await b.snapshot();
    await b.writeFile('/root/state', 'after');
    await b.writeFile('/root/new', 'only after');
    await b.succeed('sync');
    await b.restore(snap);
    expect(await b.readFile('/root/state')).toBe('before');
    expect((await b.exec('test -e /root/new')).exitCode).toBe(1);
    expect(b.serialLog()).toContain('console-line-42'); // from before the restore
    // A snapshot can be restored again after more changes.
    await b.writeFile('/root/state', 'again');
    await b.restore(snap);
    expect(await b.readFile('/root/state')).toBe('before');
    const foreign = await codeOf(a.restore(snap));
    expect(foreign.code).toBe('testing.snapshot-foreign');
  });

  it("'disk' snapshots boot again on the saved disk", async () => {
    await using vm = await boot({ ...guest, memoryMiB: 256, snapshots: 'disk' });
    await vm.writeFile('/root/state', 'saved');
    const snap = await vm.snapshot();
    await vm.writeFile('/root/state', 'changed');
    await vm.restore(snap);
    expect(await vm.readFile('/root/state')).toBe('saved');
    expect(vm.serialLog().match(/QLAYER: booted/g)).toHaveLength(2);
  });
});

describe('apps', () => {
  it('are in the guest filesystem at the first boot, from the apps layer', async () => {
    const src = mkdtempSync(join(tmpdir(), 'qlayer-testing-app-'));
    try {
      const app = join(src, 'Hello App');
      mkdirSync(join(app, 'share'), { recursive: true });
      writeFileSync(join(app, 'hello.sh'), '#!/bin/sh\necho "hello from $(basename "$(dirname "$0")")"\n', { mode: 0o755 });
      writeFileSync(join(app, 'share', 'data.txt'), 'x'.repeat(100_000));
      await using vm = await boot({ ...guest, memoryMiB: 256, apps: [app] });
      expect(await vm.succeed('/opt/hello-app/hello.sh')).toBe('hello from hello-app\n');
      expect(await vm.succeed('wc -c < /opt/hello-app/share/data.txt')).toBe('100000\n');
      // qlayer's layering, not a copy through the agent: the VM's disk is user <- apps <- base.
      expect(vm.history().some((c) => /^apps: built app hello-app/.test(c.command))).toBe(true);
    } finally {
      rmSync(src, { recursive: true, force: true });
    }
  });
});

describe('bad input', () => {
  it('an image that does not exist', async () => {
    const failure = await codeOf(boot({ image: '/nonexistent/disk.qcow2' }));
    expect(failure).toEqual({ code: 'testing.image-missing', message: 'boot: the image /nonexistent/disk.qcow2 does not exist' });
  });

  it('options that make no sense name the option', async () => {
    expect(await codeOf(boot({ ...guest, memoryMiB: 0 }))).toMatchObject({ code: 'testing.bad-option', message: 'boot: memoryMiB must be a positive integer, not 0' });
    expect((await codeOf(boot({ ...guest, boot: { mode: 'kernel', kernel: '/no/kernel' } }))).message).toBe('boot: boot.kernel /no/kernel does not exist');
    expect((await codeOf(boot({ ...guest, apps: ['/no/app'] }))).code).toBe('testing.app-missing');
  });

  it('a guest without an agent: said after the timeout, with the console', async () => {
    const started = Date.now();
    const failure = await codeOf(boot({ ...guest, boot: { ...guest.boot, cmdline: `${guest.boot.cmdline} rdinit=/bin/sh` }, memoryMiB: 256, timeoutSec: 20 }));
    expect(failure.code).toBe('testing.no-agent');
    expect(failure.message).toMatch(/no guest agent answered within 20 s\. The image must run qemu-guest-agent/);
    expect(failure.message).toMatch(/last console lines:\n/);
    expect(Date.now() - started).toBeLessThan(60_000);
  });

  it('close() twice is harmless; a closed VM says so', async () => {
    const vm = await boot({ ...guest, memoryMiB: 256 });
    const dir = vm.dir;
    await vm.close();
    await vm.close();
    expect(existsSync(dir)).toBe(false);
    expect(await codeOf(vm.exec('true'))).toMatchObject({ code: 'testing.closed' });
    expect(vm.serialLog()).toContain('QLAYER: ready'); // kept for diagnostics
  });
});
