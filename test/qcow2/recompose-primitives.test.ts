/**
 * The low-level calls the recompose uses: detachClusters (L2 entries to 0, reads fall through,
 * host clusters only leak until released), releaseHostClusters, setBackingFile; and crash
 * safety of them and of ordinary writes, by stopping the process at every write/fsync.
 */
import { copyFile, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openChain } from '../../src/chain/index.js';
import { FaultInjectingFileSystem, InjectedCrash } from '../../src/io/fault-injection.js';
import { nodeFileSystem } from '../../src/io/host-file.js';
import { createImage, Qcow2Image } from '../../src/qcow2/index.js';
import { qemuCheck, qemuIo, qemuReadRaw, randomInt, seededRandom, sha256, tempDir } from '../helpers/qemu.js';

const MiB = 1 << 20;
const KiB = 1024;
let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-recompose-'));
});
afterAll(async () => cleanup());

/** apps.qcow2 (pattern 0xA1 everywhere) <- user.qcow2 (pattern 0xB2 in clusters 2..9, zeros in 12). */
async function setup(name: string, extendedL2 = false): Promise<{ apps: string; user: string; expectedBefore: Buffer }> {
  const apps = join(dir, `${name}-apps.qcow2`);
  const user = join(dir, `${name}-user.qcow2`);
  await createImage({ path: apps, size: 2 * MiB });
  await qemuIo(apps, ['write -P 0xa1 0 2M']);
  await createImage({ path: user, backing: { path: `${name}-apps.qcow2`, format: 'qcow2' }, extendedL2 });
  const image = await Qcow2Image.open(user, { writable: true });
  await image.write(Buffer.alloc(8 * 64 * KiB, 0xb2), 2 * 64 * KiB);
  await image.writeZeroes(12 * 64 * KiB, 64 * KiB);
  await image.close();
  const expectedBefore = Buffer.alloc(2 * MiB, 0xa1);
  expectedBefore.fill(0xb2, 2 * 64 * KiB, 10 * 64 * KiB);
  expectedBefore.fill(0, 12 * 64 * KiB, 13 * 64 * KiB);
  expect(sha256(await qemuReadRaw(user))).toBe(sha256(expectedBefore));
  return { apps, user, expectedBefore };
}


/**
 * Count the durable operations of `run` on `path`, then for about `samples` of them: restore
 * `pristine`, run again crashing at that operation, and call `after` to judge the stopped image.
 */
async function atSampledCrashPoints(
  path: string,
  pristine: string,
  run: (fs: FaultInjectingFileSystem) => Promise<void>,
  samples: number,
  after: (n: number, total: number) => Promise<void>,
): Promise<void> {
  await copyFile(pristine, path);
  const counter = new FaultInjectingFileSystem(nodeFileSystem);
  await run(counter);
  const total = counter.operations;
  const step = Math.max(1, Math.floor(total / samples));
  for (let n = 1; n <= total; n += step) {
    await copyFile(pristine, path);
    await run(new FaultInjectingFileSystem(nodeFileSystem, { crashAtOperation: n })).catch((e: unknown) => {
      if (!(e instanceof InjectedCrash)) throw e;
    });
    await after(n, total);
  }
}

describe('detachClusters / releaseHostClusters', () => {
  for (const extendedL2 of [false, true]) {
    it(`detached clusters fall through to the backing file, leak until released (extended L2: ${extendedL2})`, async () => {
      const { user, expectedBefore } = await setup(`detach-${extendedL2}`, extendedL2);
      const image = await Qcow2Image.open(user, { writable: true });
      const hosts: number[] = [];
      for (const c of [3, 4, 5]) {
        const m = await image.mappingOf(c * 64 * KiB);
        expect(m.kind).toBe('normal');
        if (m.kind === 'normal') hosts.push(m.hostOffset);
      }
      expect((await image.mappingOf(12 * 64 * KiB)).kind).toBe('zero');
      // Cluster 12 is a zero cluster (no host), cluster 20 was never written.
      const released = await image.detachClusters([3, 4, 5, 12, 20]);
      expect(released.sort()).toEqual(hosts.sort());
      expect((await image.mappingOf(3 * 64 * KiB)).kind).toBe('unallocated');
      await image.close();

      const expectedAfter = Buffer.from(expectedBefore);
      expectedAfter.fill(0xa1, 3 * 64 * KiB, 6 * 64 * KiB);
      expectedAfter.fill(0xa1, 12 * 64 * KiB, 13 * 64 * KiB);
      expect(sha256(await qemuReadRaw(user))).toBe(sha256(expectedAfter));
      const leaking = await qemuCheck(user);
      expect(leaking.corruptions).toBe(0);
      expect(leaking.leaks).toBe(3);

      const again = await Qcow2Image.open(user, { writable: true });
      await again.releaseHostClusters(released);
      await again.close();
      const clean = await qemuCheck(user);
      expect({ corruptions: clean.corruptions, leaks: clean.leaks }).toEqual({ corruptions: 0, leaks: 0 });
      expect(sha256(await qemuReadRaw(user))).toBe(sha256(expectedAfter));
      // The freed clusters are reused by later writes, and stay consistent.
      const chain = await openChain(user, { writableTop: true });
      await chain.topImage.write(Buffer.alloc(3 * 64 * KiB, 0xc3), 20 * 64 * KiB);
      await chain.close();
      expectedAfter.fill(0xc3, 20 * 64 * KiB, 23 * 64 * KiB);
      const final = await qemuCheck(user);
      expect({ corruptions: final.corruptions, leaks: final.leaks }).toEqual({ corruptions: 0, leaks: 0 });
      expect(sha256(await qemuReadRaw(user))).toBe(sha256(expectedAfter));
    });
  }

  it('rejects out-of-range clusters and bad host offsets without writing', async () => {
    const { user } = await setup('args');
    const before = await readFile(user);
    const image = await Qcow2Image.open(user, { writable: true });
    await expect(image.detachClusters([1000])).rejects.toMatchObject({ code: 'qcow2.out-of-range' });
    await expect(image.releaseHostClusters([12345])).rejects.toMatchObject({ code: 'qcow2.bad-argument' });
    await image.close();
    expect((await readFile(user)).equals(before)).toBe(true);
    const readOnly = await Qcow2Image.open(user);
    await expect(readOnly.detachClusters([3])).rejects.toMatchObject({ code: 'qcow2.read-only' });
    await readOnly.close();
  });
});

describe('crash at every write/fsync', () => {
  it('recompose steps (relink, detach, release): every prefix is readable, consistent, and leaks at most', async () => {
    const { apps, user, expectedBefore } = await setup('crash');
    // The new apps layer reads the same as the old one: the relink changes nothing visible.
    const newApps = join(dir, 'crash-apps2.qcow2');
    await copyFile(apps, newApps);
    const expectedAfter = Buffer.from(expectedBefore);
    expectedAfter.fill(0xa1, 3 * 64 * KiB, 6 * 64 * KiB);
    const pristine = join(dir, 'crash-pristine.qcow2');
    await copyFile(user, pristine);

    const run = async (fs: FaultInjectingFileSystem) => {
      const image = await Qcow2Image.open(user, { writable: true, fs });
      try {
        await image.setBackingFile('crash-apps2.qcow2', 'qcow2');
        const released = await image.detachClusters([3, 4, 5]);
        await image.releaseHostClusters(released);
      } finally {
        await image.close().catch(() => undefined);
      }
    };
    const counter = new FaultInjectingFileSystem(nodeFileSystem);
    await run(counter);
    const total = counter.operations;
    expect(total).toBeGreaterThan(4);
    for (let n = 1; n <= total + 1; n++) {
      await copyFile(pristine, user);
      const fs = new FaultInjectingFileSystem(nodeFileSystem, { crashAtOperation: n });
      await run(fs).catch((e: unknown) => {
        if (!(e instanceof InjectedCrash)) throw e;
      });
      const check = await qemuCheck(user);
      expect(check.corruptions, `crash at ${n}`).toBe(0);
      const hash = sha256(await qemuReadRaw(user));
      expect([sha256(expectedBefore), sha256(expectedAfter)], `crash at ${n}`).toContain(hash);
      // Rerunning completes it.
      const rerun = await Qcow2Image.open(user, { writable: true });
      await rerun.setBackingFile('crash-apps2.qcow2', 'qcow2');
      await rerun.detachClusters([3, 4, 5]);
      await rerun.close();
      expect(sha256(await qemuReadRaw(user))).toBe(sha256(expectedAfter));
    }
  });

  it('refcount table growth and L1 growth: a crash anywhere leaves no corruption', async () => {
    const path = join(dir, 'crash-grow.qcow2');
    await createImage({ path, size: 1 * MiB, clusterBits: 9, refcountBits: 64 });
    const pristine = join(dir, 'crash-grow-pristine.qcow2');
    await copyFile(path, pristine);
    const run = async (fs: FaultInjectingFileSystem) => {
      const image = await Qcow2Image.open(path, { writable: true, fs });
      try {
        await image.write(Buffer.alloc(900 * KiB, 0x41), 10_000);
        await image.flush();
        await image.growVirtualSize(4 * MiB);
        // 64 refcounts per 512-byte block: past ~2 MiB of file the refcount table must grow.
        await image.write(Buffer.alloc(2 * MiB, 0x42), 1.5 * MiB);
        await image.flush();
      } finally {
        await image.close().catch(() => undefined);
      }
    };
    const counter = new FaultInjectingFileSystem(nodeFileSystem);
    await run(counter);
    const grown = await Qcow2Image.open(path);
    expect(grown.header.refcountTableClusters).toBeGreaterThan(1);
    expect(grown.size).toBe(4 * MiB);
    await grown.close();
    const total = counter.operations;
    const step = Math.max(1, Math.floor(total / 50));
    for (let n = 1; n <= total; n += step) {
      await copyFile(pristine, path);
      await run(new FaultInjectingFileSystem(nodeFileSystem, { crashAtOperation: n })).catch((e: unknown) => {
        if (!(e instanceof InjectedCrash)) throw e;
      });
      const check = await qemuCheck(path);
      expect(check.corruptions, `crash at ${n} of ${total}`).toBe(0);
    }
  });

  it('writes to an image with a snapshot (shared tables) and with extended L2: crash anywhere, no corruption, snapshot intact', async () => {
    const { qemuCreate, qemuImg } = await import('../helpers/qemu.js');
    for (const [name, options] of [['snap', { cluster_size: 4096 }], ['extl2', { cluster_size: 32768, extended_l2: true }]] as const) {
      const path = join(dir, `crash-${name}.qcow2`);
      await qemuCreate(path, 2 * MiB, options);
      await qemuIo(path, ['write -P 0x51 0 1M', 'write -z 1M 100k']);
      await qemuImg(['snapshot', '-c', 'keep', path]);
      const snapshotOut = join(dir, `crash-${name}-snap.raw`);
      await qemuImg(['convert', '-O', 'raw', '-l', 'snapshot.name=keep', path, snapshotOut]);
      const snapshotHash = sha256(await readFile(snapshotOut));
      const pristine = join(dir, `crash-${name}-pristine.qcow2`);
      await copyFile(path, pristine);
      const run = async (fs: FaultInjectingFileSystem) => {
        const image = await Qcow2Image.open(path, { writable: true, fs });
        const random = seededRandom(name.length);
        try {
          for (let i = 0; i < 8; i++) {
            const length = randomInt(random, 1, 200_000);
            const offset = randomInt(random, 0, 2 * MiB - length);
            if (i % 3 === 2) await image.writeZeroes(offset, length);
            else await image.write(Buffer.alloc(length, 0x60 + i), offset);
          }
          await image.releaseHostClusters(await image.detachClusters([2, 3]));
        } finally {
          await image.close().catch(() => undefined);
        }
      };
      await atSampledCrashPoints(path, pristine, run, 30, async (n, total) => {
        const check = await qemuCheck(path);
        expect(check.corruptions, `${name}: crash at ${n} of ${total}`).toBe(0);
        await qemuImg(['convert', '-O', 'raw', '-l', 'snapshot.name=keep', path, snapshotOut]);
        expect(sha256(await readFile(snapshotOut)), `${name}: snapshot after crash at ${n}`).toBe(snapshotHash);
      });
    }
  });

  it('ordinary writes: a crash anywhere leaves no corruption (only leaks)', async () => {
    const path = join(dir, 'crash-writes.qcow2');
    await createImage({ path, size: 4 * MiB, clusterBits: 9, refcountBits: 8 });
    const pristine = join(dir, 'crash-writes-pristine.qcow2');
    await copyFile(path, pristine);
    const run = async (fs: FaultInjectingFileSystem) => {
      const image = await Qcow2Image.open(path, { writable: true, fs });
      const random = seededRandom(31);
      try {
        for (let i = 0; i < 12; i++) {
          const length = randomInt(random, 1, 150_000);
          const offset = randomInt(random, 0, 4 * MiB - length);
          if (i % 4 === 3) await image.discard(offset, length);
          else await image.write(Buffer.alloc(length, i + 1), offset);
          if (i % 3 === 2) await image.flush();
        }
      } finally {
        await image.close().catch(() => undefined);
      }
    };
    await atSampledCrashPoints(path, pristine, run, 60, async (n, total) => {
      const check = await qemuCheck(path);
      expect(check.corruptions, `crash at ${n} of ${total}`).toBe(0);
      const image = await Qcow2Image.open(path);
      await image.readAt(Buffer.alloc(4 * MiB), 0);
      await image.close();
    });
  });
});
