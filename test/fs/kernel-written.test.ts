/**
 * A filesystem written by the Linux kernel, not by e2fsprogs: the test guest (vm-fixtures) boots
 * from base <- user, creates through its guest agent a 3,000-entry directory (the kernel turns it
 * into an htree), random, sparse, fallocated (unwritten), interleaved-append (fragmented) and
 * tiny files, nested directories and symlinks; syncs, remounts read-only and powers off. The
 * reader then reads the qcow2 chain directly and must agree with debugfs on a raw export.
 * Boots a guest under TCG (about 10-30 s).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dirname, join } from 'node:path';
import { ensureFixture } from '../../src/virt/fixture.js';
import { openChain, type Chain } from '../../src/chain/index.js';
import { openGuestFilesystem, type GuestFilesystem } from '../../src/fs/index.js';
import { Ext4Filesystem } from '../../src/fs/ext4/filesystem.js';
import { qemuImg, tempDir } from '../helpers/qemu.js';
import { debugfsOne, oracleDump, oracleExtents, oracleLs } from './e2fs.js';
import { bootFixtureOverlay } from '../e2e/guest-helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let raw: string;
let chain: Chain;
let fs: GuestFilesystem;

const SCRIPT = `
set -e
mkdir -p /data/big /data/nest/a/b
cd /data/big
i=0; while [ $i -lt 3000 ]; do : > entry-$i; i=$((i+1)); done
cd /data
dd if=/dev/urandom of=rand bs=4096 count=300 2>/dev/null
dd if=/dev/urandom of=sparse bs=4096 count=3 seek=1000 2>/dev/null
fallocate -l 1048576 prealloc
dd if=/dev/urandom of=half bs=4096 count=10 2>/dev/null
fallocate -o 40960 -l 409600 half
i=0; while [ $i -lt 40 ]; do
  dd if=/dev/urandom bs=4096 count=1 2>/dev/null >> fragA; sync fragA
  dd if=/dev/urandom bs=4096 count=1 2>/dev/null >> fragB; sync fragB
  i=$((i+1)); done
echo tiny > tiny
echo deep > nest/a/b/file
ln -s ../../rand nest/a/rel
ln -s /data/nest/a/b/file nest/abs
sync
mount -o remount,ro /
`;

beforeAll(async () => {
  const fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-fs-kernel-'));
  const { guest, overlay } = await bootFixtureOverlay(fixture, dir, `fs-kernel-${process.pid}`);
  try {
    const result = await guest.agent.exec('/bin/sh', ['-c', SCRIPT], { timeoutMs: 240_000 });
    expect(result, result.stderr).toMatchObject({ exitCode: 0 });
  } finally {
    await guest.destroy();
  }
  raw = join(dir, 'export.raw');
  await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', overlay, raw]);
  // The overlay lives in a scratch folder over the cached fixture base: allow that base's folder.
  chain = await openChain(overlay, { allowedDirectories: [dirname(fixture.images.base.path)] });
  fs = await openGuestFilesystem(chain);
}, 600_000);

afterAll(async () => {
  await chain?.close();
  if (process.env.QLAYER_KEEP_TEST_FILES) console.log(`kept ${dir}`);
  else await cleanup?.();
});

const FILES = ['/data/rand', '/data/sparse', '/data/prealloc', '/data/half', '/data/fragA', '/data/fragB', '/data/tiny', '/data/nest/a/b/file'];

describe('a kernel-written ext4, read from the qcow2 chain', () => {
  it('files: extents and bytes equal debugfs on the raw export', async () => {
    for (const path of FILES) {
      expect(await fs.extents(path), path).toEqual(await oracleExtents(raw, path, fs.blockSize));
      expect((await fs.readFile(path)).equals(await oracleDump(raw, path, dir)), path).toBe(true);
    }
    expect((await fs.extents('/data/prealloc')).every((e) => e.unwritten)).toBe(true);
    const half = await fs.extents('/data/half');
    expect(half.some((e) => e.unwritten) && half.some((e) => !e.unwritten)).toBe(true);
    expect((await fs.extents('/data/fragA')).length).toBeGreaterThan(5); // interleaved appends fragment
    expect((await fs.readFile('/data/nest/a/rel')).equals(await fs.readFile('/data/rand'))).toBe(true);
    expect((await fs.readFile('/data/nest/abs')).toString()).toBe('deep\n');
  });

  it('directories: listings equal debugfs ls; the kernel-built htree is searched by hash', async () => {
    for (const path of ['/data', '/data/nest', '/data/nest/a', '/data/big']) {
      expect((await fs.readdir(path)).map(({ name, inode }) => ({ name, inode })), path).toEqual(await oracleLs(raw, path));
    }
    expect(await debugfsOne(raw, 'htree /data/big')).toMatch(/Number of entries/);
    const hashed = await Ext4Filesystem.open(chain);
    hashed.htreeLookupLimit = Infinity;
    for (const entry of await fs.readdir('/data/big')) {
      if (entry.name === '.' || entry.name === '..') continue;
      expect((await hashed.resolve(`/data/big/${entry.name}`)).number).toBe(entry.inode);
    }
    await expect(hashed.resolve('/data/big/entry-3000')).rejects.toMatchObject({ code: 'fs.not-found' });
  });
});
