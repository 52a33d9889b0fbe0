/**
 * check against qemu-img check: the same JSON (counts included) on clean images qemu-img
 * built, and on copies damaged by poking bytes (a leak, a refcount too low, a cleared COPIED
 * flag, a lost refcount block). After our --repair, qemu-img check must find the image clean
 * and the guest content must be unchanged.
 */
import { copyFile, open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkExitCode, toQemuJson } from '../../src/qcow2/check.js';
import { entryOffset } from '../../src/qcow2/layout.js';
import { checkImage } from '../../src/qcow2/repair.js';
import { qemuCheck, qemuCompare, qemuCreate, qemuImg, qemuIo, randomInt, seededRandom, tempDir } from '../helpers/qemu.js';
import { infoImage } from '../../src/chain/info.js';
import { buildFixtures, type Fixture } from './fixtures.js';
import { layoutOf, pokeLeak, setStoredRefcount } from './poke.js';

let dir: string;
let cleanup: () => Promise<void>;
let fixtures: Fixture[] = [];

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-ops-check-'));
  fixtures = await buildFixtures(dir);
});
afterAll(async () => cleanup());

/** Host offset of the first allocated data cluster and the file offset of its L2 entry. */
async function firstDataCluster(path: string): Promise<{ host: number; entryAt: number }> {
  const { handle, header, g } = await layoutOf(path);
  try {
    const l1 = Buffer.alloc(header.l1Size * 8);
    await handle.read(l1, 0, l1.length, header.l1TableOffset);
    for (let i = 0; i < header.l1Size; i += 1) {
      const l2 = entryOffset(l1.readUInt32BE(i * 8), l1.readUInt32BE(i * 8 + 4));
      if (l2 === 0) continue;
      const table = Buffer.alloc(g.clusterSize);
      await handle.read(table, 0, table.length, l2);
      for (let j = 0; j < g.l2Entries; j += 1) {
        const host = entryOffset(table.readUInt32BE(j * 8), table.readUInt32BE(j * 8 + 4));
        if (host !== 0 && (table.readUInt32BE(j * 8) & 0x40000000) === 0) return { host, entryAt: l2 + j * 8 };
      }
    }
    throw new Error(`${path} has no data cluster`);
  } finally {
    await handle.close();
  }
}

async function expectSameAsQemu(path: string): Promise<number> {
  const theirs = await qemuCheck(path);
  const ours = await checkImage(path);
  expect(toQemuJson(ours), path).toEqual(theirs.raw);
  expect(checkExitCode(ours), path).toBe(theirs.exitCode);
  return theirs.exitCode;
}

async function damagedCopy(name: string, fixture: string): Promise<{ path: string; original: string }> {
  const original = fixtures.find((f) => f.name === fixture)!.path;
  const path = join(dir, `${name}.qcow2`);
  await copyFile(original, path);
  return { path, original };
}

describe('check on clean images', () => {
  it('reports what qemu-img check reports, for every fixture and every layer of the chain', async () => {
    for (const fixture of fixtures) expect(await expectSameAsQemu(fixture.path), fixture.name).toBe(0);
    for (const layer of ['l1.qcow2', 'l2.qcow2']) expect(await expectSameAsQemu(join(dir, layer))).toBe(0);
  });

  it('counts fragmentation like qemu-img on an image written in random order', async () => {
    const path = join(dir, 'fragmented.qcow2');
    await qemuCreate(path, '32M');
    const writes: string[] = [];
    for (let i = 0; i < 64; i += 1) writes.push(`write -P ${i} ${((i * 37) % 64) * 128}k 64k`);
    await qemuIo(path, writes);
    await expectSameAsQemu(path);
    expect(toQemuJson(await checkImage(path))['fragmented-clusters']).toBeGreaterThan(0);
  });
});

describe('check and repair on damaged images', () => {
  for (const fixtureName of ['v3', 'cluster 4k, refcount 1', 'cluster 2M, refcount 64', 'snapshots']) {
    it(`finds and repairs a leak (${fixtureName})`, async () => {
      const { path, original } = await damagedCopy(`leak-${fixtureName.replace(/\W+/g, '-')}`, fixtureName);
      await pokeLeak(path);
      expect(await expectSameAsQemu(path)).toBe(3);
      const repaired = await checkImage(path, { repair: 'leaks' });
      expect(repaired.leaksFixed).toBe(1);
      expect(checkExitCode(repaired)).toBe(0);
      const after = await qemuCheck(path);
      expect(after.exitCode).toBe(0);
      expect(after.leaks + after.corruptions).toBe(0);
      expect(await qemuCompare(path, original, 'qcow2', 'qcow2')).toBe(true);
    });
  }

  for (const fixtureName of ['v3', 'cluster 4k, refcount 1', 'extended L2']) {
    it(`finds a refcount that is too low and repairs it with -r all (${fixtureName})`, async () => {
      const { path, original } = await damagedCopy(`low-${fixtureName.replace(/\W+/g, '-')}`, fixtureName);
      const { host } = await firstDataCluster(path);
      const { g, handle } = await layoutOf(path);
      await handle.close();
      await setStoredRefcount(path, host / g.clusterSize, 0);
      expect(await expectSameAsQemu(path)).toBe(2);
      // -r leaks must not touch it: still corrupt.
      expect(checkExitCode(await checkImage(path, { repair: 'leaks' }))).toBe(2);
      const repaired = await checkImage(path, { repair: 'all' });
      expect(repaired.corruptionsFixed).toBeGreaterThan(0);
      expect(checkExitCode(repaired)).toBe(0);
      expect((await qemuCheck(path)).exitCode).toBe(0);
      expect(await qemuCompare(path, original, 'qcow2', 'qcow2')).toBe(true);
    });
  }

  it('finds a cleared COPIED flag and sets it again', async () => {
    const { path, original } = await damagedCopy('copied', 'v3');
    const { entryAt } = await firstDataCluster(path);
    const handle = await open(path, 'r+');
    const word = Buffer.alloc(4);
    await handle.read(word, 0, 4, entryAt);
    word.writeUInt32BE(word.readUInt32BE(0) & 0x7fffffff, 0);
    await handle.write(word, 0, 4, entryAt);
    await handle.close();
    expect(await expectSameAsQemu(path)).toBe(2);
    const repaired = await checkImage(path, { repair: 'all' });
    expect(repaired.corruptionsFixed).toBe(1);
    expect((await qemuCheck(path)).exitCode).toBe(0);
    expect(await qemuCompare(path, original, 'qcow2', 'qcow2')).toBe(true);
  });

  it('rebuilds the refcount structure when a refcount block is lost', async () => {
    const { path, original } = await damagedCopy('lost-block', 'snapshots');
    const { handle, header } = await layoutOf(path);
    await handle.write(Buffer.alloc(8), 0, 8, header.refcountTableOffset);
    await handle.close();
    const theirs = await qemuCheck(path);
    expect(theirs.exitCode).toBe(2);
    expect(checkExitCode(await checkImage(path))).toBe(2);
    const repaired = await checkImage(path, { repair: 'all' });
    expect(checkExitCode(repaired)).toBe(0);
    const after = await qemuCheck(path);
    expect(after.exitCode).toBe(0);
    expect(after.leaks + after.corruptions).toBe(0);
    expect(await qemuCompare(path, original, 'qcow2', 'qcow2')).toBe(true);
    // Snapshots survive the rebuild: the first one still reads as it did.
    const snapshotOf = async (image: string) => {
      const out = join(dir, `${image.endsWith('lost-block.qcow2') ? 'ours' : 'orig'}-first.qcow2`);
      await qemuImg(['convert', '-l', 'snapshot.name=first', '-O', 'qcow2', image, out]);
      return out;
    };
    expect(await qemuCompare(await snapshotOf(path), await snapshotOf(original), 'qcow2', 'qcow2')).toBe(true);
  });

  it('refuses (exit 1, like qemu-img) a snapshot table entry with an absurd size, without allocating it', async () => {
    const { path } = await damagedCopy('bad-snapshot', 'snapshots');
    const { handle, header } = await layoutOf(path);
    const size = Buffer.alloc(4);
    size.writeUInt32BE(0xffffffff, 0);
    await handle.write(size, 0, 4, header.snapshotsOffset + 36);
    await handle.close();
    expect((await qemuCheck(path).catch(() => ({ exitCode: 1 }))).exitCode).toBe(1);
    await expect(checkImage(path)).rejects.toMatchObject({ code: 'qcow2.corrupt' });
  });

  it('checks a dirty lazy-refcounts image like qemu-img, and a full repair makes it clean and not dirty', async () => {
    const path = join(dir, 'dirty.qcow2');
    await qemuCreate(path, '16M', { lazy_refcounts: true });
    // qemu-io's abort leaves the image dirty with refcounts never written back.
    await qemuIo(path, ['write -P 1 0 1M', 'write -P 2 4M 64k', 'abort'], { okCodes: [0, 134, -1, 1] }).catch(() => undefined);
    const raw = join(dir, 'dirty-content.raw');
    await qemuImg(['convert', '-O', 'raw', path, raw]);
    expect((await infoImage(path))[0]!['dirty-flag']).toBe(true);
    expect(await expectSameAsQemu(path)).toBe(2);
    expect(checkExitCode(await checkImage(path, { repair: 'all' }))).toBe(0);
    expect((await infoImage(path))[0]!['dirty-flag']).toBe(false);
    expect((await qemuCheck(path)).exitCode).toBe(0);
    expect(await qemuCompare(path, raw, 'qcow2', 'raw')).toBe(true);
  });
});

describe('check on randomly damaged metadata', () => {
  it('gives the same JSON and exit code as qemu-img, and repairs what it repairs, for 120 single-bit flips in the refcount table, refcount block, L1 and L2 tables', async () => {
    const random = seededRandom(20261124);
    const source = fixtures.find((f) => f.name === 'v3')!.path;
    const { handle, header, g, block0, length } = await layoutOf(source);
    await handle.close();
    // Where the metadata is: refcount table, refcount block 0, L1 table and the L2 tables.
    const l1 = Buffer.alloc(header.l1Size * 8);
    const h = await open(source, 'r');
    await h.read(l1, 0, l1.length, header.l1TableOffset);
    await h.close();
    const regions: Array<[number, number]> = [
      [header.refcountTableOffset, 64 * 8],
      [block0, Math.min(g.clusterSize, Math.ceil(length / g.clusterSize) * 2)],
      [header.l1TableOffset, l1.length],
    ];
    for (let i = 0; i < header.l1Size; i += 1) {
      const l2 = entryOffset(l1.readUInt32BE(i * 8), l1.readUInt32BE(i * 8 + 4));
      if (l2 !== 0) regions.push([l2, g.clusterSize]);
    }
    let compared = 0;
    let repaired = 0;
    for (let round = 0; round < 120; round += 1) {
      const [start, size] = regions[randomInt(random, 0, regions.length)]!;
      const at = start + randomInt(random, 0, Math.floor(size / 8)) * 8;
      const bit = randomInt(random, 0, 64);
      const path = join(dir, 'fuzz.qcow2');
      await copyFile(source, path);
      const f = await open(path, 'r+');
      const word = Buffer.alloc(8);
      await f.read(word, 0, 8, at);
      word.writeBigUInt64BE(word.readBigUInt64BE(0) ^ (1n << BigInt(bit)), 0);
      await f.write(word, 0, 8, at);
      await f.close();
      const theirs = await qemuCheck(path).catch(() => null);
      if (!theirs || theirs.exitCode === 1) {
        await expect(checkImage(path), `flip 0x${at.toString(16)} bit ${bit}`).rejects.toThrow();
        continue;
      }
      const ours = await checkImage(path);
      expect(toQemuJson(ours), `flip 0x${at.toString(16)} bit ${bit}`).toEqual(theirs.raw);
      expect(checkExitCode(ours)).toBe(theirs.exitCode);
      compared += 1;
      if (theirs.exitCode === 0) continue;
      // Whatever qemu-img check -r all can repair, ours must repair too.
      const copy = join(dir, 'fuzz-qemu.qcow2');
      await copyFile(path, copy);
      await qemuImg(['check', '-r', 'all', copy], [0, 1, 2, 3]);
      if ((await qemuCheck(copy)).exitCode !== 0) continue;
      await checkImage(path, { repair: 'all' });
      expect((await qemuCheck(path)).exitCode, `repair of flip 0x${at.toString(16)} bit ${bit}`).toBe(0);
      repaired += 1;
    }
    expect(compared).toBeGreaterThan(100);
    expect(repaired).toBeGreaterThan(10);
  });
});
