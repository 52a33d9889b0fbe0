/**
 * Seeded fuzzing of real images: mutate header bytes and table entries (L1, L2, refcount table
 * and blocks, snapshot table, compressed descriptors), then open read-only and read the disk,
 * its map and its snapshots. The only acceptable outcomes are a typed Qcow2Error or a read that
 * completes; never another exception, never a hang, and the file never changes.
 */
import { copyFile, open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Qcow2Error, Qcow2Image, parseHeader } from '../../src/qcow2/index.js';
import { qemuCreate, qemuImg, qemuIo, randomInt, seededRandom, sha256, tempDir } from '../helpers/qemu.js';

const MiB = 1 << 20;
/** Longer runs: QLAYER_FUZZ_SEED=n QLAYER_FUZZ_SCALE=10 npx vitest run test/qcow2/fuzz.test.ts */
const SEED_OFFSET = Number(process.env.QLAYER_FUZZ_SEED ?? 0);
const SCALE = Number(process.env.QLAYER_FUZZ_SCALE ?? 1);
let dir: string;
let cleanup: () => Promise<void>;
const seeds: Array<{ path: string; metadata: Array<[number, number]> }> = [];

/** Host ranges that hold metadata (header, tables), where mutations are most interesting. */
async function metadataRanges(path: string): Promise<Array<[number, number]>> {
  const bytes = await readFile(path);
  const header = parseHeader(bytes.subarray(0, 2 * MiB), bytes.length);
  const cs = 2 ** header.clusterBits;
  const ranges: Array<[number, number]> = [[0, Math.min(cs, 4096)], [header.l1TableOffset, header.l1Size * 8], [header.refcountTableOffset, 64]];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < header.l1Size; i++) {
    const l2 = Number(view.getBigUint64(header.l1TableOffset + i * 8) & 0x00fffffffffffe00n);
    if (l2) ranges.push([l2, Math.min(cs, 4096)]);
  }
  const block = Number(view.getBigUint64(header.refcountTableOffset) & ~0x1ffn);
  if (block) ranges.push([block, 256]);
  if (header.nbSnapshots) ranges.push([header.snapshotsOffset, 256]);
  return ranges.filter(([, length]) => length > 0);
}

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-fuzz-'));
  const plain = join(dir, 'plain.qcow2');
  await qemuCreate(plain, 2 * MiB, { cluster_size: 4096 });
  await qemuIo(plain, ['write -P 1 0 100k', 'write -z 200k 64k', 'write -P 2 1M 300k']);
  await qemuImg(['snapshot', '-c', 's1', plain]);
  await qemuIo(plain, ['write -P 3 50k 20k']);
  const raw = join(dir, 'src.raw');
  const data = Buffer.alloc(MiB);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7) % 13;
  await writeFile(raw, data);
  const compressed = join(dir, 'compressed.qcow2');
  await qemuImg(['convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, compressed]);
  const zstd = join(dir, 'zstd.qcow2');
  await qemuImg(['convert', '-c', '-O', 'qcow2', '-o', 'cluster_size=4096,compression_type=zstd', raw, zstd]);
  const extended = join(dir, 'extended.qcow2');
  await qemuCreate(extended, 2 * MiB, { extended_l2: true, cluster_size: 16384 });
  await qemuIo(extended, ['write -P 4 1000 30000', 'write -z 100k 8k']);
  const v2 = join(dir, 'v2.qcow2');
  await qemuCreate(v2, 2 * MiB, { compat: '0.10', cluster_size: 512 });
  await qemuIo(v2, ['write -P 5 0 200k']);
  for (const path of [plain, compressed, zstd, extended, v2]) seeds.push({ path, metadata: await metadataRanges(path) });
});
afterAll(async () => cleanup());

async function exercise(path: string): Promise<void> {
  const image = await Qcow2Image.open(path);
  try {
    const size = image.size;
    const buffer = Buffer.alloc(Math.min(size, 2 * MiB));
    await image.readAt(buffer, 0);
    if (size > buffer.length) await image.readAt(Buffer.alloc(65536), size - 65536);
    await image.mapRange(0, Math.min(size, 4 * MiB));
    for (const snapshot of await image.snapshots()) {
      const view = await image.snapshotView(snapshot.id);
      await view.readAt(Buffer.alloc(Math.min(view.size, MiB)), 0);
    }
  } finally {
    await image.close();
  }
}

function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`hang: no result after ${ms} ms`)), ms);
    promise.then(
      (v) => {
        clearTimeout(timer);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(timer);
        reject(e);
      },
    );
  });
}

describe('fuzzed images', () => {
  it('the unmutated seeds read cleanly', async () => {
    for (const seed of seeds) await exercise(seed.path);
  });

  it('600 (x QLAYER_FUZZ_SCALE) seeded mutations: typed error or successful read, no hang, file unchanged', async () => {
    const random = seededRandom(20261124 + SEED_OFFSET);
    const outcomes = { ok: 0, typed: 0 };
    const codes = new Map<string, number>();
    for (let iteration = 0; iteration < 600 * SCALE; iteration++) {
      const seed = seeds[iteration % seeds.length]!;
      const bytes = Buffer.from(await readFile(seed.path));
      const mutations = randomInt(random, 1, 4);
      for (let m = 0; m < mutations; m++) {
        const [start, length] = random() < 0.35 ? [0, 112] : seed.metadata[randomInt(random, 0, seed.metadata.length)]!;
        const at = start + randomInt(random, 0, length);
        const kind = random();
        if (kind < 0.4) bytes[at] = randomInt(random, 0, 256);
        else if (kind < 0.7) bytes[at] = (bytes[at] ?? 0) ^ (1 << randomInt(random, 0, 8));
        else if (kind < 0.85) bytes.fill(0xff, at, Math.min(bytes.length, at + 8));
        else bytes.fill(0, at, Math.min(bytes.length, at + 8));
      }
      const path = join(dir, 'mutant.qcow2');
      await writeFile(path, bytes);
      const before = sha256(bytes);
      try {
        await withTimeout(exercise(path), 10_000);
        outcomes.ok += 1;
      } catch (error) {
        if (!(error instanceof Qcow2Error)) {
          await copyFile(path, join(dir, `failing-${iteration}.qcow2`));
          throw new Error(`iteration ${iteration} (${seed.path}): ${String(error)}\n${(error as Error).stack ?? ''}`);
        }
        outcomes.typed += 1;
        codes.set(error.code, (codes.get(error.code) ?? 0) + 1);
      }
      expect(sha256(await readFile(path))).toBe(before);
    }
    // Both outcomes must really occur, or the fuzzer is not reaching the table code.
    expect(outcomes.ok).toBeGreaterThan(50);
    expect(outcomes.typed).toBeGreaterThan(50);
    expect(codes.size).toBeGreaterThan(3);
  });

  it('writes to fuzzed images that open writable: typed error or success, never a crash or hang', async () => {
    const random = seededRandom(4711 + SEED_OFFSET);
    const outcomes = { ok: 0, typed: 0 };
    for (let iteration = 0; iteration < 300 * SCALE; iteration++) {
      const seed = seeds[iteration % seeds.length]!;
      const bytes = Buffer.from(await readFile(seed.path));
      for (let m = randomInt(random, 1, 3); m > 0; m--) {
        const [start, length] = seed.metadata[randomInt(random, 0, seed.metadata.length)]!;
        const at = start + randomInt(random, 0, length);
        if (random() < 0.5) bytes[at] = randomInt(random, 0, 256);
        else bytes[at] = (bytes[at] ?? 0) ^ (1 << randomInt(random, 0, 8));
      }
      const path = join(dir, 'mutant-rw.qcow2');
      await writeFile(path, bytes);
      const job = (async () => {
        const image = await Qcow2Image.open(path, { writable: true });
        try {
          const size = image.size;
          const cs = image.clusterSize;
          for (let k = 0; k < 6; k++) {
            const length = randomInt(random, 1, Math.min(size, 200_000));
            const offset = randomInt(random, 0, size - length + 1);
            const roll = random();
            if (roll < 0.5) await image.write(Buffer.alloc(length, k + 1), offset);
            else if (roll < 0.7) await image.writeZeroes(offset, length);
            else if (roll < 0.85) await image.discard(offset, length);
            else await image.releaseHostClusters(await image.detachClusters([Math.floor(offset / cs)]));
          }
          await image.readAt(Buffer.alloc(Math.min(size, MiB)), 0);
        } finally {
          await image.close().catch((error: unknown) => {
            if (!(error instanceof Qcow2Error)) throw error;
          });
        }
      })();
      try {
        await withTimeout(job, 10_000);
        outcomes.ok += 1;
      } catch (error) {
        if (!(error instanceof Qcow2Error)) {
          await copyFile(path, join(dir, `failing-rw-${iteration}.qcow2`));
          throw new Error(`iteration ${iteration} (${seed.path}): ${String(error)}\n${(error as Error).stack ?? ''}`);
        }
        outcomes.typed += 1;
      }
    }
    expect(outcomes.ok).toBeGreaterThan(20);
    expect(outcomes.typed).toBeGreaterThan(20);
  });

  it('fuzzed writable opens never write to refused files', async () => {
    const random = seededRandom(7);
    for (let iteration = 0; iteration < 100; iteration++) {
      const seed = seeds[iteration % seeds.length]!;
      const bytes = Buffer.from(await readFile(seed.path));
      const at = randomInt(random, 0, 112);
      bytes[at] = randomInt(random, 0, 256);
      const path = join(dir, 'mutant-w.qcow2');
      await writeFile(path, bytes);
      const handle = await open(path, 'r');
      await handle.close();
      try {
        const image = await withTimeout(Qcow2Image.open(path, { writable: true }), 10_000);
        await image.close();
      } catch (error) {
        if (!(error instanceof Qcow2Error)) throw new Error(`iteration ${iteration}: ${String(error)}`);
        expect(sha256(await readFile(path))).toBe(sha256(bytes));
      }
    }
  });
});
