/**
 * OS updates that keep the user's data and apps (issue 13), on real guests (libvirt, TCG, the
 * tiny test guest): a desktop with a home disk, files written by the "user" in /home and
 * outside it, an app assigned; a new base (the same guest with another /etc/os-release, written
 * offline by debugfs); `desktop rebase`. Oracles: hashes read inside the booted guest, the
 * guest's /proc/mounts, qemu-img check on every layer and the home disk, virsh dumpxml.
 * Then the rebase stopped after each of its phases (the desktop whole every time, a rerun
 * finishes it), a group rebase with a running member, and the refusals.
 */
import { createHash } from 'node:crypto';
import { existsSync, realpathSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { importBase } from '../../src/layers/bases.js';
import { assignApps } from '../../src/layers/desktop-assign.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop, destroyDesktop } from '../../src/layers/desktop-lifecycle.js';
import { verifyDesktop } from '../../src/layers/desktop-verify.js';
import { addToGroup, createGroup, groupRebase, type GroupRebaseOutcome } from '../../src/layers/groups.js';
import { runGuestScript } from '../../src/layers/guest-script.js';
import { rebaseDesktop, stagingName } from '../../src/layers/rebase.js';
import type { RebasePhase, StoreState } from '../../src/layers/state.js';
import { Store } from '../../src/layers/store.js';
import { testGuestRuntime, desktopDomain, type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { ensureFixture } from '../../src/virt/fixture.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';
import { buildTestApp, killCliAt, QLAYER_CLI as CLI } from './guest-helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let libvirt: LibvirtDesktopRuntime;

const OS_RELEASE_V2 = 'PRETTY_NAME="qlayer test guest 2"\nVERSION_ID=2\n';
const sha = (text: string | Buffer): string => createHash('sha256').update(text).digest('hex');
const NOTES = 'the user wrote this in /home and it must survive the OS update\n';
const OUTSIDE = 'the user wrote this outside /home: a rebase drops it\n';

/** The fixture's disk with /etc/os-release replaced: a raw copy written by debugfs, then qcow2 again. */
async function newerGuestImage(base: string, out: string): Promise<void> {
  const raw = join(dir, 'v2.raw');
  await execa('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', base, raw]);
  const release = join(dir, 'os-release');
  await writeFile(release, OS_RELEASE_V2);
  await execa('debugfs', ['-w', '-R', `write ${release} /etc/os-release`, raw]);
  const check = await execa('debugfs', ['-R', 'cat /etc/os-release', raw]);
  expect(check.stdout).toBe(OS_RELEASE_V2.trimEnd());
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, out]);
}

/** A raw disk of `mib` MiB holding an ext4: a base smaller than the fixture's 256 MiB. */
async function smallImage(out: string, mib: number): Promise<void> {
  await execa('truncate', ['-s', `${mib}M`, out]);
  await execa('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', out]);
}

async function guest(name: string, script: string): Promise<string> {
  return runGuestScript(libvirt.shell(desktopHandle(store, await store.readState(), name)), script, 'test script');
}

/** Every image of the desktop checked by qemu-img, and its chain resolved by qemu-img down to its recorded base. */
async function assertWhole(name: string, state?: StoreState): Promise<void> {
  const s = state ?? (await store.readState());
  const handle = desktopHandle(store, s, name);
  for (const layer of handle.chain) {
    const report = await qemuCheck(layer.path);
    expect(report.corruptions + report.leaks + report.checkErrors, layer.path).toBe(0);
  }
  if (handle.home) expect((await qemuCheck(handle.home)).corruptions).toBe(0);
  const info = await execa('qemu-img', ['info', '--backing-chain', '--output=json', '-U', handle.userPath]);
  const chain = JSON.parse(info.stdout) as Array<{ filename: string }>;
  // The definition's chain names the apps.qcow2 link; qemu-img follows the headers to the generation it points at.
  expect(chain.map((c) => resolve(c.filename))).toEqual(handle.chain.map((l) => realpathSync(l.path)));
  expect(handle.chain[2]!.path).toBe(store.path(s.bases[s.desktops[name]!.base]!.file));
}

beforeAll(async () => {
  const fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-rebase-'));
  store = await Store.open(join(dir, 'store'));
  // QLAYER_KEEP_LOGS=DIR keeps the guests' serial logs after the run (to read why a boot failed).
  libvirt = testGuestRuntime({ logDir: process.env.QLAYER_KEEP_LOGS ?? join(dir, 'logs') });
  await importBase(store, 'v1', fixture.images.base.path, { format: 'qcow2', prepareHome: true });
  await newerGuestImage(fixture.images.base.path, join(dir, 'v2.qcow2'));
  await importBase(store, 'v2', join(dir, 'v2.qcow2'), { format: 'qcow2', prepareHome: true });
  await importBase(store, 'plain', fixture.images.base.path, { format: 'qcow2' });
  await smallImage(join(dir, 'small.raw'), 128);
  await importBase(store, 'small', join(dir, 'small.raw'), { format: 'raw' });
  await buildTestApp(store, join(dir, 'tool'), { name: 'tool', files: { 'bin/tool': '#!/bin/sh\necho tool\n'.repeat(5000), README: 'tool 1\n' } });
}, 300_000);

afterAll(async () => {
  if (store) {
    const state = await store.readState();
    for (const name of Object.keys(state.desktops)) {
      const handle = desktopHandle(store, state, name);
      if (await libvirt.isRunning(handle).catch(() => false)) await libvirt.stop(handle).catch(() => undefined);
      await destroyDesktop(store, libvirt, name).catch(() => undefined);
    }
  }
  await cleanup?.();
}, 300_000);

describe('desktop rebase onto a new base, keeping apps and the home disk (real guests)', () => {
  it('a desktop with a home disk: the guest mounts it at /home; the user writes inside and outside /home; an app is assigned', async () => {
    await createDesktop(store, 'd', 'v1', { runtime: libvirt, homeBytes: 128 * 1048576 });
    const state = await store.readState();
    expect(state.desktops.d!.home).toMatchObject({ file: 'desktops/d/home.qcow2', label: 'qlayer-home' });
    const home = store.path(state.desktops.d!.home!.file);
    // The home disk has no backing file (qemu-img says so) and an ext4 labelled qlayer-home (e2fsprogs says so).
    const info = JSON.parse((await execa('qemu-img', ['info', '--output=json', home])).stdout) as { 'backing-filename'?: string; 'virtual-size': number };
    expect(info['backing-filename']).toBeUndefined();
    expect(info['virtual-size']).toBe(128 * 1048576);
    // The definition has it as a second virtio disk (libvirt's own XML).
    const xml = (await execa('virsh', ['-c', 'qemu:///system', 'dumpxml', '--inactive', desktopDomain(desktopHandle(store, state, 'd'))])).stdout;
    expect(xml).toContain(`<source file='${home}'`);
    expect(xml).toMatch(/<target dev='vdb' bus='virtio'\/>/);

    await libvirt.start(desktopHandle(store, state, 'd'));
    const mounts = await guest('d', 'cat /proc/mounts\n');
    expect(mounts).toMatch(/^\/dev\/vdb \/home ext4 /m);
    await guest('d', `mkdir -p /home/user && printf '%s' '${NOTES}' > /home/user/notes.txt && printf '%s' '${OUTSIDE}' > /root/outside.txt && sync\n`);
    await libvirt.stop(desktopHandle(store, state, 'd'));
    await assignApps(store, libvirt, 'd', ['tool@1']);
    const before = await verifyDesktop(store, libvirt, 'd', ['/home/user/notes.txt', '/root/outside.txt']);
    expect(before.files.every((f) => f.ok)).toBe(true);
    expect(before.extra).toEqual({ '/home/user/notes.txt': sha(NOTES), '/root/outside.txt': sha(OUTSIDE) });
    expect(before.home).toMatchObject({ mounted: true, device: '/dev/vdb', fstype: 'ext4' });
  }, 600_000);

  it('refuses, changing nothing: no --yes, a smaller base, the same base, an unknown base, a running desktop', async () => {
    const before = JSON.stringify(await store.readState());
    await expect(rebaseDesktop(store, libvirt, 'd', 'v2')).rejects.toMatchObject({ code: 'rebase.needs-yes', message: expect.stringMatching(/outside \/home[\s\S]*kept: the home disk[\s\S]*tool@1[\s\S]*--yes/) });
    await expect(rebaseDesktop(store, libvirt, 'd', 'small', { yes: true })).rejects.toMatchObject({ code: 'rebase.smaller-base', message: expect.stringMatching(/base small is 134217728 bytes, smaller than d's base v1/) });
    await expect(rebaseDesktop(store, libvirt, 'd', 'v1', { yes: true })).rejects.toMatchObject({ code: 'rebase.same-base' });
    await expect(rebaseDesktop(store, libvirt, 'd', 'nope', { yes: true })).rejects.toMatchObject({ code: 'base.not-found' });
    const handle = desktopHandle(store, await store.readState(), 'd');
    await libvirt.start(handle);
    try {
      await expect(rebaseDesktop(store, libvirt, 'd', 'v2', { yes: true })).rejects.toMatchObject({ code: 'desktop.running' });
    } finally {
      await libvirt.stop(handle);
    }
    expect(JSON.stringify(await store.readState())).toBe(before);
    expect(existsSync(store.path('desktops/d.on-v2'))).toBe(false);
  }, 300_000);

  it('rebase: the new base is what boots, the app verifies, /home is intact, the file outside /home is gone, every image checks clean', async () => {
    const oldDir = (await store.readState()).desktops.d!.dir;
    const result = await rebaseDesktop(store, libvirt, 'd', 'v2', { yes: true });
    expect(result).toMatchObject({ from: 'v1', to: 'v2', apps: ['tool@1'], unchanged: false, interrupted: null });
    const state = await store.readState();
    expect(state.desktops.d).toMatchObject({ base: 'v2', dir: 'desktops/d.on-v2', apps: ['tool@1'], rebase: null });
    expect(state.desktops[stagingName('d')]).toBeUndefined();
    await assertWhole('d', state);
    // The old chain is gone; the home disk stays where it was.
    expect(existsSync(store.path(`${oldDir}/user.qcow2`))).toBe(false);
    expect(existsSync(store.path(state.desktops.d!.home!.file))).toBe(true);
    // The staging domain is gone; the desktop's domain opens the new chain and the home disk.
    const { stdout: domains } = await execa('virsh', ['-c', 'qemu:///system', 'list', '--all', '--name']);
    expect(domains).not.toContain(desktopDomain({ name: stagingName('d'), storeId: store.id }));
    const xml = (await execa('virsh', ['-c', 'qemu:///system', 'dumpxml', '--inactive', desktopDomain(desktopHandle(store, state, 'd'))])).stdout;
    expect(xml).toContain(`<source file='${store.path('desktops/d.on-v2/user.qcow2')}'`);
    expect(xml).toContain(`<source file='${store.path(state.desktops.d!.home!.file)}'`);

    const after = await verifyDesktop(store, libvirt, 'd', ['/home/user/notes.txt', '/root/outside.txt', '/etc/os-release']);
    expect(after.files.every((f) => f.ok)).toBe(true);
    expect(after.files).toHaveLength(2);
    expect(after.extra).toEqual({ '/home/user/notes.txt': sha(NOTES), '/root/outside.txt': null, '/etc/os-release': sha(OS_RELEASE_V2) });
    expect(after.home).toMatchObject({ mounted: true, fstype: 'ext4' });
    await assertWhole('d');
  }, 900_000);

  it('stopped after each phase, the desktop is whole (old before the switch, new after it); a rerun finishes the rebase', async () => {
    const phases: Array<RebasePhase | 'planned'> = ['planned', 'staged', 'assigned', 'verified', 'switched'];
    let target = 'v1';
    for (const phase of phases) {
      const from = (await store.readState()).desktops.d!.base;
      await expect(
        rebaseDesktop(store, libvirt, 'd', target, {
          yes: true,
          afterPhase: async (p) => {
            if (p === phase) throw new Error(`stopped after ${p}`);
          },
        }),
      ).rejects.toThrow(`stopped after ${phase}`);
      const state = await store.readState();
      const record = state.desktops.d!;
      expect(record.rebase?.phase, phase).toBe(phase);
      // Before the switch the desktop is on its old chain; after it, on the new one. Both whole.
      expect(record.base, phase).toBe(phase === 'switched' ? target : from);
      await assertWhole('d', state);
      if (phase !== 'switched' && phase !== 'planned') await assertWhole(stagingName('d'), state);
      // The rerun: finishes (after the switch) or undoes and does it again (before it).
      const rerun = await rebaseDesktop(store, libvirt, 'd', target, { yes: true });
      expect(rerun.interrupted, phase).toBe(phase === 'switched' ? 'finished' : 'discarded');
      const done = await store.readState();
      expect(done.desktops.d).toMatchObject({ base: target, apps: ['tool@1'], rebase: null });
      expect(Object.keys(done.desktops).filter((n) => n.endsWith('.rebase'))).toEqual([]);
      expect(existsSync(store.path(`desktops/d.on-${from}`))).toBe(false);
      await assertWhole('d', done);
      target = target === 'v1' ? 'v2' : 'v1';
    }
    // Booted once at the end: the app, the home disk's file, the last base's os-release.
    const base = (await store.readState()).desktops.d!.base;
    const verified = await verifyDesktop(store, libvirt, 'd', ['/home/user/notes.txt', '/etc/os-release']);
    expect(verified.files.every((f) => f.ok)).toBe(true);
    expect(verified.extra['/home/user/notes.txt']).toBe(sha(NOTES));
    expect(verified.extra['/etc/os-release'] === sha(OS_RELEASE_V2)).toBe(base === 'v2');
  }, 1_800_000);

  it('a home disk the guest did not mount: verify says so', async () => {
    await createDesktop(store, 'nomount', 'plain', { runtime: libvirt, homeBytes: 64 * 1048576 });
    const result = await verifyDesktop(store, libvirt, 'nomount');
    expect(result.home).toMatchObject({ mounted: false, disk: store.path('desktops/nomount/home.qcow2') });
  }, 300_000);

  it('group rebase: the stopped members are rebased, the running one is pending; a rerun changes nothing; once stopped it is done', async () => {
    for (const name of ['g1', 'g2', 'g3']) await createDesktop(store, name, 'v1', { runtime: libvirt, homeBytes: 64 * 1048576 });
    await createGroup(store, 'team');
    await addToGroup(store, libvirt, 'team', ['g1', 'g2', 'g3']);
    const g3 = desktopHandle(store, await store.readState(), 'g3');
    await libvirt.start(g3);
    const statuses = (outcomes: GroupRebaseOutcome[]): Record<string, string> => Object.fromEntries(outcomes.map((o) => [o.desktop, o.status]));
    try {
      await expect(groupRebase(store, libvirt, 'team', 'v2')).rejects.toMatchObject({ code: 'rebase.needs-yes', message: expect.stringMatching(/g3 is running/) });
      const first = await groupRebase(store, libvirt, 'team', 'v2', { yes: true, parallel: 2 });
      expect(statuses(first)).toEqual({ g1: 'rebased', g2: 'rebased', g3: 'pending' });
      const state = await store.readState();
      expect(state.groups!.team!.rebase).toEqual({ base: 'v2', pending: ['g3'] });
      expect([state.desktops.g1!.base, state.desktops.g2!.base, state.desktops.g3!.base]).toEqual(['v2', 'v2', 'v1']);
      const again = await groupRebase(store, libvirt, 'team', 'v2', { yes: true, parallel: 2 });
      expect(statuses(again)).toEqual({ g1: 'unchanged', g2: 'unchanged', g3: 'pending' });
      const unchanged = await store.readState();
      expect(JSON.stringify(unchanged.desktops)).toBe(JSON.stringify(state.desktops));
    } finally {
      await libvirt.stop(g3);
    }
    const last = await groupRebase(store, libvirt, 'team', 'v2', { yes: true, parallel: 2 });
    expect(statuses(last)).toEqual({ g1: 'unchanged', g2: 'unchanged', g3: 'rebased' });
    const state = await store.readState();
    expect(state.groups!.team!.rebase).toEqual({ base: 'v2', pending: [] });
    for (const name of ['g1', 'g2', 'g3']) await assertWhole(name, state);
  }, 1_200_000);
});

async function cli(args: string[]): Promise<{ exitCode: number; json: Record<string, unknown> }> {
  const result = await execa(process.execPath, [CLI, ...args, '--store', store.root, '--json'], { reject: false });
  return { exitCode: result.exitCode ?? -1, json: JSON.parse(result.stdout || '{}') as Record<string, unknown> };
}

describe('qlayer desktop rebase killed for real (SIGKILL) at each phase, then --resume', () => {
  it('without --yes: prints what would be lost, exits 1, changes nothing', async () => {
    await createDesktop(store, 'k', 'v1', { runtime: libvirt, homeBytes: 64 * 1048576 });
    await assignApps(store, libvirt, 'k', ['tool@1']);
    const before = JSON.stringify(await store.readState());
    const { exitCode, json } = await cli(['desktop', 'rebase', 'k', '--base', 'v2']);
    expect(exitCode).toBe(1);
    expect(json).toMatchObject({ desktop: 'k', from: 'v1', to: 'v2', confirmed: false, apps: ['tool@1'], home: store.path('desktops/k/home.qcow2') });
    expect(JSON.stringify(await store.readState())).toBe(before);
    const smaller = await cli(['desktop', 'rebase', 'k', '--base', 'small', '--yes']);
    expect([smaller.exitCode, (smaller.json.error as { code: string }).code]).toEqual([1, 'rebase.smaller-base']);
    expect(JSON.stringify(await store.readState())).toBe(before);
  }, 600_000);

  it.each([
    ['building the new system chain', 'planned'],
    ['placing ', 'staged'],
    ['[new system] allocating', 'staged'],
    ['booting the new system to verify', 'assigned'],
    ['removing the old system chain', 'switched'],
  ] as const)('killed at "%s" (phase %s): whole, and --resume finishes or undoes it', async (step, phase) => {
    const from = (await store.readState()).desktops.k!.base;
    const to = from === 'v1' ? 'v2' : 'v1';
    const { killed, stderr } = await killCliAt(store.root, ['desktop', 'rebase', 'k', '--base', to, '--yes'], step);
    expect(killed, stderr).toBe(true);
    const shown = await cli(['desktop', 'show', 'k']);
    expect(shown.json.rebase).toMatchObject({ phase, from, to });
    expect(shown.json.base).toBe(phase === 'switched' ? to : from);
    await assertWhole('k');
    if (phase === 'staged' || phase === 'assigned') {
      // The staging desktop shows as such, and a user's assign to it is refused, changing nothing.
      const listed = await cli(['desktop', 'list']);
      expect(listed.json).toEqual(expect.arrayContaining([expect.objectContaining({ name: stagingName('k'), stagingFor: 'k' })]));
      const before = JSON.stringify(await store.readState());
      const refused = await cli(['desktop', 'assign', stagingName('k'), 'tool@1']);
      expect([refused.exitCode, (refused.json.error as { code: string }).code]).toEqual([1, 'rebase.staging']);
      expect(JSON.stringify(await store.readState())).toBe(before);
    }
    const resumed = await cli(['desktop', 'rebase', '--resume', 'k']);
    expect(resumed.exitCode).toBe(0);
    expect(resumed.json.interrupted).toBe(phase === 'switched' ? 'finished' : 'discarded');
    const state = await store.readState();
    expect(state.desktops.k).toMatchObject({ base: phase === 'switched' ? to : from, apps: ['tool@1'], rebase: null });
    expect(state.desktops[stagingName('k')]).toBeUndefined();
    expect(existsSync(store.path(`desktops/k.on-${phase === 'switched' ? from : to}`))).toBe(false);
    const { stdout: domains } = await execa('virsh', ['-c', 'qemu:///system', 'list', '--all', '--name']);
    expect(domains.split('\n')).not.toContain(desktopDomain({ name: stagingName('k'), storeId: store.id }));
    await assertWhole('k', state);
  }, 900_000);

  it('after the kills: the desktop boots, its app verifies, its home disk is mounted', async () => {
    const verified = await verifyDesktop(store, libvirt, 'k');
    expect(verified.files.length).toBe(2);
    expect(verified.files.every((f) => f.ok)).toBe(true);
    expect(verified.home?.mounted).toBe(true);
  }, 300_000);
});

