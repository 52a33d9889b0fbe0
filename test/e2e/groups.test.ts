/**
 * Groups on real guests (libvirt, TCG): a rollout to three desktops, one of them running, does
 * the two stopped ones and leaves the running one pending; rolling out again changes nothing;
 * the pending one is done by the next rollout once it stops. Then a new version through the
 * group (an update on every member) and the app taken out of the group. Verified by hashes in
 * the booted guest. Also the refusals: a group named like a desktop (and the reverse), a direct
 * unassign of an app that comes from a group, removing a base desktops use.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { importBase, removeBase } from '../../src/layers/bases.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop } from '../../src/layers/desktop-lifecycle.js';
import { unassignApps } from '../../src/layers/desktop-unassign.js';
import { verifyDesktop } from '../../src/layers/desktop-verify.js';
import { addToGroup, createGroup, groupAssign, groupUnassign, rollOutGroup, type RolloutOutcome } from '../../src/layers/groups.js';
import { Store } from '../../src/layers/store.js';
import { testGuestRuntime, type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { ensureFixture } from '../../src/virt/fixture.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';
import { buildTestApp } from './guest-helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let libvirt: LibvirtDesktopRuntime;

const statuses = (outcomes: RolloutOutcome[]): Record<string, string> => Object.fromEntries(outcomes.map((o) => [o.desktop, o.status]));

async function tool(version: string): Promise<void> {
  await buildTestApp(store, join(dir, `tool-${version}`), { name: 'tool', version, files: { 'bin/tool': `#!/bin/sh\necho tool ${version}\n`.repeat(2000), VERSION: `${version}\n` } });
}

beforeAll(async () => {
  const fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-groups-'));
  store = await Store.open(join(dir, 'store'));
  await importBase(store, 'guest', fixture.images.base.path, { format: 'qcow2' });
  libvirt = testGuestRuntime({ logDir: join(dir, 'logs') });
  await tool('1');
  await tool('2');
  for (const name of ['d1', 'd2', 'd3']) await createDesktop(store, name, 'guest');
}, 120_000);

afterAll(async () => {
  const handle = desktopHandle(store, await store.readState(), 'd3');
  if (await libvirt.isRunning(handle).catch(() => false)) await libvirt.stop(handle).catch(() => undefined);
  await cleanup?.();
});

describe('groups: rollouts to several desktops (real guests)', () => {
  it('refuses a group named like a desktop, and a desktop named like a group', async () => {
    await expect(createGroup(store, 'd1')).rejects.toMatchObject({ code: 'group.name-taken' });
    await createGroup(store, 'team');
    await expect(createDesktop(store, 'team', 'guest')).rejects.toMatchObject({ code: 'desktop.name-taken' });
  });

  it('a rollout with one member running: the stopped two are done, the running one is pending; again: nothing changes', async () => {
    await libvirt.start(desktopHandle(store, await store.readState(), 'd3'));
    expect(statuses(await addToGroup(store, libvirt, 'team', ['d1', 'd2', 'd3'], { parallel: 2 }))).toEqual({ d1: 'unchanged', d2: 'unchanged', d3: 'pending' });
    const first = await groupAssign(store, libvirt, 'team', ['tool@1'], { parallel: 2 });
    expect(statuses(first)).toEqual({ d1: 'changed', d2: 'changed', d3: 'pending' });
    expect(first.find((o) => o.desktop === 'd1')).toMatchObject({ added: ['tool@1'], updated: [], removed: [] });
    expect(first.find((o) => o.desktop === 'd3')?.reason).toMatch(/running; left pending: qlayer group rollout team/);
    const state = await store.readState();
    expect(state.groups!.team!.pending).toEqual(['d3']);
    expect([state.desktops.d1!.apps, state.desktops.d2!.apps, state.desktops.d3!.apps]).toEqual([['tool@1'], ['tool@1'], []]);

    const again = await rollOutGroup(store, libvirt, 'team', { parallel: 2 });
    expect(statuses(again)).toEqual({ d1: 'unchanged', d2: 'unchanged', d3: 'pending' });
    expect((await store.readState()).desktops.d1!.appsGeneration).toBe(state.desktops.d1!.appsGeneration);
  }, 600_000);

  it('the pending member is done by the next rollout once stopped', async () => {
    await libvirt.stop(desktopHandle(store, await store.readState(), 'd3'));
    expect(statuses(await rollOutGroup(store, libvirt, 'team', { parallel: 2 }))).toEqual({ d1: 'unchanged', d2: 'unchanged', d3: 'changed' });
    const state = await store.readState();
    expect(state.groups!.team!.pending).toEqual([]);
    expect(state.desktops.d3!.apps).toEqual(['tool@1']);
  }, 600_000);

  it('a direct unassign of a group app is refused; removing the base names its desktops', async () => {
    await expect(unassignApps(store, libvirt, 'd1', ['tool'])).rejects.toMatchObject({ code: 'unassign.from-group', message: expect.stringMatching(/tool comes to d1 from group team/) });
    await expect(removeBase(store, 'guest')).rejects.toMatchObject({ code: 'base.in-use', message: expect.stringMatching(/desktops d1, d2, d3/) });
  });

  it('a new version through the group updates every member; taking it out removes it', async () => {
    const updated = await groupAssign(store, libvirt, 'team', ['tool@2'], { parallel: 2 });
    expect(updated.map((o) => [o.desktop, o.status, o.updated])).toEqual([
      ['d1', 'changed', ['tool@2']],
      ['d2', 'changed', ['tool@2']],
      ['d3', 'changed', ['tool@2']],
    ]);
    const verified = await verifyDesktop(store, libvirt, 'd2');
    expect(verified.files.map((f) => [f.app, f.ok])).toEqual([
      ['tool@2', true],
      ['tool@2', true],
    ]);
    const removed = await groupUnassign(store, libvirt, 'team', ['tool'], { parallel: 2 });
    expect(removed.map((o) => [o.status, o.removed])).toEqual([
      ['changed', ['tool@2']],
      ['changed', ['tool@2']],
      ['changed', ['tool@2']],
    ]);
    const state = await store.readState();
    for (const name of ['d1', 'd2', 'd3']) {
      expect(state.desktops[name]!.apps).toEqual([]);
      for (const layer of desktopHandle(store, state, name).chain.slice(0, 2)) expect((await qemuCheck(layer.path)).corruptions).toBe(0);
    }
  }, 900_000);
});
