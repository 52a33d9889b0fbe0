/**
 * The guest agent API against a real qemu-ga in the test guest (one boot for all of it), and the
 * last-resort stop: fsfreeze + destroy leaves ext4 clean (no journal to replay), checked offline.
 */
import { createHash, randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { stopDomain, type RunningGuest } from '../../src/virt/boot.js';
import { VirtError } from '../../src/virt/errors.js';
import { ensureFixture, type Fixture } from '../../src/virt/fixture.js';
import { LibvirtConnection } from '../../src/virt/libvirt.js';
import { GuestAgent } from '../../src/virt/agent.js';
import { tempDir } from '../helpers/qemu.js';
import { bootFixtureOverlay, debugfsCat, fsckClean, qlayerDomains, rawExport, superblock } from './guest-helpers.js';

let fixture: Fixture;
let dir: string;
let cleanup: () => Promise<void>;
let guest: RunningGuest;
let overlay: string;

beforeAll(async () => {
  fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-agent-'));
  ({ guest, overlay } = await bootFixtureOverlay(fixture, dir, `e2e-agent-${process.pid}`));
});

afterAll(async () => {
  await guest?.destroy();
  await cleanup?.();
});

const sha = (data: Buffer | string): string => createHash('sha256').update(data).digest('hex');

describe('GuestAgent', () => {
  it('ping and info', async () => {
    await guest.agent.ping();
    const info = await guest.agent.info();
    expect(info.version).toMatch(/^7\./);
    expect(info.commands.map((c) => c.name)).toEqual(expect.arrayContaining(['guest-exec', 'guest-file-write', 'guest-fsfreeze-freeze', 'guest-shutdown']));
  });

  it('exec: exit codes, stdout/stderr, small and large stdin, signals', async () => {
    const r = await guest.agent.exec('/bin/sh', ['-c', 'echo out; echo err >&2; exit 7']);
    expect(r).toMatchObject({ exitCode: 7, stdout: 'out\n', stderr: 'err\n', truncated: false });

    const small = await guest.agent.exec('/usr/bin/sha256sum', [], { input: 'hello\n' });
    expect(small.stdout.split(' ')[0]).toBe(sha('hello\n'));

    // Over the inline limit: staged as a guest file and redirected, then removed.
    const big = randomBytes(200_000);
    const staged = await guest.agent.exec('/usr/bin/sha256sum', [], { input: big });
    expect(staged.exitCode).toBe(0);
    expect(staged.stdout.split(' ')[0]).toBe(sha(big));
    expect((await guest.agent.exec('/bin/sh', ['-c', 'ls /tmp/.qlayer-input-* 2>/dev/null | wc -l'])).stdout.trim()).toBe('0');

    const killed = await guest.agent.exec('/bin/sh', ['-c', 'kill -9 $$']);
    expect(killed.signal).toBe(9);
    expect(killed.exitCode).toBe(128 + 9);
  });

  it('exec: concurrent calls on one guest all complete with their own output', async () => {
    const results = await Promise.all([1, 2, 3, 4, 5, 6].map((n) => guest.agent.exec('/bin/sh', ['-c', `sleep 0.$n; echo $((${n} * 7))`])));
    expect(results.map((r) => r.stdout.trim())).toEqual(['7', '14', '21', '28', '35', '42']);
  });

  it('exec: a program that does not exist is an agent error; a slow one times out', async () => {
    await expect(guest.agent.exec('/no/such/program')).rejects.toMatchObject({ code: 'virt.agent-error' });
    const started = Date.now();
    await expect(guest.agent.exec('/bin/sleep', ['5'], { timeoutMs: 800 })).rejects.toMatchObject({ code: 'virt.agent-timeout' });
    expect(Date.now() - started).toBeLessThan(4000);
  });

  it('files: write/read round trip (binary, several chunks), mkdir -p, exact-size zero files, chmod/chown, rm', async () => {
    const data = randomBytes(150_001);
    await guest.agent.mkdirP('/srv/a/b/c', 0o750);
    await guest.agent.writeFile('/srv/a/b/c/data.bin', data, { mode: 0o600 });
    expect((await guest.agent.readFile('/srv/a/b/c/data.bin')).equals(data)).toBe(true);
    expect(await guest.agent.sha256('/srv/a/b/c/data.bin')).toBe(sha(data));

    await guest.agent.createZeroFile('/srv/a/zeros', 3 * 1024 * 1024 + 5);
    await guest.agent.chown('/srv/a/zeros', 1000, 1000);
    await guest.agent.chmod('/srv/a/zeros', 0o640);
    const stat = await guest.agent.exec('/bin/stat', ['-c', '%s %a %u:%g %b', '/srv/a/zeros', '/srv/a/b/c', '/srv/a/b/c/data.bin']);
    const [zeros, folder, file] = stat.stdout.trim().split('\n');
    const [size, mode, owner, blocks] = (zeros ?? '').split(' ');
    expect([size, mode, owner]).toEqual([String(3 * 1024 * 1024 + 5), '640', '1000:1000']);
    // Really written (allocated blocks for every byte), not a sparse or fallocated file.
    expect(Number(blocks) * 512).toBeGreaterThanOrEqual(3 * 1024 * 1024 + 5);
    expect(folder?.split(' ')[1]).toBe('750');
    expect(file?.split(' ')[1]).toBe('600');

    await guest.agent.chown('/srv/a/b/c/data.bin', 'qlayer', 'qlayer');
    expect((await guest.agent.exec('/bin/stat', ['-c', '%u:%g', '/srv/a/b/c/data.bin'])).stdout.trim()).toBe('1000:1000');

    await guest.agent.remove('/srv/a/b', { recursive: true });
    expect((await guest.agent.exec('/bin/sh', ['-c', 'test -e /srv/a/b'])).exitCode).toBe(1);
    await expect(guest.agent.readFile('/srv/nothing')).rejects.toMatchObject({ code: 'virt.agent-error' });
    await expect(guest.agent.sha256('/srv/nothing')).rejects.toMatchObject({ code: 'virt.agent-error' });
  });

  it('fsfreeze and thaw', async () => {
    expect(await guest.agent.fsfreezeStatus()).toBe('thawed');
    expect(await guest.agent.fsfreeze()).toBeGreaterThanOrEqual(1);
    expect(await guest.agent.fsfreezeStatus()).toBe('frozen');
    expect(await guest.agent.fsthaw()).toBeGreaterThanOrEqual(1);
    expect(await guest.agent.fsfreezeStatus()).toBe('thawed');
    await guest.agent.writeFile('/root/after-thaw', 'ok\n');
  });

  it('remount read-only: writes then fail; remount read-write again', async () => {
    await guest.agent.remountReadOnly('/');
    const denied = await guest.agent.exec('/bin/sh', ['-c', 'echo x > /root/ro-test']);
    expect(denied.exitCode).not.toBe(0);
    expect(denied.stderr).toMatch(/Read-only file system/);
    await guest.agent.sh('mount -o remount,rw /', { what: 'remount rw' });
    await guest.agent.writeFile('/root/rw-again', 'rw\n');
  });

  it('an agent of a domain that does not exist: virt.agent-unavailable, fast', async () => {
    const ghost = new GuestAgent('qlayer-no-such-domain');
    const started = Date.now();
    await expect(ghost.ping()).rejects.toSatisfy((e: unknown) => e instanceof VirtError && e.code === 'virt.agent-unavailable' && /qlayer-no-such-domain/.test(e.message));
    await expect(ghost.waitReady(3000)).rejects.toBeInstanceOf(VirtError);
    expect(Date.now() - started).toBeLessThan(5000);
  });

  it('last resort: data written, then fsfreeze + destroy; ext4 is clean and the data is there', async () => {
    const payload = randomBytes(64 * 1024);
    await guest.agent.writeFile('/root/last-resort.bin', payload);
    // No sync on purpose: the freeze must flush it.
    await guest.agent.fsfreeze();
    const connection = await LibvirtConnection.open();
    try {
      await connection.destroy(guest.name);
      expect(await stopDomain(connection, guest.name)).toMatchObject({ how: 'already-off' });
    } finally {
      await connection.close();
    }
    await guest.destroy();
    expect(await qlayerDomains()).not.toContain(guest.name);
    const raw = await rawExport(overlay, `${dir}/user.raw`);
    expect((await superblock(raw)).needsRecovery).toBe(false);
    expect((await fsckClean(raw)).ok).toBe(true);
    expect((await debugfsCat(raw, '/root/last-resort.bin')).equals(payload)).toBe(true);
    expect((await debugfsCat(raw, '/root/after-thaw')).toString()).toBe('ok\n');
  });
});
