/**
 * An interrupted rebase leaves a staging desktop (NAME.rebase, its record naming the desktop it
 * stages for). Its apps are the rebase's to set: a user's assign, update or unassign of it is
 * refused before anything runs, `assign --all` passes it by, and `desktop list` marks it. The
 * real interrupted rebase is in test/e2e/rebase.test.ts; here the store is made as the rebase
 * makes it (createDesktop, then the record's stagingFor), with no guest: the runtime given fails
 * the test if anything reaches it.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../src/layers/app.js';
import { importBase } from '../../src/layers/bases.js';
import { assignApps } from '../../src/layers/desktop-assign.js';
import { createDesktop } from '../../src/layers/desktop-lifecycle.js';
import { unassignApps } from '../../src/layers/desktop-unassign.js';
import { updateApp } from '../../src/layers/desktop-update.js';
import { assignToDesktops } from '../../src/layers/fleet.js';
import { assignAtNextBoot } from '../../src/layers/pending-boot.js';
import type { DesktopRuntime } from '../../src/layers/runtime.js';
import { Store } from '../../src/layers/store.js';
import { tempDir } from '../helpers/qemu.js';

/** A runtime nothing may use: every property access fails the test. */
const untouchable = new Proxy({}, { get: (_, key) => { throw new Error(`the runtime was used (${String(key)})`); } }) as DesktopRuntime;

let temp: { dir: string; cleanup: () => Promise<void> };
let store: Store;

beforeAll(async () => {
  temp = await tempDir('qlayer-staging-');
  const disk = join(temp.dir, 'os.raw');
  await execa('truncate', ['-s', '64M', disk]);
  await execa('mke2fs', ['-q', '-F', '-t', 'ext4', disk]);
  store = await Store.open(join(temp.dir, 'store'));
  await importBase(store, 'os', disk, { format: 'raw' });
  const source = join(temp.dir, 'tool');
  await mkdir(source);
  await writeFile(join(source, 'README'), 'tool\n');
  await buildApp(store, { name: 'tool', version: '1', sourceDir: source });
  await createDesktop(store, 'k.rebase', 'os');
  const state = await store.readState();
  state.desktops['k.rebase']!.stagingFor = 'k';
  await store.writeState(state);
});
afterAll(async () => temp?.cleanup());

describe("an interrupted rebase's staging desktop", () => {
  it('refuses assign, update, unassign and --at-next-boot by name, changing nothing', async () => {
    const before = await readFile(store.path('state.json'), 'utf8');
    for (const attempt of [
      () => assignApps(store, untouchable, 'k.rebase', ['tool@1']),
      () => updateApp(store, untouchable, 'k.rebase', 'tool@1'),
      () => unassignApps(store, untouchable, 'k.rebase', ['tool']),
      () => assignAtNextBoot(store, untouchable, 'k.rebase', ['tool@1']),
    ]) {
      await expect(attempt()).rejects.toMatchObject({ code: 'rebase.staging', message: expect.stringContaining('qlayer desktop rebase --resume k') });
    }
    expect(await readFile(store.path('state.json'), 'utf8')).toBe(before);
  });

  it('assign --all passes it by; --desktops naming it fails there', async () => {
    const all = await assignToDesktops(store, untouchable, 'all', ['tool@1']);
    expect(all).toEqual([expect.objectContaining({ desktop: 'k.rebase', status: 'skipped', reason: expect.stringContaining("staging desktop of k's rebase") })]);
    const named = await assignToDesktops(store, untouchable, ['k.rebase'], ['tool@1']);
    expect(named).toEqual([expect.objectContaining({ desktop: 'k.rebase', status: 'failed', code: 'rebase.staging' })]);
  });

  it('desktop list marks it, in text and in --json', async () => {
    const run = (args: string[]) => execa(process.execPath, ['bin/qlayer.js', 'desktop', 'list', '--store', store.root, ...args], { env: { QLAYER_CONFIG: '/dev/null' } });
    expect((await run([])).stdout).toMatch(/^k\.rebase\tstopped \(staging for k's rebase\)\tos\t-$/m);
    expect(JSON.parse((await run(['--json'])).stdout)).toEqual([expect.objectContaining({ name: 'k.rebase', stagingFor: 'k' })]);
  });
});
