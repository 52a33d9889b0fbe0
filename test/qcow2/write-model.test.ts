/**
 * Writes: seeded random sequences of write / writeZeroes / discard (varied sizes, unaligned) on
 * images the engine created, checked against an in-memory model of the disk. After each
 * sequence, `qemu-img check` must report no corruption and no leak, and qemu's raw view must
 * equal the model.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openChain } from '../../src/chain/index.js';
import { createImage, Qcow2Image, type CreateImageOptions } from '../../src/qcow2/index.js';
import { qemuCheck, qemuCreate, qemuImg, qemuIo, qemuReadRaw, randomInt, seededRandom, sha256, tempDir } from '../helpers/qemu.js';

const MiB = 1 << 20;
let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-write-'));
});
afterAll(async () => cleanup());

interface Mode {
  name: string;
  size: number;
  create: Omit<CreateImageOptions, 'path' | 'size' | 'backing'>;
  backing?: 'qcow2' | 'raw';
  ops: number;
  maxLength: number;
}

const modes: Mode[] = [
  { name: 'v3 64K', size: 8 * MiB, create: {}, ops: 80, maxLength: 400_000 },
  { name: 'v2 64K', size: 8 * MiB, create: { version: 2 }, ops: 80, maxLength: 400_000 },
  { name: 'v3 512B refcount 1', size: 2 * MiB, create: { clusterBits: 9, refcountBits: 1 }, ops: 60, maxLength: 50_000 },
  { name: 'v3 4K refcount 64', size: 4 * MiB, create: { clusterBits: 12, refcountBits: 64 }, ops: 60, maxLength: 100_000 },
  { name: 'v3 4K refcount 4', size: 3 * MiB, create: { clusterBits: 12, refcountBits: 4 }, ops: 40, maxLength: 100_000 },
  { name: 'v3 4K refcount 8', size: 3 * MiB, create: { clusterBits: 12, refcountBits: 8 }, ops: 40, maxLength: 100_000 },
  { name: 'v3 4K refcount 32', size: 3 * MiB, create: { clusterBits: 12, refcountBits: 32 }, ops: 40, maxLength: 100_000 },
  { name: 'v3 4K refcount 2', size: 4 * MiB, create: { clusterBits: 12, refcountBits: 2 }, ops: 60, maxLength: 100_000 },
  { name: 'v3 2M clusters', size: 12 * MiB, create: { clusterBits: 21 }, ops: 30, maxLength: 3 * MiB },
  { name: 'v3 extended L2 64K + qcow2 backing', size: 6 * MiB, create: { extendedL2: true }, backing: 'qcow2', ops: 80, maxLength: 200_000 },
  { name: 'v3 extended L2 16K', size: 4 * MiB, create: { extendedL2: true, clusterBits: 14 }, ops: 80, maxLength: 60_000 },
  { name: 'v3 512B + qcow2 backing (no room for the feature table)', size: 2 * MiB, create: { clusterBits: 9 }, backing: 'qcow2', ops: 50, maxLength: 40_000 },
  { name: 'v3 4K + qcow2 backing', size: 4 * MiB, create: { clusterBits: 12 }, backing: 'qcow2', ops: 60, maxLength: 100_000 },
  { name: 'v2 64K + raw backing', size: 4 * MiB, create: { version: 2 }, backing: 'raw', ops: 60, maxLength: 300_000 },
  { name: 'v3 4K preallocation=metadata', size: 4 * MiB, create: { clusterBits: 12, preallocation: 'metadata' }, ops: 60, maxLength: 100_000 },
  { name: 'v3 extended L2 32K preallocation=metadata', size: 4 * MiB, create: { clusterBits: 15, extendedL2: true, preallocation: 'metadata' }, ops: 50, maxLength: 100_000 },
  { name: 'v2 4K preallocation=metadata', size: 3 * MiB, create: { version: 2, clusterBits: 12, preallocation: 'metadata' }, ops: 50, maxLength: 100_000 },
  { name: 'v3 lazy refcounts', size: 4 * MiB, create: { lazyRefcounts: true }, ops: 40, maxLength: 300_000 },
];

function fill(random: () => number, length: number): Buffer {
  const out = Buffer.alloc(length);
  // Runs of one byte plus random stretches: cheap to make, and misplaced bytes show.
  for (let i = 0; i < length; ) {
    const run = Math.min(length - i, randomInt(random, 1, 700));
    if (random() < 0.5) out.fill(randomInt(random, 0, 256), i, i + run);
    else for (let j = i; j < i + run; j++) out[j] = randomInt(random, 0, 256);
    i += run;
  }
  return out;
}

async function makeBacking(kind: 'qcow2' | 'raw', size: number, seed: number): Promise<{ path: string; data: Buffer }> {
  const random = seededRandom(seed);
  const data = fill(random, size);
  const raw = join(dir, `backing-${seed}.raw`);
  await writeFile(raw, data);
  if (kind === 'raw') return { path: raw, data };
  const path = join(dir, `backing-${seed}.qcow2`);
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, path]);
  // Leave some of it unallocated (reads zero from the base).
  await qemuIo(path, [`discard 0 ${size / 4}`]);
  data.fill(0, 0, size / 4);
  return { path, data };
}

async function runSequence(image: Qcow2Image, model: Buffer, seed: number, ops: number, maxLength: number, unit: number): Promise<void> {
  const random = seededRandom(seed);
  for (let i = 0; i < ops; i++) {
    const length = randomInt(random, 1, maxLength);
    const offset = randomInt(random, 0, model.length - length);
    const roll = random();
    if (roll < 0.6) {
      const data = fill(random, length);
      await image.write(data, offset);
      data.copy(model, offset);
    } else if (roll < 0.8) {
      await image.writeZeroes(offset, length);
      model.fill(0, offset, offset + length);
    } else {
      await image.discard(offset, length);
      // Fully covered units read as zeros afterwards; partial ones keep their bytes.
      const start = Math.ceil(offset / unit) * unit;
      const end = Math.floor((offset + length) / unit) * unit;
      if (end > start) model.fill(0, start, end);
    }
    if (random() < 0.1) await image.flush();
    if (random() < 0.3) {
      const n = randomInt(random, 1, Math.min(model.length, 300_000));
      const at = randomInt(random, 0, model.length - n);
      const got = Buffer.alloc(n);
      await image.readAt(got, at);
      expect(got.equals(model.subarray(at, at + n)), `read after op ${i} at ${at}+${n}`).toBe(true);
    }
  }
}

async function verifyWithQemu(path: string, model: Buffer): Promise<void> {
  const check = await qemuCheck(path);
  expect({ corruptions: check.corruptions, leaks: check.leaks, checkErrors: check.checkErrors, exitCode: check.exitCode }).toEqual({ corruptions: 0, leaks: 0, checkErrors: 0, exitCode: 0 });
  const raw = await qemuReadRaw(path);
  expect(raw.length).toBe(model.length);
  expect(sha256(raw)).toBe(sha256(model));
}

describe('seeded write sequences match a model and pass qemu-img check', () => {
  modes.forEach((mode, index) => {
    it(mode.name, async () => {
      const path = join(dir, `w${index}.qcow2`);
      let model: Buffer;
      let backing: { path: string; format: 'qcow2' | 'raw' } | undefined;
      if (mode.backing) {
        const made = await makeBacking(mode.backing, mode.size, 1000 + index);
        backing = { path: made.path.slice(dir.length + 1), format: mode.backing };
        model = Buffer.from(made.data);
      } else {
        model = Buffer.alloc(mode.size);
      }
      await createImage({ path, size: mode.size, ...mode.create, backing });
      await verifyWithQemu(path, model);
      const chain = await openChain(path, { writableTop: true, allowedDirectories: [dir] });
      const image = chain.topImage;
      const unit = image.geometry.subclusterSize;
      await runSequence(image, model, index * 7919 + 1, mode.ops, mode.maxLength, unit);
      await chain.close();
      await verifyWithQemu(path, model);
      // Reopen and continue: state read back from disk, not from caches.
      const again = await openChain(path, { writableTop: true });
      await runSequence(again.topImage, model, index * 7919 + 2, Math.ceil(mode.ops / 2), mode.maxLength, unit);
      await again.close();
      await verifyWithQemu(path, model);
    });
  });

  it('refcount table growth (512-byte clusters, 64-bit refcounts)', async () => {
    const path = join(dir, 'grow-reftable.qcow2');
    const size = 6 * MiB;
    await createImage({ path, size, clusterBits: 9, refcountBits: 64 });
    const probe = await Qcow2Image.open(path);
    const before = probe.header;
    await probe.close();
    const image = await Qcow2Image.open(path, { writable: true });
    const model = Buffer.alloc(size);
    const random = seededRandom(77);
    // Fill most of the disk so the file outgrows what one refcount table cluster covers (2 MiB).
    for (let at = 0; at < size; at += 256 * 1024) {
      const data = fill(random, 200 * 1024);
      await image.write(data, at + 1000);
      data.copy(model, at + 1000);
    }
    await runSequence(image, model, 78, 40, 100_000, 512);
    await image.close();
    const after = await Qcow2Image.open(path);
    expect(after.header.refcountTableClusters).toBeGreaterThan(before.refcountTableClusters);
    await after.close();
    await verifyWithQemu(path, model);
  });

  it('L1 table growth (growVirtualSize), then writes past the old end', async () => {
    const path = join(dir, 'grow-l1.qcow2');
    await createImage({ path, size: 1 * MiB, clusterBits: 9 });
    const image = await Qcow2Image.open(path, { writable: true });
    const model = Buffer.alloc(8 * MiB);
    const first = fill(seededRandom(5), 600_000);
    await image.write(first, 300_000);
    first.copy(model, 300_000);
    const l1Before = image.header.l1Size;
    await image.growVirtualSize(8 * MiB);
    expect(image.header.l1Size).toBeGreaterThan(l1Before);
    await runSequence(image, model, 6, 50, 200_000, 512);
    await image.close();
    await verifyWithQemu(path, model);
  });

  it('images with internal snapshots: shared L2 tables and clusters are copied, snapshots unchanged', async () => {
    const path = join(dir, 'snapshots.qcow2');
    await qemuCreate(path, 4 * MiB, { cluster_size: 4096 });
    await qemuIo(path, ['write -P 0x31 0 1M', 'write -P 0x32 2M 1M', 'write -z 1M 64k']);
    await qemuImg(['snapshot', '-c', 's1', path]);
    await qemuIo(path, ['write -P 0x33 512k 1M']);
    await qemuImg(['snapshot', '-c', 's2', path]);
    const snapshotRaws: Buffer[] = [];
    for (const name of ['s1', 's2']) {
      const out = join(dir, `snap-${name}.raw`);
      await qemuImg(['convert', '-O', 'raw', '-l', `snapshot.name=${name}`, path, out]);
      snapshotRaws.push(await readFile(out));
    }
    const model = await qemuReadRaw(path);
    const image = await Qcow2Image.open(path, { writable: true });
    await runSequence(image, model, 4242, 60, 200_000, 4096);
    const released = await image.detachClusters([10, 11, 600]);
    model.fill(0, 10 * 4096, 12 * 4096);
    model.fill(0, 600 * 4096, 601 * 4096);
    await image.releaseHostClusters(released);
    await image.close();
    await verifyWithQemu(path, model);
    for (const [i, name] of ['s1', 's2'].entries()) {
      const out = join(dir, `snap-${name}-after.raw`);
      await qemuImg(['convert', '-O', 'raw', '-l', `snapshot.name=${name}`, path, out]);
      expect((await readFile(out)).equals(snapshotRaws[i]!), `snapshot ${name}`).toBe(true);
    }
  });

  it('concurrent calls: parallel reads and writes are serialized safely', async () => {
    const path = join(dir, 'concurrent.qcow2');
    await createImage({ path, size: 4 * MiB, clusterBits: 12 });
    const image = await Qcow2Image.open(path, { writable: true });
    const model = Buffer.alloc(4 * MiB);
    const random = seededRandom(555);
    // Stable region [0, 1 MiB) written first; then writes to [1 MiB, 4 MiB) race with reads of it.
    const stable = fill(random, MiB);
    await image.write(stable, 0);
    stable.copy(model, 0);
    const jobs: Array<Promise<void>> = [];
    for (let i = 0; i < 40; i++) {
      const length = randomInt(random, 1, 60_000);
      const offset = MiB + i * 70_000 + randomInt(random, 0, 10_000);
      const data = fill(random, length);
      data.copy(model, offset);
      jobs.push(image.write(data, offset));
      if (i % 5 === 0) {
        // The lock is FIFO, so the model can apply each change in call order.
        const from = MiB + i * 70_000 + 60_000;
        model.fill(0, Math.ceil(from / 4096) * 4096, Math.floor((from + 9_000) / 4096) * 4096);
        jobs.push(image.discard(from, 9_000));
      }
      const at = randomInt(random, 0, MiB - 5000);
      jobs.push(
        (async () => {
          const got = Buffer.alloc(5000);
          await image.readAt(got, at);
          expect(got.equals(model.subarray(at, at + 5000))).toBe(true);
        })(),
      );
      if (i % 10 === 9) jobs.push(image.flush());
    }
    await Promise.all(jobs);
    await image.close();
    await verifyWithQemu(path, model);
  });

  it('tiny table caches (eviction on every load) give the same results', async () => {
    for (const [name, extra] of [['standard', {}], ['extended L2', { extendedL2: true, clusterBits: 14 }]] as const) {
      const path = join(dir, `tiny-cache-${name.replace(' ', '-')}.qcow2`);
      await createImage({ path, size: 8 * MiB, clusterBits: 12, ...extra });
      const image = await Qcow2Image.open(path, { writable: true, cacheBytes: 1 });
      const model = Buffer.alloc(8 * MiB);
      await runSequence(image, model, 2024, 80, 300_000, image.geometry.subclusterSize);
      await image.close();
      await verifyWithQemu(path, model);
    }
  });

  it('external data file (plain and raw): writes land at guest offsets, metadata stays clean', async () => {
    for (const rawData of [false, true]) {
      const path = join(dir, `datafile-${rawData}.qcow2`);
      const data = `${path}.data`;
      await qemuCreate(path, 4 * MiB, { data_file: data, data_file_raw: rawData, cluster_size: 4096 });
      await qemuIo(path, ['write -P 0x12 100000 300000', 'write -z 1M 64k']);
      const model = await qemuReadRaw(path);
      const chain = await openChain(path, { writableTop: true, allowedDirectories: [dir] });
      await runSequence(chain.topImage, model, rawData ? 61 : 60, 60, 200_000, 4096);
      if (rawData) {
        await expect(chain.topImage.detachClusters([5, 6])).rejects.toMatchObject({ code: 'qcow2.unsupported-feature' });
      } else {
        expect(await chain.topImage.detachClusters([5, 6])).toEqual([]);
        model.fill(0, 5 * 4096, 7 * 4096);
      }
      await chain.close();
      await verifyWithQemu(path, model);
      if (rawData) {
        const file = await readFile(data);
        const padded = Buffer.alloc(model.length);
        file.copy(padded, 0, 0, Math.min(file.length, model.length));
        expect(sha256(padded)).toBe(sha256(model));
      }
    }
  });

  it('ping-pong: qemu-io and the engine take turns writing the same image', async () => {
    const cases: Array<{ name: string; options: Record<string, string | number | boolean>; backing: boolean }> = [
      { name: 'v3-64k', options: { cluster_size: 65536 }, backing: false },
      { name: 'v3-4k-refcount8', options: { cluster_size: 4096, refcount_bits: 8 }, backing: false },
      { name: 'extl2-backing', options: { cluster_size: 65536, extended_l2: true }, backing: true },
      { name: 'v2-backing', options: { cluster_size: 4096, compat: '0.10' }, backing: true },
    ];
    for (const [caseIndex, c] of cases.entries()) {
      const size = 4 * MiB;
      const path = join(dir, `pingpong-${c.name}.qcow2`);
      let model = Buffer.alloc(size);
      if (c.backing) {
        const made = await makeBacking('qcow2', size, 3000 + caseIndex);
        await qemuCreate(path, size, c.options, { backing: made.path, backingFormat: 'qcow2' });
        model = Buffer.from(made.data);
      } else {
        await qemuCreate(path, size, c.options);
      }
      const random = seededRandom(8000 + caseIndex);
      for (let round = 0; round < 4; round++) {
        const commands: string[] = [];
        for (let i = 0; i < 12; i++) {
          const length = randomInt(random, 1, 200_000);
          const offset = randomInt(random, 0, size - length);
          if (random() < 0.75) {
            const pattern = randomInt(random, 1, 256);
            commands.push(`write -P ${pattern} ${offset} ${length}`);
            model.fill(pattern, offset, offset + length);
          } else {
            commands.push(`write -z${random() < 0.5 ? ' -u' : ''} ${offset} ${length}`);
            model.fill(0, offset, offset + length);
          }
        }
        await qemuIo(path, commands);
        await verifyWithQemu(path, model);
        const chain = await openChain(path, { writableTop: true });
        await runSequence(chain.topImage, model, 9000 + caseIndex * 10 + round, 15, 200_000, chain.topImage.geometry.subclusterSize);
        await chain.close();
        await verifyWithQemu(path, model);
      }
    }
  });

  it('overwriting, zeroing and detaching compressed clusters keeps shared host refcounts exact', async () => {
    const size = 3 * MiB;
    const random = seededRandom(4321);
    const source = Buffer.alloc(size);
    for (let i = 0; i < size; i++) source[i] = random() < 0.7 ? 65 + (i % 7) : randomInt(random, 0, 256);
    const raw = join(dir, 'compress-src.raw');
    await writeFile(raw, source);
    const variants = ['cluster_size=4096', 'cluster_size=65536,compression_type=zstd', 'cluster_size=65536,extended_l2=on'];
    for (const [i, options] of variants.entries()) {
      const path = join(dir, `compressed-${i}.qcow2`);
      await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', options, raw, path]);
      const model = Buffer.from(source);
      const image = await Qcow2Image.open(path, { writable: true });
      expect((await image.mappingOf(0)).kind).toBe('compressed');
      await runSequence(image, model, 700 + i, 40, 150_000, image.geometry.subclusterSize);
      const cs = image.clusterSize;
      const targets = [1, 2, 3].map((k) => Math.floor(size / cs) - k);
      await image.releaseHostClusters(await image.detachClusters(targets));
      for (const c of targets) model.fill(0, c * cs, (c + 1) * cs);
      await image.close();
      await verifyWithQemu(path, model);
    }
  });

  it('qemu-img compare agrees with a raw file of the model', async () => {
    const path = join(dir, 'compare.qcow2');
    await createImage({ path, size: 3 * MiB, clusterBits: 12 });
    const image = await Qcow2Image.open(path, { writable: true });
    const model = Buffer.alloc(3 * MiB);
    await runSequence(image, model, 99, 40, 200_000, 4096);
    await image.close();
    const raw = join(dir, 'compare.raw');
    await writeFile(raw, model);
    await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', path, raw]);
    expect((await readFile(raw)).equals(model)).toBe(true);
  });

  it('qemu can keep writing to an engine-written image, and the engine reads the result', async () => {
    const path = join(dir, 'handoff.qcow2');
    await qemuCreate(path, 4 * MiB, { cluster_size: 4096 });
    const image = await Qcow2Image.open(path, { writable: true });
    const model = Buffer.alloc(4 * MiB);
    await runSequence(image, model, 123, 30, 150_000, 4096);
    await image.close();
    await qemuIo(path, ['write -P 0x5a 100000 300000']);
    model.fill(0x5a, 100000, 400000);
    await verifyWithQemu(path, model);
    const chain = await openChain(path);
    const all = Buffer.alloc(model.length);
    await chain.readAt(all, 0);
    await chain.close();
    expect(sha256(all)).toBe(sha256(model));
  });
});
