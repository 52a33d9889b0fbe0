/**
 * App bytes shared between desktops on a file system that clones ranges: a real XFS
 * (reflink=1) made in a file and loop-mounted, with the store on it. The sharing is proven the
 * way an administrator would see it: the file system's used space (statfs, as df shows it)
 * grows by little more than the tables for each further desktop, and filefrag flags the apps
 * layers' extents as shared. The layers must read exactly as copied ones (the whole-disk
 * oracle: the app bytes plus debugfs's flip) and pass qemu-img check. The copy path on the
 * same file system is measured beside it.
 */
import { mkdir, rm, statfs, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { planAssign } from '../../src/layers/plan.js';
import { runRecompose, type RecomposeReport } from '../../src/layers/recompose.js';
import { qemuReadRaw, tempDir } from '../helpers/qemu.js';
import {
  addDesktop,
  allocateFallocated,
  assertCleanImages,
  context,
  expectedAfterAssign,
  locate,
  makeDesktop,
  withDebugfsFlip,
  type Desktop,
} from './desktop-fixture.js';

const MIB = 1 << 20;

/** Bytes in use on the file system holding `dir`, after everything written reached it. */
async function usedBytes(dir: string): Promise<number> {
  await execa('sync', ['-f', dir]);
  const s = await statfs(dir);
  return (s.blocks - s.bfree) * s.bsize;
}

/** Bytes of `file`'s extents that filefrag flags as shared. */
async function sharedBytes(file: string): Promise<number> {
  const out = (await execa('filefrag', ['-v', '-b4096', file])).stdout;
  let shared = 0;
  for (const line of out.split('\n')) {
    const m = /^\s*\d+:\s+\d+\.\.\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+):.*\bshared\b/.exec(line);
    if (m) shared += Number(m[1]) * 4096;
  }
  return shared;
}

describe('apps layers on XFS with reflink: app bytes shared between desktops', () => {
  let temp: { dir: string; cleanup: () => Promise<void> };
  let mount: string;
  let first: Desktop;
  let appBytes: number;

  beforeAll(async () => {
    temp = await tempDir('qlayer-reflink-');
    const image = join(temp.dir, 'store.xfs');
    mount = join(temp.dir, 'xfs');
    await mkdir(mount);
    await execa('truncate', ['-s', '1G', image]);
    await execa('mkfs.xfs', ['-q', '-m', 'reflink=1', image]);
    await execa('mount', ['-o', 'loop', image, mount]);
    const appFiles: Record<string, number> = { 'lib/big.bin': 40 * MIB, 'lib/mid.bin': 6 * MIB + 123 };
    for (let i = 0; i < 40; i++) appFiles[`share/doc${i}.txt`] = 1_000 + i * 997;
    first = await makeDesktop(temp.dir, { storeDir: join(mount, 'store'), baseBytes: 160 * MIB, appFiles });
    appBytes = first.manifest.files.reduce((n, f) => n + f.size, 0);
  }, 180_000);

  afterAll(async () => {
    await execa('umount', [mount], { reject: false });
    await temp?.cleanup();
  });

  /** Allocate, locate and recompose one desktop; the file system's growth and the report. */
  async function assign(desktop: Desktop, noClone = false): Promise<{ report: RecomposeReport; grew: number }> {
    const scratch = join(temp.dir, `scratch-${desktop.record.dir.replace(/\W/g, '-')}`);
    await mkdir(scratch, { recursive: true });
    await allocateFallocated(desktop, scratch, { staleBytes: false });
    const before = await qemuReadRaw(desktop.userPath);
    const located = await locate(desktop, [desktop.manifest]);
    const expected = await withDebugfsFlip(await expectedAfterAssign(before, located, desktop.appSource, desktop.manifest.prefix), desktop.manifest.files.map((f) => f.path), scratch);
    desktop.record.recompose = planAssign(desktop.record, [desktop.manifest], located);
    const used = await usedBytes(mount);
    const report = await runRecompose({ ...context(desktop, { json: '' }), ...(noClone ? { noClone: true } : {}) });
    const grew = (await usedBytes(mount)) - used;
    expect((await qemuReadRaw(desktop.userPath)).equals(expected), `${desktop.record.dir} reads the app bytes and nothing else changed`).toBe(true);
    await assertCleanImages([join(desktop.desktopDir, 'apps.1.qcow2'), desktop.userPath]);
    await rm(scratch, { recursive: true, force: true });
    return { report, grew };
  }

  it('each further desktop costs at most 2 % of the app, and its apps layer shares the payload extents', async () => {
    const results: Array<{ name: string; grew: number; report: RecomposeReport }> = [];
    for (const [i, desktop] of [first, await addDesktop(first, 'bob'), await addDesktop(first, 'carol')].entries()) {
      const { report, grew } = await assign(desktop);
      results.push({ name: ['alice', 'bob', 'carol'][i]!, grew, report });
      expect(report.cloneUnavailable).toBeNull();
      // Every app block is shared: the files' whole blocks, nothing copied but base bytes.
      const appBlocks = first.manifest.files.reduce((n, f) => n + Math.ceil(f.size / 4096) * 4096, 0);
      expect(report.bytesSharedWithPayloads).toBe(appBlocks);
      expect(grew, `desktop ${results[i]!.name} grew the store by ${grew} bytes`).toBeLessThanOrEqual(0.02 * appBytes);
      expect(await sharedBytes(join(desktop.desktopDir, 'apps.1.qcow2'))).toBeGreaterThanOrEqual(appBlocks);
    }
    // The copy path on the same file system, for contrast: a whole copy of the app per desktop.
    const copied = await assign(await addDesktop(first, 'dave'), true);
    expect(copied.report.bytesSharedWithPayloads).toBe(0);
    expect(copied.grew).toBeGreaterThanOrEqual(0.95 * appBytes);
    await writeFile(join(temp.dir, 'reflink-results.json'), JSON.stringify({ appBytes, results: results.map((r) => ({ name: r.name, grew: r.grew })), copyGrew: copied.grew }));
    console.log(`reflink: app ${appBytes} bytes; per desktop ${results.map((r) => `${r.name} +${r.grew}`).join(', ')}; copy path +${copied.grew}`);
  }, 300_000);
});
