/**
 * Assign and unassign at the next boot (TCG, the tiny test guest), through the CLI and then
 * without qlayer at all: libvirt's QEMU hook applies the change when `virsh start` starts the
 * domain. Proofs come from virsh, the guest (sha256sum through the agent), the kernel (the files
 * QEMU holds open), qemu-img, and the store as `desktop show --json` reports it.
 *
 * Needs qlayer's hook installed where libvirtd sees it (scripts/setup-host.sh does that before
 * libvirtd starts); beforeAll points the hook at this checkout.
 */
import { createHash } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readFile, readlink, readdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { importBase } from '../../src/layers/bases.js';
import { createDesktop } from '../../src/layers/desktop-lifecycle.js';
import { Store } from '../../src/layers/store.js';
import { GuestAgent } from '../../src/virt/agent.js';
import { testGuestRuntime } from '../../src/virt/desktop-runtime.js';
import { ensureFixture } from '../../src/virt/fixture.js';
import { installHook } from '../../src/virt/hook.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';
import { buildTestApp } from './guest-helpers.js';

const URI = 'qemu:///system';
const REPO = resolve(import.meta.dirname, '../..');
let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let configFile: string;
let domain: string;
let desktopDir: string;
/** The app's files: guest path -> sha256 of the bytes it must read. */
const appFiles = new Map<string, { sha: string; size: number }>();

const virsh = async (...args: string[]): Promise<string> => (await execa('virsh', ['-c', URI, ...args])).stdout;
const qlayer = (...args: string[]) => execa('node', [join(REPO, 'bin/qlayer.js'), ...args, '--config', configFile, '--json'], { reject: false, cwd: REPO });
const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

interface ShowJson {
  apps: string[];
  appsGeneration: number;
  state: string;
  pendingAtNextBoot: null | { kind: string; apps: string[]; lastAttempt: null | { by: string; code: string; reason: string } };
}
async function show(): Promise<ShowJson> {
  const result = await qlayer('desktop', 'show', 'nb');
  expect(result.exitCode, result.stderr).toBe(0);
  return JSON.parse(result.stdout) as ShowJson;
}

async function waitState(wanted: RegExp, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const state = await virsh('domstate', domain);
    if (wanted.test(state)) return;
    if (Date.now() > deadline) throw new Error(`domain ${domain} stayed ${state.trim()}, not ${wanted}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

/** virsh start, then wait for the guest agent: no qlayer involved. */
async function virshStart(): Promise<GuestAgent> {
  await virsh('start', domain);
  const agent = new GuestAgent(domain, { uri: URI });
  await agent.waitReady(180_000);
  return agent;
}

/** The user's own shutdown: libvirt asks the guest agent, the guest syncs and powers off. */
async function virshShutdown(): Promise<void> {
  const asked = await execa('virsh', ['-c', URI, 'shutdown', domain], { reject: false });
  if (asked.exitCode !== 0) {
    // Say why the guest is gone: its console has the kernel's last words.
    const serial = await readFile(join(dir, 'logs', 'nb.serial.log'), 'utf8').catch(() => '(no serial log)');
    throw new Error(`virsh shutdown failed: ${asked.stderr}\n--- serial log (tail) ---\n${serial.split('\n').slice(-40).join('\n')}`);
  }
  await waitState(/shut off/, 120_000);
}

/** sha256 of each path as the guest reads it (null: missing). */
async function guestHashes(agent: GuestAgent, paths: string[]): Promise<Map<string, string | null>> {
  const script = paths.map((p) => `sha256sum '${p}' 2>/dev/null || echo "missing  ${p}"`).join('\n');
  const out = (await agent.exec('/bin/sh', ['-c', script])).stdout;
  const hashes = new Map<string, string | null>();
  for (const line of out.split('\n')) {
    const match = /^([0-9a-f]{64}|missing)\s+(.*)$/.exec(line.trim());
    if (match) hashes.set(match[2]!, match[1] === 'missing' ? null : match[1]!);
  }
  return hashes;
}

/** The images QEMU holds open, as the kernel says (/proc/PID/fd of the domain's QEMU). */
async function qemuOpenImages(): Promise<string[]> {
  const pid = Number((await readFile(`/run/libvirt/qemu/${domain}.pid`, 'utf8')).trim());
  const targets: string[] = [];
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    if (target.endsWith('.qcow2')) targets.push(target);
  }
  return targets.sort();
}

beforeAll(async () => {
  const fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-next-boot-'));
  // The hook runs this checkout's CLI (the dist build: npm run build before this test).
  expect(existsSync(join(REPO, 'dist/src/cli/main.js')), 'run npm run build first').toBe(true);
  const hook = await installHook({ node: process.execPath, bin: join(REPO, 'bin/qlayer.js') });
  expect(hook.path).toBe('/etc/libvirt/hooks/qemu');

  store = await Store.open(join(dir, 'store'));
  configFile = join(dir, 'qlayer.yaml');
  await writeFile(configFile, [`store: ${store.root}`, 'guest:', '  accel: tcg', '  memoryMiB: 256', 'timeouts:', '  boot: 180', '  agent: 120', '  shutdown: 60', ''].join('\n'));
  const manifest = await buildTestApp(store, join(dir, 'app-src'), {
    name: 'notes',
    files: { 'bin/hello': '#!/bin/sh\necho hello from the next boot\n', 'data.bin': Buffer.alloc(300_001, 9) },
  });
  for (const f of manifest.files) appFiles.set(f.path, { sha: f.sha256, size: f.size });
  await importBase(store, 'guest', fixture.images.base.path, { format: 'qcow2' });
  await createDesktop(store, 'nb', 'guest', { runtime: testGuestRuntime({ logDir: join(dir, 'logs') }) });
  domain = `qlayer-${store.id}-nb`;
  desktopDir = store.path('desktops', 'nb');
}, 300_000);

afterAll(async () => {
  if (domain) {
    await execa('virsh', ['-c', URI, 'destroy', domain], { reject: false });
    await execa('virsh', ['-c', URI, 'undefine', domain], { reject: false });
  }
  await cleanup?.();
});

describe('assign --at-next-boot, then virsh shutdown and virsh start (no qlayer)', () => {
  it('the domain names the stable apps.qcow2 link and records its store for the hook', async () => {
    const xml = await virsh('dumpxml', '--inactive', domain);
    expect(xml).toContain(`file='${join(desktopDir, 'apps.qcow2')}'`);
    expect(xml).not.toMatch(/apps\.\d+\.qcow2/);
    expect(xml).toMatch(new RegExp(`<qlayer:desktop xmlns:qlayer="https://qlayer.invalid/xmlns/desktop/1" store="${store.root}" store-id="${store.id}" name="nb"/>`));
    expect(await readlink(join(desktopDir, 'apps.qcow2'))).toBe('apps.0.qcow2');
  });

  it('a plain assign on a desktop started with virsh start is refused, naming --at-next-boot', async () => {
    await virshStart();
    const refused = await qlayer('desktop', 'assign', 'nb', 'notes');
    expect(refused.exitCode).not.toBe(0);
    expect(refused.stderr).toMatch(/started outside qlayer/);
    expect(refused.stderr).toMatch(/--at-next-boot/);
    expect(await virsh('domstate', domain)).toMatch(/running/); // nothing was shut down
    expect((await show()).apps).toEqual([]);
  }, 300_000);

  it('the guest keeps running with the placeholders; the shutdown and start it sees apply the app', async () => {
    const assigned = await qlayer('desktop', 'assign', 'nb', 'notes', '--at-next-boot');
    expect(assigned.exitCode, assigned.stderr).toBe(0);
    expect(JSON.parse(assigned.stdout)).toMatchObject({ desktop: 'nb', kind: 'assign', apps: ['notes@1'] });
    expect(await virsh('domstate', domain)).toMatch(/running/);
    const pending = await show();
    expect(pending.pendingAtNextBoot).toMatchObject({ kind: 'assign', apps: ['notes@1'], lastAttempt: null });
    expect(pending.apps).toEqual([]);

    await virshShutdown();
    const agent = await virshStart(); // libvirt runs qlayer's hook at prepare; it recomposes
    const hashes = await guestHashes(agent, [...appFiles.keys()]);
    for (const [path, expected] of appFiles) expect(hashes.get(path), path).toBe(expected.sha);
    const hello = await agent.exec('/bin/sh', [[...appFiles.keys()].find((p) => p.endsWith('/bin/hello'))!]);
    expect(hello.stdout).toBe('hello from the next boot\n');

    const after = await show();
    expect(after.pendingAtNextBoot).toBeNull();
    expect(after.apps).toEqual(['notes@1']);
    expect(after.appsGeneration).toBe(1);
    // The link moved, the old generation is gone, and QEMU opened the new one through the link.
    expect(await readlink(join(desktopDir, 'apps.qcow2'))).toBe('apps.1.qcow2');
    expect(existsSync(join(desktopDir, 'apps.0.qcow2'))).toBe(false);
    expect(await qemuOpenImages()).toContain(join(desktopDir, 'apps.1.qcow2'));
  }, 600_000);

  it('unassign --at-next-boot deletes the files now and drops the layer at the next start', async () => {
    const unassigned = await qlayer('desktop', 'unassign', 'nb', 'notes', '--at-next-boot');
    expect(unassigned.exitCode, unassigned.stderr).toBe(0);
    expect((await show()).pendingAtNextBoot).toMatchObject({ kind: 'unassign', apps: ['notes@1'] });
    await virshShutdown();
    const agent = await virshStart();
    const hashes = await guestHashes(agent, [...appFiles.keys()]);
    for (const path of appFiles.keys()) expect(hashes.get(path), path).toBeNull();
    const after = await show();
    expect(after.pendingAtNextBoot).toBeNull();
    expect(after.apps).toEqual([]);
    expect(after.appsGeneration).toBe(2);
    expect(await readlink(join(desktopDir, 'apps.qcow2'))).toBe('apps.2.qcow2');
  }, 600_000);
});

describe('assign --at-next-boot, then virsh destroy (no clean shutdown) and virsh start', () => {
  it('the desktop starts unchanged, the assignment stays pending with its reason, and lands after a clean shutdown', async () => {
    const assigned = await qlayer('desktop', 'assign', 'nb', 'notes', '--at-next-boot');
    expect(assigned.exitCode, assigned.stderr).toBe(0);
    await virsh('destroy', domain); // power pulled: the guest's ext4 journal still needs recovery
    const agent = await virshStart();

    const view = await show();
    expect(view.apps).toEqual([]);
    expect(view.appsGeneration).toBe(2);
    expect(view.pendingAtNextBoot).toMatchObject({ kind: 'assign', apps: ['notes@1'] });
    expect(view.pendingAtNextBoot!.lastAttempt).toMatchObject({ by: 'hook', code: 'fs.needs-recovery' });
    expect(view.pendingAtNextBoot!.lastAttempt!.reason).toMatch(/did not shut down cleanly/);
    expect(await readlink(join(desktopDir, 'apps.qcow2'))).toBe('apps.2.qcow2');
    expect(existsSync(join(desktopDir, 'apps.3.qcow2'))).toBe(false);
    // What the design says the guest sees: its own filesystem as it left it, the placeholders
    // there (synced before the destroy) and reading as zeros, no app bytes.
    const hashes = await guestHashes(agent, [...appFiles.keys()]);
    for (const [path, file] of appFiles) expect(hashes.get(path), path).toBe(sha256(Buffer.alloc(file.size)));
    const text = (await qlayer('desktop', 'show', 'nb')).stdout;
    expect(text).toContain('fs.needs-recovery');

    // The guest replayed its journal at this boot; the next clean cycle applies the change.
    await virshShutdown();
    const again = await virshStart();
    const applied = await guestHashes(again, [...appFiles.keys()]);
    for (const [path, file] of appFiles) expect(applied.get(path), path).toBe(file.sha);
    const after = await show();
    expect(after.pendingAtNextBoot).toBeNull();
    expect(after.apps).toEqual(['notes@1']);
    await virshShutdown();
    for (const image of ['user.qcow2', 'apps.3.qcow2']) expect((await qemuCheck(join(desktopDir, image))).corruptions).toBe(0);
  }, 900_000);
});

describe('a pending assign dropped with --abort', () => {
  it('removes its placeholders from the running guest and forgets it; the next start changes nothing', async () => {
    // Out with the app first (at the next boot too), so the same app can be assigned again.
    await virshStart();
    expect((await qlayer('desktop', 'unassign', 'nb', 'notes', '--at-next-boot')).exitCode).toBe(0);
    await virshShutdown();
    const agent = await virshStart();
    expect((await show()).apps).toEqual([]);
    const generation = (await show()).appsGeneration;

    expect((await qlayer('desktop', 'assign', 'nb', 'notes', '--at-next-boot')).exitCode).toBe(0);
    const placed = await guestHashes(agent, [...appFiles.keys()]);
    for (const [path, file] of appFiles) expect(placed.get(path), path).toBe(sha256(Buffer.alloc(file.size)));
    const aborted = await qlayer('desktop', 'assign', '--abort', 'nb');
    expect(aborted.exitCode, aborted.stderr).toBe(0);
    expect(JSON.parse(aborted.stdout)).toMatchObject({ desktop: 'nb', aborted: true });
    const gone = await guestHashes(agent, [...appFiles.keys()]);
    for (const path of appFiles.keys()) expect(gone.get(path), path).toBeNull();
    expect(await virsh('domstate', domain)).toMatch(/running/); // the undo left it running
    expect((await show()).pendingAtNextBoot).toBeNull();

    await virshShutdown();
    await virshStart();
    const after = await show();
    expect(after).toMatchObject({ apps: [], appsGeneration: generation, pendingAtNextBoot: null });
    await virshShutdown();
  }, 900_000);
});
