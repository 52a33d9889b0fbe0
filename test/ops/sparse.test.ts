/**
 * Holes of sparse raw files (src/io/sparse.ts, native/ lseek SEEK_DATA/SEEK_HOLE): the data
 * runs found must be the ones written, map must match qemu-img map (holes are zeros), and
 * convert must skip holes yet produce the same disk (qemu-img compare, qemu-img check). With
 * the helper forced off (QLAYER_NO_NATIVE=1) everything must still work, by reading.
 */
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { convertImage } from '../../src/chain/convert.js';
import { mapImage } from '../../src/chain/map.js';
import { nodeFileSystem, type HostFile } from '../../src/io/host-file.js';
import { dataRanges, resetSparseBinding, sparseSupported } from '../../src/io/sparse.js';
import { qemuCheck, qemuCompare, qemuImg, tempDir } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 16 * MiB;
/** Data runs written into the sparse file (4 KiB aligned: file systems track holes in blocks). */
const RUNS = [
  { offset: 64 * KiB, length: 128 * KiB },
  { offset: 1 * MiB + 4 * KiB, length: 12 * KiB },
  { offset: 4 * MiB, length: 1 * MiB },
  { offset: 9 * MiB - 64 * KiB, length: 192 * KiB },
  { offset: SIZE - 64 * KiB, length: 64 * KiB },
];

/** A QLAYER_NO_NATIVE=1 set by whoever runs the tests: native-only checks are skipped then. */
const userNoNative = process.env.QLAYER_NO_NATIVE;
const nativeWanted = userNoNative !== '1';

let dir: string;
let cleanup: () => Promise<void>;
let sparse: string;

async function makeSparse(path: string, size: number, runs: Array<{ offset: number; length: number }>): Promise<void> {
  await execa('truncate', ['-s', String(size), path]);
  for (const r of runs) {
    await execa('dd', ['if=/dev/urandom', `of=${path}`, 'bs=4096', `seek=${r.offset / 4096}`, `count=${r.length / 4096}`, 'conv=notrunc', 'status=none']);
  }
}

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-ops-sparse-'));
  sparse = join(dir, 'sparse.raw');
  await makeSparse(sparse, SIZE, RUNS);
});
afterAll(async () => cleanup());
afterEach(() => {
  if (userNoNative === undefined) delete process.env.QLAYER_NO_NATIVE;
  else process.env.QLAYER_NO_NATIVE = userNoNative;
  resetSparseBinding();
});

async function expectClean(path: string): Promise<void> {
  const report = await qemuCheck(path);
  expect(report.exitCode, path).toBe(0);
  expect(report.leaks + report.corruptions, path).toBe(0);
}

async function withFile<T>(path: string, use: (file: HostFile) => Promise<T>): Promise<T> {
  const file = await nodeFileSystem.open(path, 'read');
  try {
    return await use(file);
  } finally {
    await file.close();
  }
}

describe('dataRanges', () => {
  it.runIf(nativeWanted)('the native helper is built and loads (npm ci builds it)', () => {
    expect(sparseSupported()).toBe(true);
  });

  it.runIf(nativeWanted)('finds exactly the data runs written, also inside a sub-range', async () => {
    await withFile(sparse, async (file) => {
      expect(await dataRanges(file, 0, SIZE)).toEqual(RUNS);
      expect(await dataRanges(file, 128 * KiB, 4 * MiB + 4 * KiB)).toEqual([
        { offset: 128 * KiB, length: 64 * KiB },
        { offset: 1 * MiB + 4 * KiB, length: 12 * KiB },
        { offset: 4 * MiB, length: 4 * KiB },
      ]);
      expect(await dataRanges(file, 2 * MiB, 3 * MiB)).toEqual([]);
      expect(await dataRanges(file, SIZE, SIZE + MiB)).toEqual([]);
    });
  });

  it('returns null without an fd (a wrapping HostFile) or with the helper off', async () => {
    await withFile(sparse, async (file) => {
      const wrapper: HostFile = {
        path: file.path,
        writable: false,
        length: () => file.length(),
        read: (into, position) => file.read(into, position),
        write: (data, position) => file.write(data, position),
        truncate: (length) => file.truncate(length),
        sync: () => file.sync(),
        close: async () => undefined,
      };
      expect(await dataRanges(wrapper, 0, SIZE)).toBeNull();
      process.env.QLAYER_NO_NATIVE = '1';
      resetSparseBinding();
      expect(sparseSupported()).toBe(false);
      expect(await dataRanges(file, 0, SIZE)).toBeNull();
    });
  });
});

describe('map and convert of a sparse raw file', () => {
  it.runIf(nativeWanted)('map matches qemu-img map -f raw (holes are present zeros)', async () => {
    const theirs = JSON.parse((await qemuImg(['map', '-f', 'raw', '--output=json', sparse])).stdout);
    const ours = await mapImage(sparse, { format: 'raw' });
    expect(ours).toEqual(theirs);
    expect(ours.filter((e) => e.data).map((e) => ({ offset: e.start, length: e.length }))).toEqual(RUNS);
  });

  it.runIf(nativeWanted)('map of a file whose last block is a hole and whose size is not whole sectors', async () => {
    const odd = join(dir, 'odd.raw');
    await makeSparse(odd, 3 * MiB + 1000, [{ offset: 512 * KiB, length: 8 * KiB }]);
    const theirs = JSON.parse((await qemuImg(['map', '-f', 'raw', '--output=json', odd])).stdout);
    expect(await mapImage(odd, { format: 'raw' })).toEqual(theirs);
  });

  for (const native of nativeWanted ? [true, false] : [false]) {
    it(`convert to qcow2 and raw equals the source (${native ? 'holes skipped' : 'helper off, holes read'})`, async () => {
      if (!native) {
        process.env.QLAYER_NO_NATIVE = '1';
        resetSparseBinding();
      }
      const tag = native ? 'n' : 'r';
      for (const clusterSize of [65536, 4096, 2 * MiB]) {
        const out = join(dir, `out-${tag}-${clusterSize}.qcow2`);
        const result = await convertImage(sparse, out, { sourceFormat: 'raw', outputFormat: 'qcow2', clusterSize, windowSize: 3 * MiB });
        expect(await qemuCompare(sparse, out, 'raw', 'qcow2'), `qcow2 ${clusterSize}`).toBe(true);
        await expectClean(out);
        const total = RUNS.reduce((n, r) => n + r.length, 0);
        // Data read: only the runs with the helper; everything without it.
        if (native) expect(result.dataBytes).toBe(total);
        else expect(result.dataBytes).toBe(SIZE);
      }
      const raw = join(dir, `out-${tag}.raw`);
      await convertImage(sparse, raw, { sourceFormat: 'raw', outputFormat: 'raw' });
      expect(await qemuCompare(sparse, raw, 'raw', 'raw')).toBe(true);
      const compressed = join(dir, `out-${tag}-c.qcow2`);
      await convertImage(sparse, compressed, { sourceFormat: 'raw', compress: true });
      expect(await qemuCompare(sparse, compressed, 'raw', 'qcow2')).toBe(true);
      await expectClean(compressed);
    });
  }

  it.runIf(nativeWanted)('holes that share a cluster with data read as zeros when window buffers are reused', async () => {
    // 64 one-cluster windows through the ring of window buffers: every fifth window is all
    // data, the others hold 4 KiB of data after a 60 KiB hole in the same cluster, so a reused
    // buffer still holds the data of an earlier window where this one has its hole.
    const reuse = join(dir, 'reuse.raw');
    const runs: Array<{ offset: number; length: number }> = [];
    for (let w = 0; w < 64; w += 1) {
      runs.push(w % 5 === 0 ? { offset: w * 64 * KiB, length: 64 * KiB } : { offset: w * 64 * KiB + 60 * KiB, length: 4 * KiB });
    }
    await makeSparse(reuse, 4 * MiB, runs);
    const out = join(dir, 'reuse.qcow2');
    await convertImage(reuse, out, { sourceFormat: 'raw', windowSize: 64 * KiB });
    expect(await qemuCompare(reuse, out, 'raw', 'qcow2')).toBe(true);
    await expectClean(out);
    const raw = join(dir, 'reuse-out.raw');
    await convertImage(reuse, raw, { sourceFormat: 'raw', outputFormat: 'raw', windowSize: 64 * KiB });
    expect(await qemuCompare(reuse, raw, 'raw', 'raw')).toBe(true);
  });

  it.runIf(nativeWanted)('a qcow2 over a sparse raw backing file converts and maps like qemu-img', async () => {
    const top = join(dir, 'over-sparse.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', sparse, '-F', 'raw', top]);
    await execa('qemu-io', ['-c', 'write -P 7 4096k 64k', '-c', 'write -P 8 2M 64k', top]);
    const theirs = JSON.parse((await qemuImg(['map', '--output=json', top])).stdout);
    expect(await mapImage(top)).toEqual(theirs);
    const out = join(dir, 'over-sparse-flat.qcow2');
    await convertImage(top, out);
    expect(await qemuCompare(top, out, 'qcow2', 'qcow2')).toBe(true);
    await expectClean(out);
  });
});
