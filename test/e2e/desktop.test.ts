/**
 * The patent end to end on a real guest under libvirt (TCG): assign apps to a running desktop,
 * recompose offline, boot again. Every proof comes from a tool other than our engine:
 * qemu-img check and compare, e2fsck, debugfs, sha256sum in the guest, the base file's hash.
 * Then the refusals: a placeholder the user changed, an app file still present on unassign,
 * two apps claiming one path, a recompose while the desktop runs.
 */
import { createHash, randomBytes } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AppManifest } from '../../src/layers/app.js';
import { importBase } from '../../src/layers/bases.js';
import { assignApps } from '../../src/layers/desktop-assign.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop, startDesktop } from '../../src/layers/desktop-lifecycle.js';
import { recomposeDesktop } from '../../src/layers/desktop-offline.js';
import { unassignApps } from '../../src/layers/desktop-unassign.js';
import { verifyDesktop } from '../../src/layers/desktop-verify.js';
import { showDesktop } from '../../src/layers/desktop-views.js';
import { guestHelperPath } from '../../src/layers/guest-alloc.js';
import { runGuestScript, shellQuote } from '../../src/layers/guest-script.js';
import { planAssign } from '../../src/layers/plan.js';
import { DelegatingRuntime, type DesktopHandle } from '../../src/layers/runtime.js';
import { Store } from '../../src/layers/store.js';
import { testGuestRuntime, type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { ensureFixture, type Fixture } from '../../src/virt/fixture.js';
import { debugfsFlip } from '../helpers/offline-guest.js';
import { qemuCheck, qemuImg, tempDir } from '../helpers/qemu.js';
import { buildTestApp, debugfsCat, fileSha256, fsckClean, rawExport } from './guest-helpers.js';

let fixture: Fixture;
let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let libvirtRuntime: LibvirtDesktopRuntime;
let baseSha: string;
let basePath: string;
const apps: Record<string, { manifest: AppManifest; source: string }> = {};

/** A runtime that runs a guest script just before each stop: how the tests play the user. */
class ScriptedRuntime extends DelegatingRuntime {
  beforeStop: string | null = null;
  /** Raw export of the disk right after each stop (the offline state recompose starts from). */
  afterStop: ((handle: DesktopHandle) => Promise<void>) | null = null;
  override async stop(d: DesktopHandle) {
    if (this.beforeStop) await runGuestScript(this.inner.shell(d), this.beforeStop, 'test user action');
    await this.inner.stop(d);
    if (this.afterStop) await this.afterStop(d);
  }
}

async function makeApp(name: string, files: Record<string, Buffer>, prefix?: string): Promise<void> {
  const source = join(dir, 'src', name);
  apps[name] = { manifest: await buildTestApp(store, source, { name, files, ...(prefix ? { prefix } : {}) }), source };
}

beforeAll(async () => {
  fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-desktop-'));
  store = await Store.open(join(dir, 'store'));
  await importBase(store, 'guest', fixture.images.base.path, { format: 'qcow2' });
  basePath = store.path('bases', 'guest.qcow2');
  baseSha = await fileSha256(basePath);
  libvirtRuntime = testGuestRuntime({ logDir: join(dir, 'logs') });
  // Sizes that are not multiples of a block or a cluster, so placeholders share clusters.
  await makeApp('editor', { 'bin/editor': randomBytes(1_234_567), 'share/dict.txt': randomBytes(33_333), 'etc/editor.conf': Buffer.from('theme=dark\n') });
  await makeApp('viewer', { 'bin/viewer': randomBytes(2_500_001), 'lib/libview.so': randomBytes(98_765) });
  await makeApp('clash', { 'bin/editor': randomBytes(10) }, '/opt/editor'); // claims editor's path
}, 300_000);

afterAll(async () => {
  await cleanup?.();
});

describe('desktop: assign, recompose, boot (real guest)', () => {
  it('assign two apps to a running desktop: every proof holds, and the user file survives', async () => {
    await createDesktop(store, 'alice', 'guest');
    const runtime = new ScriptedRuntime(libvirtRuntime);
    const first = desktopHandle(store, await store.readState(), 'alice');
    await runtime.start(first);
    const userText = `user data ${randomBytes(8).toString('hex')}\n`;
    await runGuestScript(runtime.shell(first), `mkdir -p /home/alice && printf %s ${shellQuote(userText)} > /home/alice/todo.txt && sync\n`, 'user write');

    // Capture the disk as the recompose finds it: right after the guest stopped.
    const beforeRaw = join(dir, 'alice-before.raw');
    runtime.afterStop = async (d) => {
      await rawExport(d.userPath, beforeRaw);
      runtime.afterStop = null;
    };
    const result = await assignApps(store, runtime, 'alice', ['editor', 'viewer']);
    expect(result.apps).toEqual(['editor@1', 'viewer@1']);
    if (guestHelperPath() !== null) expect(result.allocation).toMatchObject({ method: 'helper', files: 5, fallocated: 5, zeroFilled: 0 });
    // Written-zero placeholders put clusters in the user delta that the recompose drops;
    // fallocated ones wrote no data, so there is nothing of theirs to drop.
    if (result.allocation.zeroFilled > 0) expect(result.report.clustersDropped).toBeGreaterThan(0);

    const state = await store.readState();
    const record = state.desktops.alice!;
    const chain = desktopHandle(store, state, 'alice').chain;
    // qemu-img check: every layer clean.
    for (const layer of chain) {
      const check = await qemuCheck(layer.path);
      expect({ layer: layer.path, corruptions: check.corruptions, leaks: check.leaks }).toEqual({ layer: layer.path, corruptions: 0, leaks: 0 });
    }
    // qemu-img compare: the chain equals the old disk outside the app extents, the app files
    // inside, with fallocated placeholders' extents flipped to written as debugfs flips them.
    for (const { manifest } of [apps.editor!, apps.viewer!]) {
      for (const file of manifest.files) await debugfsFlip(beforeRaw, file.path);
    }
    const expected = await readFile(beforeRaw);
    for (const file of record.files) {
      const [name] = file.app.split('@') as [string];
      const app = apps[name]!;
      const content = await readFile(join(app.source, file.path.slice(app.manifest.prefix.length + 1)));
      for (const e of file.extents) {
        expected.fill(0, e.diskOffset, e.diskOffset + e.length);
        content.copy(expected, e.diskOffset, e.fileOffset, Math.min(content.length, e.fileOffset + e.length));
      }
    }
    const expectedRaw = join(dir, 'alice-expected.raw');
    await writeFile(expectedRaw, expected);
    const compare = await qemuImg(['compare', '-f', 'raw', '-F', 'qcow2', expectedRaw, chain[0]!.path], [0, 1]);
    expect(compare.exitCode, compare.stdout).toBe(0);
    // e2fsck on a raw export: clean. debugfs dump: the app's bytes.
    const afterRaw = await rawExport(chain[0]!.path, join(dir, 'alice-after.raw'));
    expect((await fsckClean(afterRaw)).ok).toBe(true);
    for (const { manifest, source } of [apps.editor!, apps.viewer!]) {
      for (const file of manifest.files) {
        const dumped = await debugfsCat(afterRaw, file.path);
        expect(dumped.equals(await readFile(join(source, file.path.slice(manifest.prefix.length + 1))))).toBe(true);
      }
    }
    expect(await fileSha256(basePath)).toBe(baseSha);

    // Boot again: in the guest, every app file hashes to its manifest, and the user file is intact.
    const verified = await verifyDesktop(store, runtime, 'alice', ['/home/alice/todo.txt']);
    expect(verified.files.length).toBe(5);
    expect(verified.files.filter((f) => !f.ok)).toEqual([]);
    expect(verified.extra['/home/alice/todo.txt']).toBe(createHash('sha256').update(userText).digest('hex'));
    expect(await libvirtRuntime.isRunning(desktopHandle(store, await store.readState(), 'alice'))).toBe(false); // verify stopped it again
  }, 600_000);

  it('refuses two apps that claim the same path, before the guest is touched', async () => {
    let started = false;
    const runtime = new ScriptedRuntime(libvirtRuntime);
    runtime.start = async () => {
      started = true;
    };
    await expect(assignApps(store, runtime, 'alice', ['clash'])).rejects.toThrow(/clash@1 and editor@1 both claim \/opt\/editor\/bin\/editor|both claim/);
    expect(started).toBe(false);
  });

  it('refuses a placeholder the user changed before shutdown, and changes nothing', async () => {
    await createDesktop(store, 'bob', 'guest');
    const runtime = new ScriptedRuntime(libvirtRuntime);
    runtime.beforeStop = `printf X | dd of=/opt/viewer/bin/viewer bs=1 seek=5000 conv=notrunc 2>/dev/null; sync\n`;
    await expect(assignApps(store, runtime, 'bob', ['viewer'])).rejects.toThrow(/placeholder \/opt\/viewer\/bin\/viewer .*(no longer reads as zeros|was partly written)/);
    const state = await store.readState();
    expect(state.desktops.bob!.apps).toEqual([]);
    expect(state.desktops.bob!.recompose).toBeNull();
    expect(state.desktops.bob!.appsGeneration).toBe(0);
    for (const layer of desktopHandle(store, state, 'bob').chain) expect((await qemuCheck(layer.path)).exitCode).toBe(0);
  }, 300_000);

  it('unassign refuses when an app file is still present after the guest deleted it', async () => {
    const runtime = new ScriptedRuntime(libvirtRuntime);
    runtime.beforeStop = `mkdir -p /opt/viewer/bin && echo mine > /opt/viewer/bin/viewer && sync\n`;
    await expect(unassignApps(store, runtime, 'alice', ['viewer'])).rejects.toThrow(/\/opt\/viewer\/bin\/viewer is still in the guest filesystem/);
    expect((await store.readState()).desktops.alice!.apps).toEqual(['editor@1', 'viewer@1']);
  }, 300_000);

  it('refuses to recompose or start while another step is pending or the desktop runs', async () => {
    const state = await store.readState();
    const record = state.desktops.alice!;
    record.recompose = planAssign(record, [], []); // a no-op plan: same apps, next generation
    await store.writeState(state);
    await expect(startDesktop(store, libvirtRuntime, 'alice')).rejects.toThrow(/unfinished recompose/);
    const handle = desktopHandle(store, state, 'alice');
    await libvirtRuntime.start(handle);
    try {
      await expect(recomposeDesktop(store, libvirtRuntime, 'alice')).rejects.toThrow(/alice is running; stop it first/);
    } finally {
      await libvirtRuntime.stop(handle);
    }
    const report = await recomposeDesktop(store, libvirtRuntime, 'alice');
    expect(report?.generation).toBe(2);
    const view = await showDesktop(store, libvirtRuntime, 'alice');
    expect(view.state).toBe('stopped');
    expect(view.paths.apps).toMatch(/apps\.2\.qcow2$/);
    expect(await fileSha256(basePath)).toBe(baseSha);
  }, 300_000);
});
