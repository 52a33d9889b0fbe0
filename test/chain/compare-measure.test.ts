/**
 * compare, measure and snapshot -l against qemu-img 7.2 on the ops fixtures (compressed,
 * extended L2, external data file, snapshots, bitmaps, a depth-3 chain over raw): the same
 * verdict, message and exit code from compare, the same numbers from measure.
 */
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { compareImages, formatCompareText } from '../../src/chain/compare.js';
import { measureImage, measureSize } from '../../src/chain/measure.js';
import { formatSnapshotList, listSnapshots } from '../../src/chain/snapshot-list.js';
import { qemuCreate, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { buildFixtures, type Fixture } from '../ops/fixtures.js';

let dir: string;
let cleanup: () => Promise<void>;
let fixtures: Fixture[] = [];

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-compare-measure-'));
  fixtures = await buildFixtures(dir);
});
afterAll(async () => cleanup());

type Format = 'qcow2' | 'raw';

/** Our verdict and text against qemu-img compare's exit code and stdout. */
async function expectSameVerdict(a: string, b: string, formatA: Format, formatB: Format, strict = false): Promise<number> {
  const args = ['compare', '-f', formatA, '-F', formatB, ...(strict ? ['-s'] : []), a, b];
  const qemu = await qemuImg(args, [0, 1]);
  const ours = await compareImages(a, b, { formatA, formatB, strict });
  const what = `compare ${strict ? '-s ' : ''}${a} ${b}`;
  expect(ours.identical ? 0 : 1, what).toBe(qemu.exitCode);
  expect(formatCompareText(ours, strict), what).toBe(qemu.stdout.trim());
  return qemu.exitCode;
}

describe('compare', () => {
  it('agrees with qemu-img on every fixture against its raw and qcow2 conversions', async () => {
    for (const [i, fixture] of fixtures.entries()) {
      const raw = join(dir, `cmp-${i}.raw`);
      const flat = join(dir, `cmp-${i}.qcow2`);
      await qemuImg(['convert', '-O', 'raw', fixture.path, raw]);
      await qemuImg(['convert', '-O', 'qcow2', fixture.path, flat]);
      expect(await expectSameVerdict(fixture.path, raw, 'qcow2', 'raw'), fixture.name).toBe(0);
      expect(await expectSameVerdict(raw, fixture.path, 'raw', 'qcow2'), fixture.name).toBe(0);
      await expectSameVerdict(fixture.path, flat, 'qcow2', 'qcow2');
      await expectSameVerdict(fixture.path, fixture.path, 'qcow2', 'qcow2', true);
      // One sector changed in the copy: the same first offset.
      await qemuIo(flat, ['write -P 99 1536 512']);
      expect(await expectSameVerdict(fixture.path, flat, 'qcow2', 'qcow2'), fixture.name).toBe(1);
    }
  });

  it('images of different sizes: the extra part must be zeros, unless -s', async () => {
    const small = join(dir, 'size-small.qcow2');
    const large = join(dir, 'size-large.qcow2');
    await qemuCreate(small, '16M');
    await qemuIo(small, ['write -P 1 0 1M']);
    await qemuCreate(large, '24M');
    await qemuIo(large, ['write -P 1 0 1M', 'write -z 20M 64k']);
    expect(await expectSameVerdict(small, large, 'qcow2', 'qcow2')).toBe(0);
    expect(await expectSameVerdict(large, small, 'qcow2', 'qcow2')).toBe(0);
    expect(await expectSameVerdict(small, large, 'qcow2', 'qcow2', true)).toBe(1);
    await qemuIo(large, ['write -P 7 17M 4k']);
    expect(await expectSameVerdict(small, large, 'qcow2', 'qcow2')).toBe(1);
    expect(await expectSameVerdict(large, small, 'qcow2', 'qcow2')).toBe(1);
  });

  it('strict mode: the same content with a different block status is a difference', async () => {
    const a = join(dir, 'strict-a.qcow2');
    const b = join(dir, 'strict-b.qcow2');
    await qemuCreate(a, '8M');
    await qemuIo(a, ['write -P 1 0 64k']);
    await copyFile(a, b);
    await qemuIo(b, ['write -z 1M 64k']);
    expect(await expectSameVerdict(a, b, 'qcow2', 'qcow2')).toBe(0);
    expect(await expectSameVerdict(a, b, 'qcow2', 'qcow2', true)).toBe(1);
  });

  it('a missing image is an error, not a difference', async () => {
    await expect(compareImages(join(dir, 'missing.qcow2'), fixtures[0]!.path)).rejects.toThrow();
  });
});

describe('measure', () => {
  it('agrees with qemu-img measure on every fixture, to raw and to qcow2 (several cluster sizes)', async () => {
    for (const fixture of fixtures) {
      const targets: Array<{ O: 'raw' | 'qcow2'; o: string }> = [
        { O: 'raw', o: '' },
        { O: 'qcow2', o: '' },
        { O: 'qcow2', o: 'cluster_size=4k,refcount_bits=1' },
        { O: 'qcow2', o: 'cluster_size=2M,extended_l2=on' },
      ];
      for (const target of targets) {
        const o = target.o;
        const args = ['measure', '--output=json', '-f', 'qcow2', '-O', target.O, ...(o ? ['-o', o] : []), fixture.path];
        const qemu = JSON.parse((await qemuImg(args)).stdout) as Record<string, number>;
        const ours = await measureImage(fixture.path, {
          outputFormat: target.O,
          clusterSize: o.includes('4k') ? 4096 : o.includes('2M') ? 2 * 1024 * 1024 : undefined,
          refcountBits: o.includes('refcount_bits=1') ? 1 : undefined,
          extendedL2: o.includes('extended_l2=on') ? true : undefined,
        });
        const what = `${fixture.name}: ${args.join(' ')}`;
        // Data in host holes (external data file) reads as zero to qemu-img: it counts less.
        if (fixture.sparseData) expect(ours['fully-allocated'], what).toBe(qemu['fully-allocated']);
        else expect(ours, what).toEqual(qemu);
      }
    }
  });

  it('agrees with qemu-img on sizes that are not whole clusters (qcow2 and raw sources)', async () => {
    const odd = join(dir, 'odd.qcow2');
    await qemuCreate(odd, String(100 * 1024 * 1024 + 512));
    await qemuIo(odd, ['write -P 3 100M 512', 'write -P 4 4k 4k']);
    const oddRaw = join(dir, 'odd.raw');
    await qemuImg(['convert', '-O', 'raw', odd, oddRaw]);
    for (const [path, f] of [[odd, 'qcow2'], [oddRaw, 'raw']] as const) {
      for (const O of ['raw', 'qcow2'] as const) {
        const qemu = JSON.parse((await qemuImg(['measure', '--output=json', '-f', f, '-O', O, path])).stdout) as Record<string, number>;
        expect(await measureImage(path, { sourceFormat: f, outputFormat: O }), `${f} -> ${O}`).toEqual(qemu);
      }
    }
  });

  it('agrees with qemu-img measure --size', async () => {
    for (const size of [1, 512, 65536, 100 * 1024 * 1024, 10 * 1024 ** 3, 3 * 1024 ** 4 + 4096]) {
      for (const [O, o, opts] of [
        ['raw', '', {}],
        ['qcow2', '', {}],
        ['qcow2', 'cluster_size=512,refcount_bits=64', { clusterSize: 512, refcountBits: 64 }],
        ['qcow2', 'extended_l2=on', { extendedL2: true }],
      ] as const) {
        const args = ['measure', '--output=json', '-O', O, ...(o ? ['-o', o] : []), '--size', String(size)];
        const run = await qemuImg(args, [0, 1]);
        if (run.exitCode !== 0) {
          expect(() => measureSize(size, { outputFormat: O, ...opts }), args.join(' ')).toThrow(/too large/);
          continue;
        }
        expect(measureSize(size, { outputFormat: O, ...opts }), args.join(' ')).toEqual(JSON.parse(run.stdout));
      }
    }
  });
});

describe('snapshot -l', () => {
  it('lists the same snapshots as qemu-img snapshot -l and info', async () => {
    for (const fixture of fixtures) {
      const ours = await listSnapshots(fixture.path);
      const info = JSON.parse((await qemuImg(['info', '--output=json', fixture.path])).stdout) as { snapshots?: unknown[] };
      expect(ours, fixture.name).toEqual(info.snapshots ?? []);
      const text = (await qemuImg(['snapshot', '-l', fixture.path])).stdout.trim();
      expect(formatSnapshotList(ours), fixture.name).toBe(text);
    }
  });
});
