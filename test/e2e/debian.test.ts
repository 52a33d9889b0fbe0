/**
 * The whole flow on a real distribution guest: the Debian 12 fixture (vm-fixtures/build-debian.sh)
 * boots through its own grub (BIOS, GPT) under TCG, runs systemd, dbus, udev and Debian's
 * qemu-guest-agent. Start, a file written by the ordinary user, assign an app, verify (hashes in
 * the guest), unassign, stop; then e2fsck -fn on a raw export of the root partition and the user
 * file read offline. Then a guest whose guest-shutdown fails (dbus stopped: "Failed to connect to
 * bus") stops in seconds through systemctl poweroff, and says why.
 *
 * Timings go to the test output (console.log) for the README.
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AppManifest } from '../../src/layers/app.js';
import { importBase } from '../../src/layers/bases.js';
import { assignApps } from '../../src/layers/desktop-assign.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop, startDesktop, stopDesktop } from '../../src/layers/desktop-lifecycle.js';
import { unassignApps } from '../../src/layers/desktop-unassign.js';
import { verifyDesktop } from '../../src/layers/desktop-verify.js';
import { guestHelperPath } from '../../src/layers/guest-alloc.js';
import { runGuestScript, shellQuote } from '../../src/layers/guest-script.js';
import { Store } from '../../src/layers/store.js';
import { observeShutdowns, type ShutdownResult } from '../../src/virt/boot.js';
import { desktopDomain, type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { ensureDebianFixture, type DebianFixture } from '../../src/virt/fixture.js';
import { qemuImg, tempDir } from '../helpers/qemu.js';
import { buildTestApp, DEBIAN_SHUTDOWN_TIMEOUT_MS, debianRuntime, debianToolFiles, debugfsCat, fileSha256, rootPartitionRaw, seconds, writeAsUser } from './guest-helpers.js';

let fixture: DebianFixture;
let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let runtime: LibvirtDesktopRuntime;
let app: AppManifest;
const shutdowns: Array<{ domain: string; result: ShutdownResult }> = [];
let unobserve: () => void = () => undefined;
const SHUTDOWN_TIMEOUT_MS = DEBIAN_SHUTDOWN_TIMEOUT_MS;

beforeAll(async () => {
  const built = Date.now();
  fixture = await ensureDebianFixture();
  console.log(`[debian] fixture ${fixture.dir}: ${(fixture.image.allocated / 1048576).toFixed(0)} MiB allocated of ${(fixture.image.virtualSize / 1048576).toFixed(0)} MiB, kernel ${fixture.kernelRelease}, ensured in ${seconds(Date.now() - built)}`);
  ({ dir, cleanup } = await tempDir('qlayer-e2e-debian-'));
  store = await Store.open(join(dir, 'store'));
  await importBase(store, 'debian', fixture.image.path, { format: 'qcow2' });
  runtime = debianRuntime(join(dir, 'logs'));
  app = await buildTestApp(store, join(dir, 'src', 'tools'), {
    name: 'tools',
    files: debianToolFiles({ says: 'tool from the apps layer', padding: 1_500_001, dataBytes: 3 * 1048576 + 12_345, readme: 'a small app for the Debian guest\n' }),
  });
  unobserve = observeShutdowns((domain, result) => shutdowns.push({ domain, result }));
}, 900_000);

afterAll(async () => {
  unobserve();
  for (const name of ['deb', 'nobus']) {
    if ((await store?.readState())?.desktops[name]) await stopDesktop(store, runtime, name).catch(() => undefined);
  }
  await cleanup?.();
});

describe('the Debian 12 guest (grub, systemd, qemu-ga) under TCG', () => {
  it('start, user file, assign, verify, unassign, stop: e2fsck clean and the user file intact', async () => {
    const basePath = store.path((await store.readState()).bases['debian']!.file);
    const baseSha = await fileSha256(basePath);
    await createDesktop(store, 'deb', 'debian');
    let t = Date.now();
    await startDesktop(store, runtime, 'deb');
    const bootMs = Date.now() - t;
    console.log(`[debian] start to agent ready: ${seconds(bootMs)}`);
    const handle = desktopHandle(store, await store.readState(), 'deb');
    const shell = runtime.shell(handle);

    // A file written by the ordinary user, as that user.
    const userText = `written by ${fixture.user.name} ${randomBytes(8).toString('hex')}\n`;
    const { file: userFile, sha256: userSha, owner } = await writeAsUser(shell, fixture.user, userText);
    expect(owner).toBe(`${fixture.user.uid}:${fixture.user.name}`);

    // Assign, with each phase timed from the step lines.
    const phases: Array<{ line: string; at: number }> = [];
    t = Date.now();
    const assigned = await assignApps(store, runtime, 'deb', ['tools@1'], (line) => phases.push({ line, at: Date.now() }));
    const assignMs = Date.now() - t;
    const timeline = phases.map((p, i) => `  +${seconds(p.at - t)} (${seconds((phases[i + 1]?.at ?? t + assignMs) - p.at)}) ${p.line}`);
    console.log(`[debian] assign tools@1 (${app.files.length} files, ${(app.files.reduce((n, f) => n + f.size, 0) / 1048576).toFixed(1)} MiB) in ${seconds(assignMs)}:\n${timeline.join('\n')}`);
    expect(assigned.apps).toEqual(['tools@1']);
    expect(assigned.located).toBe(app.files.length);
    // systemd mounts /run noexec: the helper must still run (from /tmp), fallocating every file.
    if (guestHelperPath() !== null) expect(assigned.allocation).toMatchObject({ method: 'helper', fallocated: app.files.length, zeroFilled: 0 });
    const assignStop = shutdowns.at(-1)!.result;
    console.log(`[debian] assign's shutdown: ${assignStop.how} in ${seconds(assignStop.ms)}`);
    expect(assignStop.how).toBe('agent');

    t = Date.now();
    await startDesktop(store, runtime, 'deb');
    console.log(`[debian] boot on base <- apps <- user, to agent ready: ${seconds(Date.now() - t)}`);
    const ran = await runGuestScript(runtime.shell(desktopHandle(store, await store.readState(), 'deb')), `${app.prefix}/bin/tool\n`, 'run the tool');
    expect(ran).toContain('tool from the apps layer');
    t = Date.now();
    const verified = await verifyDesktop(store, runtime, 'deb', [userFile]);
    console.log(`[debian] verify (hashes in the guest) in ${seconds(Date.now() - t)}`);
    expect(verified.files.length).toBe(app.files.length);
    expect(verified.files.filter((f) => !f.ok)).toEqual([]);
    expect(verified.extra[userFile]).toBe(userSha);

    t = Date.now();
    await unassignApps(store, runtime, 'deb', ['tools'], (line) => console.log(`[debian] unassign: +${seconds(Date.now() - t)} ${line}`));
    console.log(`[debian] unassign in ${seconds(Date.now() - t)}`);
    await startDesktop(store, runtime, 'deb');
    const afterUnassign = await verifyDesktop(store, runtime, 'deb', [userFile, `${app.prefix}/bin/tool`]);
    expect(afterUnassign.files).toEqual([]);
    expect(afterUnassign.extra[userFile]).toBe(userSha);
    expect(afterUnassign.extra[`${app.prefix}/bin/tool`]).toBeNull();

    t = Date.now();
    const before = shutdowns.length;
    await stopDesktop(store, runtime, 'deb');
    const stop = shutdowns.slice(before).at(-1)!.result;
    console.log(`[debian] stop: ${stop.how} in ${seconds(stop.ms)}`);
    expect(stop.how).toBe('agent');
    expect(stop.ms).toBeLessThan(60_000);

    // Offline: the root filesystem is clean, and the user's file is there, as the user wrote it.
    const top = desktopHandle(store, await store.readState(), 'deb').chain[0]!.path;
    const raw = await rootPartitionRaw(fixture, top, join(dir, 'deb-root.raw'));
    const fsck = await execa('e2fsck', ['-fn', raw], { reject: false });
    expect(fsck.exitCode, `${fsck.stdout}\n${fsck.stderr}`).toBe(0);
    expect((await debugfsCat(raw, userFile)).toString()).toBe(userText);
    expect(await fileSha256(basePath)).toBe(baseSha);
  }, 1_800_000);

  it('a 300-file, 100 MiB app: allocation and assign times against the clean shutdown (logged for the README)', async () => {
    const files: Record<string, Buffer> = {};
    let small = 0;
    for (let i = 0; i < 290; i++) {
      const size = 1024 + ((i * 7919) % 31) * 1024;
      files[`share/f${i}.dat`] = randomBytes(size);
      small += size;
    }
    for (let i = 0; i < 10; i++) files[`lib/big${i}.bin`] = randomBytes(Math.floor((100 * 1048576 - small) / 10));
    const wide = await buildTestApp(store, join(dir, 'src', 'wide'), { name: 'wide', files });
    await startDesktop(store, runtime, 'deb');
    const phases: Array<{ line: string; at: number }> = [];
    const t = Date.now();
    const before = shutdowns.length;
    const assigned = await assignApps(store, runtime, 'deb', ['wide@1'], (line) => phases.push({ line, at: Date.now() }));
    const assignMs = Date.now() - t;
    const at = (prefix: string): number => phases.find((p) => p.line.startsWith(prefix))?.at ?? NaN;
    const allocateMs = at('allocated ') - at('allocating ');
    const stop = shutdowns.slice(before).at(-1)!.result;
    console.log(
      `[debian] assign wide@1 (${wide.files.length} files, ${(wide.files.reduce((n, f) => n + f.size, 0) / 1048576).toFixed(1)} MiB): allocation ${seconds(allocateMs)}, ` +
        `assign ${seconds(assignMs)} against its clean shutdown ${seconds(stop.ms)} (assign - shutdown = ${seconds(assignMs - stop.ms)}); ${assigned.allocation.method}: fallocate ${assigned.allocation.fallocated}, zeros ${assigned.allocation.zeroFilled}, ${assigned.allocation.processes} guest processes`,
    );
    expect(assigned.located).toBe(wide.files.length);
    if (guestHelperPath() !== null) expect(assigned.allocation).toMatchObject({ method: 'helper', fallocated: wide.files.length });
    const verified = await verifyDesktop(store, runtime, 'deb');
    expect(verified.files.filter((f) => !f.ok)).toEqual([]);
  }, 900_000);

  it('between boots, as real guests do: fstrim, a user edit, a user delete, a hard power-off before an assign', async () => {
    // wide@1 is assigned and the desktop is stopped (the test before).
    const handleOf = async () => desktopHandle(store, await store.readState(), 'deb');
    const fstrim = async (when: string): Promise<void> => {
      const out = await runGuestScript(runtime.shell(await handleOf()), 'fstrim -v / 2>&1; echo "exit $?"\n', `fstrim ${when}`);
      console.log(`[debian] fstrim ${when}: ${out.trim().replace(/\n/g, ' / ')}`);
      expect(out).toMatch(/exit 0/);
      expect(out).toMatch(/trimmed/);
    };
    const statuses = (files: Array<{ path: string; status: string }>) => Object.fromEntries(files.map((f) => [f.path, f.status]));

    // 1. fstrim with an app assigned: the discards reach the user delta (discard='unmap') as
    //    zero clusters, the oracle being qemu-img map of the stopped chain; the app still verifies.
    await startDesktop(store, runtime, 'deb');
    await fstrim('with wide@1 assigned');
    const afterTrim = await verifyDesktop(store, runtime, 'deb');
    expect(afterTrim.files.filter((f) => !f.ok)).toEqual([]);
    await stopDesktop(store, runtime, 'deb');
    const map = JSON.parse((await qemuImg(['map', '--output=json', (await handleOf()).userPath])).stdout) as Array<{ depth: number; zero: boolean; data: boolean; length: number }>;
    const zeroedInUser = map.filter((m) => m.depth === 0 && m.zero && !m.data).reduce((n, m) => n + m.length, 0);
    console.log(`[debian] after fstrim, zero clusters in the user delta: ${(zeroedInUser / 1048576).toFixed(0)} MiB`);
    expect(zeroedInUser).toBeGreaterThan(0);

    // 2. An assign whose placeholders land on trimmed blocks (zero clusters in the user delta):
    //    the recompose must drop those clusters, or the files would read as zeros.
    await assignApps(store, runtime, 'deb', ['tools@1']);
    await startDesktop(store, runtime, 'deb');
    // 3. fstrim again with both apps assigned: app extents are never free, so nothing of them goes.
    await fstrim('with wide@1 and tools@1 assigned');
    const both = await verifyDesktop(store, runtime, 'deb');
    expect(both.files.length).toBeGreaterThan(app.files.length);
    expect(both.files.filter((f) => !f.ok)).toEqual([]);

    // 4. The user edits one app file and deletes another: verify says so, and calls neither damage.
    const edited = `${app.prefix}/share/tool/README`;
    const deleted = `${app.prefix}/share/tool/data.bin`;
    await runGuestScript(runtime.shell(await handleOf()), `echo "the user's own line" >> ${shellQuote(edited)} && rm ${shellQuote(deleted)} && sync\n`, 'user edits');
    const afterEdits = await verifyDesktop(store, runtime, 'deb');
    const byPath = statuses(afterEdits.files);
    expect(byPath[edited]).toBe('user-changed');
    expect(byPath[deleted]).toBe('user-deleted');
    expect(afterEdits.files.filter((f) => f.status === 'damaged')).toEqual([]);
    expect(afterEdits.files.filter((f) => f.ok).length).toBe(afterEdits.files.length - 2);
    console.log(`[debian] verify after the user's edits: ${afterEdits.files.filter((f) => !f.ok).map((f) => `${f.path} ${f.status} (${f.why})`).join('; ')}`);

    // 5. Powered off hard, then assigned: the filesystem needs recovery offline; the assign says
    //    so, boots the guest (which replays its journal), and everything ends clean.
    const destroyed = await execa('virsh', ['-c', 'qemu:///system', 'destroy', desktopDomain(await handleOf())], { reject: false });
    expect(destroyed.exitCode, destroyed.stderr).toBe(0);
    await buildTestApp(store, join(dir, 'src', 'late'), { name: 'late', files: { 'late.txt': randomBytes(200_000) } });
    const lines: string[] = [];
    await assignApps(store, runtime, 'deb', ['late@1'], (line) => lines.push(line));
    console.log(`[debian] assign after virsh destroy:\n  ${lines.join('\n  ')}`);
    expect(lines.join('\n')).toMatch(/was not shut down cleanly .*replays it as it boots/);
    const last = await verifyDesktop(store, runtime, 'deb');
    expect(statuses(last.files)).toMatchObject({ [edited]: 'user-changed', [deleted]: 'user-deleted' });
    expect(last.files.filter((f) => !f.ok).length).toBe(2);
    const raw = await rootPartitionRaw(fixture, (await handleOf()).userPath, join(dir, 'deb-between.raw'));
    const fsck = await execa('e2fsck', ['-fn', raw], { reject: false });
    expect(fsck.exitCode, `${fsck.stdout}\n${fsck.stderr}`).toBe(0);
    expect((await debugfsCat(raw, edited)).toString()).toMatch(/the user's own line\n$/);
  }, 1_800_000);

  it('a guest whose guest-shutdown fails (no dbus) stops in seconds through systemctl poweroff, and says why', async () => {
    await createDesktop(store, 'nobus', 'debian');
    await startDesktop(store, runtime, 'nobus');
    const handle = desktopHandle(store, await store.readState(), 'nobus');
    // What a systemd guest without dbus looks like: `shutdown` (what guest-shutdown runs) fails.
    const words = await runGuestScript(runtime.shell(handle), 'systemctl stop dbus.socket dbus.service; rm -f /run/dbus/system_bus_socket; shutdown -P +0 2>&1; echo "exit $?"\n', 'stop dbus');
    console.log(`[debian] without dbus, shutdown says: ${words.trim().replace(/\n/g, ' / ')}`);
    expect(words).toMatch(/Failed to connect to bus|Failed to schedule shutdown/);

    const before = shutdowns.length;
    const t = Date.now();
    await stopDesktop(store, runtime, 'nobus');
    const elapsed = Date.now() - t;
    const stop = shutdowns.slice(before).at(-1)!.result;
    console.log(`[debian] stop without dbus: ${stop.how} in ${seconds(stop.ms)} (${seconds(elapsed)} with the domain lookup); steps:\n${stop.steps.map((s) => `  ${s.ok ? 'ok' : 'failed'} ${s.how} (${seconds(s.ms)}): ${s.detail}`).join('\n')}`);
    expect(stop.how).toBe('systemctl');
    expect(stop.steps[0]).toMatchObject({ how: 'agent', ok: false });
    expect(stop.steps[0]!.detail).toMatch(/failed to shutdown/);
    expect(stop.steps[0]!.detail).toMatch(/Failed to connect to bus|Failed to schedule shutdown/);
    expect(stop.steps.at(-1)).toMatchObject({ how: 'systemctl', ok: true });
    expect(stop.warning).toBeUndefined();
    expect(stop.ms).toBeLessThan(SHUTDOWN_TIMEOUT_MS / 3);

    // It went down cleanly: nothing to replay.
    const raw = await rootPartitionRaw(fixture, handle.userPath, join(dir, 'nobus-root.raw'));
    const fsck = await execa('e2fsck', ['-fn', raw], { reject: false });
    expect(fsck.exitCode, `${fsck.stdout}\n${fsck.stderr}`).toBe(0);
  }, 900_000);
  it('(on the desktop above, booted again) a running guest whose agent was stopped: assign refuses at once, naming the agent, and changes nothing; stop goes by ACPI', async () => {
    await buildTestApp(store, join(dir, 'src', 'extra'), { name: 'extra', files: { 'extra.txt': randomBytes(50_000) } });
    await startDesktop(store, runtime, 'nobus');
    const handle = desktopHandle(store, await store.readState(), 'nobus');
    // The agent carries out its own stop after it answers; its reply may be lost on the way.
    await runGuestScript(runtime.shell(handle), 'systemctl --no-block stop qemu-guest-agent.service\n', 'stop the agent').catch(() => undefined);
    let answering = true;
    for (let i = 0; i < 60 && answering; i++) {
      answering = await runtime.shell(handle).exec('/bin/true', []).then(() => true, () => false);
      if (answering) await new Promise((resolve) => setTimeout(resolve, 1000));
    }
    expect(answering).toBe(false);
    const before = JSON.stringify(await store.readState());
    const t = Date.now();
    const error = (await assignApps(store, runtime, 'nobus', ['extra@1']).then(() => null, (e: unknown) => e)) as { code?: string; message?: string } | null;
    console.log(`[debian] assign with the agent stopped, refused in ${seconds(Date.now() - t)}: ${error?.message}`);
    expect(error).toMatchObject({ code: 'guest.agent-unavailable' });
    expect(error!.message).toMatch(/desktop nobus is running, but its guest agent does not answer .*nothing was changed$/s);
    expect(JSON.stringify(await store.readState())).toBe(before);
    expect(await runtime.isRunning(handle)).toBe(true);

    // Stopping such a guest: ACPI (logind) powers it off cleanly.
    const stopsBefore = shutdowns.length;
    await stopDesktop(store, runtime, 'nobus');
    const stop = shutdowns.slice(stopsBefore).at(-1)!.result;
    console.log(`[debian] stop without an agent: ${stop.how} in ${seconds(stop.ms)}; ${stop.steps.map((s) => `${s.ok ? 'ok' : 'failed'} ${s.how}: ${s.detail}`).join(' / ')}`);
    expect(stop.how).toBe('acpi');
    // The agent was not even connected: the stop says so, and goes to ACPI without waiting.
    expect(stop.steps.map((s) => s.detail).join(' / ')).toMatch(/no guest agent/);
    const raw = await rootPartitionRaw(fixture, handle.userPath, join(dir, 'nobus-noagent.raw'));
    const fsck = await execa('e2fsck', ['-fn', raw], { reject: false });
    expect(fsck.exitCode, `${fsck.stdout}\n${fsck.stderr}`).toBe(0);
  }, 900_000);

});
