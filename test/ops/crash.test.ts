/**
 * commit and rebase interrupted at every write or fsync (unsynced writes lost, as in a power
 * cut): the top image must still read exactly as before, neither image may be corrupt (leaks
 * are allowed: check --repair reclaims them), and running the operation again completes it.
 */
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { commitImage } from '../../src/chain/commit.js';
import { convertImage } from '../../src/chain/convert.js';
import { rebaseImage } from '../../src/chain/rebase.js';
import { FaultInjectingFileSystem, InjectedCrash } from '../../src/io/fault-injection.js';
import { nodeFileSystem } from '../../src/io/host-file.js';
import { checkImage } from '../../src/qcow2/repair.js';
import { qemuCheck, qemuCompare, qemuCreate, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';

let dir: string;
let cleanup: () => Promise<void>;
const p = (name: string) => join(dir, name);

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-ops-crash-'));
  await qemuCreate(p('base.qcow2'), '4M');
  await qemuIo(p('base.qcow2'), ['write -P 1 0 4M']);
  await qemuCreate(p('mid.qcow2'), '', {}, { backing: 'base.qcow2', backingFormat: 'qcow2' });
  await qemuIo(p('mid.qcow2'), ['write -P 2 64k 192k', 'write -z 1M 64k', 'write -P 3 3M 100k']);
  await qemuCreate(p('top.qcow2'), '', {}, { backing: 'mid.qcow2', backingFormat: 'qcow2' });
  await qemuIo(p('top.qcow2'), ['write -P 4 100k 8k', 'write -P 5 2M 64k', 'write -z 3M 4k']);
  // Templates: every attempt starts from copies of these (backing names stay base/mid).
  for (const name of ['base', 'mid', 'top']) await copyFile(p(`${name}.qcow2`), p(`t-${name}.qcow2`));
  await qemuImg(['convert', '-O', 'raw', p('top.qcow2'), p('expected.raw')]);
});
afterAll(async () => cleanup());

async function reset(): Promise<void> {
  for (const name of ['base', 'mid', 'top']) await copyFile(p(`t-${name}.qcow2`), p(`${name}.qcow2`));
}

async function expectNoCorruption(path: string): Promise<void> {
  const report = await qemuCheck(path);
  expect(report.corruptions, `${path}: ${JSON.stringify(report.raw)}`).toBe(0);
}

async function crashEverywhere(run: (fs: FaultInjectingFileSystem) => Promise<unknown>, after: () => Promise<void>): Promise<number> {
  let crashes = 0;
  for (let n = 1; n < 500; n += 1) {
    await reset();
    const fs = new FaultInjectingFileSystem(nodeFileSystem, { crashAtOperation: n, loseUnsyncedWrites: true });
    let crashed = false;
    try {
      await run(fs);
    } catch (error) {
      if (!(error instanceof InjectedCrash) && !fs.crashed) throw error;
      crashed = true;
    }
    // What is on disk now must read as before, whatever the crash point.
    expect(await qemuCompare(p('top.qcow2'), p('expected.raw'), 'qcow2', 'raw'), `crash at ${n}`).toBe(true);
    await expectNoCorruption(p('top.qcow2'));
    await expectNoCorruption(p('mid.qcow2'));
    if (!crashed) return crashes;
    crashes += 1;
    // Leaks are reclaimed, and a second run completes the job.
    await checkImage(p('top.qcow2'), { repair: 'leaks' });
    await checkImage(p('mid.qcow2'), { repair: 'leaks' });
    await after();
  }
  throw new Error('operation never completed');
}

describe('crash safety', () => {
  it('commit: top reads the same after a crash at any write or fsync, and a rerun completes', async () => {
    const crashes = await crashEverywhere(
      (fs) => commitImage(p('top.qcow2'), { fs }),
      async () => {
        await commitImage(p('top.qcow2'));
        expect(await qemuCompare(p('mid.qcow2'), p('expected.raw'), 'qcow2', 'raw')).toBe(true);
        expect(await qemuCompare(p('top.qcow2'), p('expected.raw'), 'qcow2', 'raw')).toBe(true);
        expect((await qemuCheck(p('top.qcow2'))).exitCode).toBe(0);
        expect((await qemuCheck(p('mid.qcow2'))).exitCode).toBe(0);
      },
    );
    expect(crashes).toBeGreaterThan(5);
  });

  it('convert: a crash at any write or fsync never leaves an output that opens as a valid image', async () => {
    await reset();
    let completed = false;
    let crashes = 0;
    for (let n = 1; n < 200 && !completed; n += 1) {
      for (const loseUnsyncedWrites of [false, true]) {
        const out = p(`converted-${n}-${loseUnsyncedWrites}.qcow2`);
        const fs = new FaultInjectingFileSystem(nodeFileSystem, { crashAtOperation: n, loseUnsyncedWrites });
        try {
          await convertImage(p('top.qcow2'), out, { fs, sync: true, windowSize: 1024 * 1024 });
          completed = true;
        } catch (error) {
          if (!(error instanceof InjectedCrash) && !fs.crashed) throw error;
          crashes += 1;
        }
        const info = await qemuImg(['info', '-f', 'qcow2', '--output=json', out], [0, 1]).catch(() => ({ exitCode: 1 }));
        if (info.exitCode === 0) {
          // The header is written last: an image that opens is the complete one.
          expect(await qemuCompare(out, p('expected.raw'), 'qcow2', 'raw'), `crash at ${n}`).toBe(true);
          expect((await qemuCheck(out)).exitCode).toBe(0);
        }
      }
    }
    expect(completed).toBe(true);
    expect(crashes).toBeGreaterThan(3);
  });

  it('safe rebase onto the base: same, for every crash point', async () => {
    const crashes = await crashEverywhere(
      (fs) => rebaseImage(p('top.qcow2'), { fs, backing: 'base.qcow2', backingFormat: 'qcow2' }),
      async () => {
        await rebaseImage(p('top.qcow2'), { backing: 'base.qcow2', backingFormat: 'qcow2' });
        expect(await qemuCompare(p('top.qcow2'), p('expected.raw'), 'qcow2', 'raw')).toBe(true);
        expect((await qemuCheck(p('top.qcow2'))).exitCode).toBe(0);
        expect(JSON.parse((await qemuImg(['info', '--output=json', p('top.qcow2')])).stdout)['backing-filename']).toBe('base.qcow2');
      },
    );
    expect(crashes).toBeGreaterThan(5);
  });
});
