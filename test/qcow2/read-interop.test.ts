/**
 * Read interop matrix: images built by qemu-img/qemu-io in every format variant the engine
 * claims to read; for each, the engine's view of the whole disk must hash the same as
 * `qemu-img convert -O raw` of it.
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openChain } from '../../src/chain/index.js';
import { Incompatible, Qcow2Image } from '../../src/qcow2/index.js';
import type { ByteSource } from '../../src/io/byte-source.js';
import { qemuCreate, qemuImg, qemuIo, qemuReadRaw, qemuInfo, seededRandom, randomInt, sha256, tempDir } from '../helpers/qemu.js';

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-read-'));
  // A seeded random pattern file for `write -s`.
  const random = seededRandom(99);
  const bytes = Buffer.alloc(1 << 20);
  for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(random() * 256);
  await writeFile(join(dir, 'pattern.bin'), bytes);
});
afterAll(async () => cleanup());

const MiB = 1 << 20;

/** qemu-io commands writing seeded data at seeded (often unaligned) offsets. */
function randomWrites(seed: number, size: number, count: number, options: { maxLength?: number; zeroes?: boolean; discards?: boolean; compressedCluster?: number } = {}): string[] {
  const random = seededRandom(seed);
  const commands: string[] = [];
  const maxLength = options.maxLength ?? 300_000;
  for (let i = 0; i < count; i++) {
    const length = randomInt(random, 1, maxLength);
    const offset = randomInt(random, 0, size - length);
    const roll = random();
    if (options.zeroes && roll < 0.2) commands.push(`write -z ${offset} ${length}`);
    else if (options.discards && roll < 0.35) commands.push(`discard ${offset} ${length}`);
    else if (roll < 0.6) commands.push(`write -P ${randomInt(random, 1, 256)} ${offset} ${length}`);
    else commands.push(`write -s ${join(dir, 'pattern.bin')} ${offset} ${Math.min(length, MiB)}`);
  }
  return commands;
}

async function hashOf(source: ByteSource): Promise<string> {
  const whole = Buffer.alloc(source.size);
  // Mixed chunk sizes so reads start and end inside clusters.
  const random = seededRandom(source.size);
  for (let at = 0; at < source.size; ) {
    const n = Math.min(source.size - at, randomInt(random, 1, 3 * MiB));
    await source.readAt(whole.subarray(at, at + n), at);
    at += n;
  }
  return sha256(whole);
}

async function expectSameAsQemu(path: string, options: { assumeBackingFormat?: 'qcow2' | 'raw' } = {}): Promise<void> {
  const chain = await openChain(path, options);
  try {
    const ours = await hashOf(chain);
    const theirs = sha256(await qemuReadRaw(path));
    expect(ours).toBe(theirs);
  } finally {
    await chain.close();
  }
}

let counter = 0;
function fresh(name: string): string {
  counter += 1;
  return join(dir, `${counter}-${name}`);
}

describe('reads agree with qemu-img convert -O raw', () => {
  for (const version of ['0.10', '1.1'] as const) {
    for (const clusterSize of [512, 4096, 65536, 2 * MiB]) {
      it(`compat=${version} cluster_size=${clusterSize}`, async () => {
        const path = fresh('img.qcow2');
        const size = 6 * MiB;
        await qemuCreate(path, size, { compat: version, cluster_size: clusterSize });
        await qemuIo(path, randomWrites(clusterSize + (version === '1.1' ? 1 : 0), size, 30, { zeroes: version === '1.1', discards: true }));
        await expectSameAsQemu(path);
      });
    }
  }

  for (const refcountBits of [1, 2, 4, 8, 16, 32, 64]) {
    it(`refcount_bits=${refcountBits}`, async () => {
      const path = fresh('rc.qcow2');
      await qemuCreate(path, 4 * MiB, { refcount_bits: refcountBits, cluster_size: 4096 });
      await qemuIo(path, randomWrites(refcountBits, 4 * MiB, 20, { discards: true }));
      await expectSameAsQemu(path);
    });
  }

  it('zero clusters: write -z over data, with and without a backing file', async () => {
    const base = fresh('zb.qcow2');
    await qemuCreate(base, 4 * MiB, {});
    await qemuIo(base, ['write -P 0x11 0 4M']);
    const top = fresh('zt.qcow2');
    await qemuCreate(top, 4 * MiB, {}, { backing: base, backingFormat: 'qcow2' });
    await qemuIo(top, ['write -P 0x22 0 1M', 'write -z 64k 256k', 'write -z -u 1M 512k', 'write -z 2M 100000']);
    const image = await Qcow2Image.open(top);
    expect((await image.mappingOf(128 * 1024)).kind).toBe('zero');
    await image.close();
    await expectSameAsQemu(top);
  });

  it('preallocation=metadata and falloc', async () => {
    for (const preallocation of ['metadata', 'falloc']) {
      const path = fresh(`pre-${preallocation}.qcow2`);
      await qemuCreate(path, 4 * MiB, { preallocation });
      await qemuIo(path, randomWrites(7, 4 * MiB, 10, { zeroes: true }));
      await expectSameAsQemu(path);
    }
  });

  it('discarded clusters', async () => {
    const path = fresh('discard.qcow2');
    await qemuCreate(path, 4 * MiB, { cluster_size: 4096 });
    await qemuIo(path, ['write -P 5 0 4M', 'discard 4096 1M', 'discard 3M 12345']);
    await expectSameAsQemu(path);
  });

  for (const compression of ['zlib', 'zstd']) {
    it(`compressed clusters (${compression}) via convert -c and write -c`, async () => {
      const raw = fresh('src.raw');
      const random = seededRandom(compression.length);
      const data = Buffer.alloc(3 * MiB);
      // Compressible text-like data, some random, some zero.
      for (let i = 0; i < MiB; i++) data[i] = 97 + Math.floor(random() * 8);
      for (let i = MiB; i < 2 * MiB - 4096; i++) data[i] = Math.floor(random() * 256);
      await writeFile(raw, data);
      for (const clusterSize of [4096, 65536]) {
        const path = fresh('comp.qcow2');
        await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${compression},cluster_size=${clusterSize}`, raw, path]);
        await qemuIo(path, [`write -c -P 0x61 ${2 * MiB} ${clusterSize}`, `write -P 3 ${MiB / 2 + 100} 5000`]);
        const image = await Qcow2Image.open(path);
        expect((await image.mappingOf(0)).kind).toBe('compressed');
        await image.close();
        await expectSameAsQemu(path);
      }
    });
  }

  it('extended L2 entries, with subclusters falling through to a backing file', async () => {
    const base = fresh('xb.qcow2');
    await qemuCreate(base, 4 * MiB, {});
    await qemuIo(base, ['write -P 0x44 0 4M']);
    for (const clusterSize of [16384, 65536, 2 * MiB]) {
      const top = fresh('xt.qcow2');
      await qemuCreate(top, 4 * MiB, { extended_l2: true, cluster_size: clusterSize }, { backing: base, backingFormat: 'qcow2' });
      // (A compressed write needs the cluster to shrink; 2 MiB clusters are left uncompressed.)
      const compressed = clusterSize < 2 * MiB ? [`write -c -P 9 ${2 * MiB} ${clusterSize}`] : [];
      await qemuIo(top, [...randomWrites(clusterSize, 4 * MiB, 25, { maxLength: 40_000, zeroes: true, discards: true }), ...compressed]);
      const image = await Qcow2Image.open(top);
      expect(image.header.incompatibleFeatures & Incompatible.extendedL2).toBe(Incompatible.extendedL2);
      await image.close();
      await expectSameAsQemu(top);
    }
  });

  it('lazy refcounts, clean and dirty (qemu-io killed by SIGKILL)', async () => {
    const clean = fresh('lazy-clean.qcow2');
    await qemuCreate(clean, 4 * MiB, { lazy_refcounts: true });
    await qemuIo(clean, randomWrites(3, 4 * MiB, 10));
    await expectSameAsQemu(clean);
    const dirty = fresh('lazy-dirty.qcow2');
    await qemuCreate(dirty, 4 * MiB, { lazy_refcounts: true });
    await qemuIo(dirty, [...randomWrites(4, 4 * MiB, 10), 'sigraise 9'], { okCodes: [137, -1, 9] }).catch(() => undefined);
    const image = await Qcow2Image.open(dirty);
    expect(image.header.incompatibleFeatures & Incompatible.dirty).toBe(Incompatible.dirty);
    await image.close();
    await expect(Qcow2Image.open(dirty, { writable: true })).rejects.toMatchObject({ code: 'qcow2.dirty' });
    await expectSameAsQemu(dirty);
  });

  it('internal snapshots: list them and read each view', async () => {
    const path = fresh('snap.qcow2');
    await qemuCreate(path, 4 * MiB, { cluster_size: 4096 });
    await qemuIo(path, randomWrites(11, 4 * MiB, 10));
    await qemuImg(['snapshot', '-c', 'first', path]);
    await qemuIo(path, randomWrites(12, 4 * MiB, 10));
    await qemuImg(['snapshot', '-c', 'second', path]);
    await qemuIo(path, randomWrites(13, 4 * MiB, 10, { discards: true }));
    const image = await Qcow2Image.open(path);
    const snapshots = await image.snapshots();
    expect(snapshots.map((s) => s.name)).toEqual(['first', 'second']);
    expect(snapshots[0]!.diskSize).toBe(4 * MiB);
    for (const name of ['first', 'second']) {
      const view = await image.snapshotView(name);
      const out = fresh(`${name}.raw`);
      await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', '-l', `snapshot.name=${name}`, path, out]);
      const { readFile } = await import('node:fs/promises');
      expect(await hashOf(view)).toBe(sha256(await readFile(out)));
    }
    await expect(image.snapshotView('nope')).rejects.toMatchObject({ code: 'qcow2.no-such-snapshot' });
    await image.close();
    await expectSameAsQemu(path);
  });

  it('external data file (and raw external data)', async () => {
    for (const rawData of [false, true]) {
      const path = fresh('ext.qcow2');
      const data = `${path}.data`;
      await qemuCreate(path, 4 * MiB, { data_file: data, data_file_raw: rawData });
      await qemuIo(path, randomWrites(rawData ? 21 : 20, 4 * MiB, 15, { zeroes: true }));
      const image = await Qcow2Image.open(path);
      expect(image.externalDataFile).toBe(data);
      await image.close();
      await expectSameAsQemu(path);
    }
  });

  it('persistent bitmaps present', async () => {
    const path = fresh('bitmap.qcow2');
    await qemuCreate(path, 4 * MiB, {});
    await qemuIo(path, randomWrites(30, 4 * MiB, 5));
    await qemuImg(['bitmap', '--add', path, 'b0']);
    await qemuImg(['bitmap', '--add', path, 'b1', '-g', '128k']);
    const info = await qemuInfo(path);
    expect(JSON.stringify(info)).toContain('b1');
    await expectSameAsQemu(path);
    await expect(Qcow2Image.open(path, { writable: true })).rejects.toMatchObject({ code: 'qcow2.bitmaps-present' });
  });

  it('backing chains: qcow2 and raw, relative names, larger and smaller overlays', async () => {
    const base = fresh('base.raw');
    const random = seededRandom(5);
    const baseData = Buffer.alloc(3 * MiB + 512);
    for (let i = 0; i < baseData.length; i += 4096) baseData.fill(Math.floor(random() * 256), i, Math.min(baseData.length, i + 4096));
    await writeFile(base, baseData);
    const mid = fresh('mid.qcow2');
    // Relative backing name: stored as the file's basename, resolved against the image's folder.
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base.slice(dir.length + 1), '-F', 'raw', mid, String(5 * MiB)]);
    await qemuIo(mid, randomWrites(40, 5 * MiB, 10));
    const smaller = fresh('small.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', mid.slice(dir.length + 1), '-F', 'qcow2', smaller, String(2 * MiB)]);
    await qemuIo(smaller, randomWrites(41, 2 * MiB, 5));
    const larger = fresh('large.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', mid, '-F', 'qcow2', larger, String(8 * MiB)]);
    await qemuIo(larger, randomWrites(42, 8 * MiB, 10));
    for (const top of [mid, smaller, larger]) await expectSameAsQemu(top);
    // One layer alone, against qemu with the backing link cut (backing: null).
    for (const top of [mid, larger]) {
      const image = await Qcow2Image.open(top);
      const ours = Buffer.alloc(image.size);
      await image.readLayerAt(ours, 0);
      await image.close();
      const out = `${top}.layer.raw`;
      await qemuImg(['convert', '-O', 'raw', `json:{"driver":"qcow2","file":{"driver":"file","filename":${JSON.stringify(top)}},"backing":null}`, out]);
      const { readFile } = await import('node:fs/promises');
      expect(sha256(ours)).toBe(sha256(await readFile(out)));
    }
    const chain = await openChain(larger);
    expect(chain.layers.map((l) => l.format)).toEqual(['qcow2', 'qcow2', 'raw']);
    expect(chain.layers[1]!.image!.writable).toBe(false);
    await chain.close();
  });
});
