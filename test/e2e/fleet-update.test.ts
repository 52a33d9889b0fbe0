/**
 * Many desktops and app updates on real guests (libvirt, TCG): one call assigns an app to
 * several desktops two at a time, one of which cannot take it (its recompose is pending) and
 * fails alone; then an app update replaces version 1 by version 2 in one boot. Proofs: hashes
 * in the booted guests, files of the old version gone, qemu-img check and e2fsck clean.
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AppManifest } from '../../src/layers/app.js';
import { importBase } from '../../src/layers/bases.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop } from '../../src/layers/desktop-lifecycle.js';
import { updateApp } from '../../src/layers/desktop-update.js';
import { verifyDesktop } from '../../src/layers/desktop-verify.js';
import { assignToDesktops } from '../../src/layers/fleet.js';
import { planAssign } from '../../src/layers/plan.js';
import { DelegatingRuntime, type DesktopHandle } from '../../src/layers/runtime.js';
import { Store } from '../../src/layers/store.js';
import { testGuestRuntime, type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { ensureFixture } from '../../src/virt/fixture.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';
import { buildTestApp, fsckClean, rawExport } from './guest-helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let libvirt: LibvirtDesktopRuntime;

/** Counts boots and shutdowns. */
class CountingRuntime extends DelegatingRuntime {
  starts = 0;
  stops = 0;
  override async start(d: DesktopHandle) {
    this.starts += 1;
    await this.inner.start(d);
  }
  override async stop(d: DesktopHandle) {
    this.stops += 1;
    await this.inner.stop(d);
  }
}

async function build(version: string, files: Record<string, Buffer>): Promise<AppManifest> {
  return buildTestApp(store, join(dir, `tool-${version}`), { name: 'tool', version, files });
}

beforeAll(async () => {
  const fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-fleet-'));
  store = await Store.open(join(dir, 'store'));
  await importBase(store, 'guest', fixture.images.base.path, { format: 'qcow2' });
  libvirt = testGuestRuntime({ logDir: join(dir, 'logs') });
}, 120_000);

afterAll(async () => {
  await cleanup?.();
});

describe('many desktops, and updates in one boot (real guests)', () => {
  let v1: AppManifest;
  let v2: AppManifest;

  it('assigns to several desktops two at a time; the one that cannot take it fails alone', async () => {
    const shared = randomBytes(700_001);
    v1 = await build('1', { 'bin/tool': shared, 'lib/old.so': randomBytes(90_000), 'etc/tool.conf': Buffer.from('v=1\n') });
    v2 = await build('2', { 'bin/tool': randomBytes(800_123), 'lib/new.so': randomBytes(120_000), 'etc/tool.conf': Buffer.from('v=2\n') });
    for (const name of ['carol', 'dave', 'erin']) await createDesktop(store, name, 'guest');
    // erin has an unfinished recompose: assigning to it must fail without touching the others.
    const state = await store.readState();
    state.desktops.erin!.recompose = planAssign(state.desktops.erin!, [], []);
    await store.writeState(state);

    const runtime = new CountingRuntime(libvirt);
    const lines: string[] = [];
    const outcomes = await assignToDesktops(store, runtime, ['carol', 'dave', 'erin'], ['tool@1'], { parallel: 2, log: (d, m) => lines.push(`[${d}] ${m}`) });
    expect(outcomes.map((o) => [o.desktop, o.status])).toEqual([
      ['carol', 'assigned'],
      ['dave', 'assigned'],
      ['erin', 'failed'],
    ]);
    expect(outcomes[2]).toMatchObject({ code: 'desktop.recompose-pending', resume: 'qlayer desktop recompose erin' });
    expect(runtime.starts).toBe(2); // erin never booted
    expect(lines.some((l) => l.startsWith('[carol] allocat'))).toBe(true);
    const after = await store.readState();
    expect(after.desktops.carol!.apps).toEqual(['tool@1']);
    expect(after.desktops.dave!.apps).toEqual(['tool@1']);
    expect(after.desktops.erin!.apps).toEqual([]);
    for (const name of ['carol', 'dave']) {
      const verified = await verifyDesktop(store, libvirt, name);
      expect(verified.files.map((f) => f.ok)).toEqual(v1.files.map(() => true));
    }
  }, 900_000);

  it('updates tool@1 to tool@2 with one boot and one shutdown', async () => {
    const runtime = new CountingRuntime(libvirt);
    const result = await updateApp(store, runtime, 'carol', 'tool@2');
    expect(result).toMatchObject({ replaced: 'tool@1', apps: ['tool@2'], located: v2.files.length });
    expect([runtime.starts, runtime.stops]).toEqual([1, 1]);
    const state = await store.readState();
    expect(state.desktops.carol!.apps).toEqual(['tool@2']);
    expect(state.desktops.carol!.files.map((f) => f.app)).toEqual(v2.files.map(() => 'tool@2'));
    const chain = desktopHandle(store, state, 'carol').chain;
    for (const layer of chain) expect((await qemuCheck(layer.path)).corruptions).toBe(0);
    expect((await fsckClean(await rawExport(chain[0]!.path, join(dir, 'carol.raw')))).ok).toBe(true);
    const gone = '/opt/tool/lib/old.so';
    const verified = await verifyDesktop(store, libvirt, 'carol', [gone]);
    expect(verified.files.filter((f) => !f.ok)).toEqual([]);
    expect(verified.files.length).toBe(v2.files.length);
    expect(verified.extra[gone]).toBeNull();
    // The other desktop still runs version 1.
    expect((await store.readState()).desktops.dave!.apps).toEqual(['tool@1']);
  }, 600_000);
});
