/**
 * The reader against debugfs on real images: every block size, with and without journal,
 * 64bit, metadata_csum, meta_bg, ext3-style indirect maps (up to triple indirect), ext2,
 * 128-byte inodes, inline data. For every file: extents == debugfs stat, bytes == debugfs dump;
 * for every directory: entries == debugfs ls; metadata == debugfs ls -p.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { mkdir } from 'node:fs/promises';
import { tempDir } from '../helpers/qemu.js';
import { isQlayerError } from '../../src/errors.js';
import type { GuestFilesystem } from '../../src/fs/index.js';
import { debugfsOne, makeTree, mkfs, openRaw, oracleDump, oracleExtents, oracleLs, patternBytes, type MkfsOptions } from './e2fs.js';
import { closeOpened } from './e2fs.js';

let dir: string;
let cleanup: () => Promise<void>;
let tree: string;

/** Every other block written: a file of many extents (a deep tree with 1 KiB blocks). */
function alternating(blocks: number, blockSize: number): { sparse: number; writes: Array<[number, Buffer]> } {
  const writes: Array<[number, Buffer]> = [];
  for (let i = 0; i < blocks; i += 2) writes.push([i * blockSize, patternBytes(blockSize, i + 7)]);
  return { sparse: blocks * blockSize, writes };
}

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-fs-variants-'));
  tree = join(dir, 'tree');
  await makeTree(tree, {
    'a.bin': patternBytes(300_000, 1),
    empty: '',
    'dir/small': 'hi\n',
    'dir/sub/deep/file.txt': 'deep file\n'.repeat(500),
    'dir/exact4k': patternBytes(4096, 3),
    sparse: { sparse: 10_000_000, writes: [[0, patternBytes(5000, 4)], [5_000_000, patternBytes(9000, 5)], [9_999_000, patternBytes(1000, 6)]] },
    frag: alternating(900, 1024),
    // Past the double-indirect range of 1 KiB blocks (12 + 256 + 65536 blocks): triple indirect.
    huge: { sparse: 80 * 1024 * 1024, writes: [[100, patternBytes(2000, 8)], [300 * 1024, patternBytes(1024, 9)], [70 * 1024 * 1024, patternBytes(5000, 10)]] },
    big: patternBytes(1_200_000, 11),
    'links/rel': { symlink: '../dir/small' },
    'links/abs': { symlink: '/dir/sub/deep/file.txt' },
    'links/dirlink': { symlink: '../dir' },
    'links/slow': { symlink: `../dir/${'x/'.repeat(0)}${'./'.repeat(40)}small` },
    'links/dangling': { symlink: 'nowhere' },
    'links/loop1': { symlink: 'loop2' },
    'links/loop2': { symlink: 'loop1' },
    'links/escape': { symlink: '../../../../../../etc/hostname' },
    'inl/tiny': 'tiny',
    'inl/sixty': patternBytes(60, 12),
    'inl/hundred': patternBytes(100, 13),
    // More than fits in i_block: mke2fs (libext2fs) turns such a directory into blocks.
    'idir/one': '1',
    'idir/two': '2',
    'idir/three': '3',
    'idir/four': '4',
    'idir/five-longer-name': '5',
  });
  await mkdir(join(tree, 'emptydir'));
});

afterAll(async () => {
  await closeOpened();
  await cleanup();
});

const FILES = ['/a.bin', '/empty', '/dir/small', '/dir/sub/deep/file.txt', '/dir/exact4k', '/sparse', '/frag', '/huge', '/big', '/inl/tiny', '/inl/sixty', '/inl/hundred'];
const DIRS = ['/', '/dir', '/dir/sub', '/dir/sub/deep', '/links', '/inl', '/idir', '/emptydir', '/lost+found'];

async function checkImage(image: string, fs: GuestFilesystem, partitionOffset = 0): Promise<void> {
  for (const path of FILES) {
    const ours = await fs.extents(path);
    expect(ours, `extents of ${path}`).toEqual(await oracleExtents(image, path, fs.blockSize, partitionOffset));
    const bytes = await fs.readFile(path);
    expect(bytes.equals(await oracleDump(image, path, dir)), `contents of ${path}`).toBe(true);
  }
  for (const path of DIRS) {
    const ours = (await fs.readdir(path)).map(({ name, inode }) => ({ name, inode }));
    expect(ours, `ls ${path}`).toEqual(await oracleLs(image, path));
  }
  // Metadata of every entry against debugfs ls -p (mode, uid, gid, size).
  for (const path of DIRS) {
    const out = await debugfsOne(image, `ls -p "${path}"`);
    for (const line of out.split('\n')) {
      const m = /^\/(\d+)\/(\d+)\/(\d+)\/(\d+)\/(.*)\/(\d*)\/$/.exec(line);
      if (!m || m[1] === '0' || m[5] === '.' || m[5] === '..') continue;
      const info = await fs.lookup(`${path}/${m[5]}`);
      expect(info.inode).toBe(Number(m[1]));
      expect(info.mode).toBe(parseInt(m[2]!, 8));
      expect(info.uid).toBe(Number(m[3]));
      expect(info.gid).toBe(Number(m[4]));
      if (m[6] !== '') expect(info.size).toBe(Number(m[6]));
    }
  }
  // Symlinks: resolved inside the filesystem, relative and absolute, fast and slow.
  expect((await fs.readFile('/links/rel')).toString()).toBe('hi\n');
  expect((await fs.readFile('/links/abs')).toString()).toBe('deep file\n'.repeat(500));
  expect((await fs.readFile('/links/slow')).toString()).toBe('hi\n');
  expect((await fs.readFile('/links/dirlink/sub/deep/file.txt')).toString()).toBe('deep file\n'.repeat(500));
  expect((await fs.lookup('/links/dirlink/sub/../small')).size).toBe(3);
  expect((await fs.lookup('/links/rel')).type).toBe('symlink');
  expect((await fs.lookup('/links/rel', { follow: true })).type).toBe('file');
  expect(await fs.readlink('/links/slow')).toBe(`../dir/${'./'.repeat(40)}small`);
  await expect(fs.readFile('/links/loop1')).rejects.toMatchObject({ code: 'fs.symlink-loop' });
  await expect(fs.readFile('/links/dangling')).rejects.toMatchObject({ code: 'fs.not-found' });
  // ".." at the guest root stays at the root: this must never reach the host's /etc.
  await expect(fs.readFile('/links/escape')).rejects.toMatchObject({ code: 'fs.not-found' });
  await expect(fs.readdir('/a.bin')).rejects.toMatchObject({ code: 'fs.not-a-directory' });
  await expect(fs.lookup('/a.bin/x')).rejects.toMatchObject({ code: 'fs.not-a-directory' });
  await expect(fs.readFile('/dir')).rejects.toMatchObject({ code: 'fs.is-a-directory' });
  await expect(fs.lookup('/a.bin/')).rejects.toMatchObject({ code: 'fs.not-a-directory' });
  expect((await fs.lookup('/links/dirlink/')).type).toBe('dir'); // a trailing slash follows the link
  expect((await fs.lookup('/links/dirlink')).type).toBe('symlink');
  expect((await fs.readdir('/links/dirlink')).map((e) => e.name)).toEqual((await fs.readdir('/dir')).map((e) => e.name));
  await expect(fs.lookup('/dir/nope')).rejects.toSatisfy((e) => isQlayerError(e) && e.code === 'fs.not-found');
}

interface Variant {
  name: string;
  options: Omit<MkfsOptions, 'from' | 'size'>;
  expectInline?: boolean;
  expectRevision0?: boolean;
}

const VARIANTS: Variant[] = [
  { name: 'ext4 4k defaults (journal, 64bit, metadata_csum, flex_bg)', options: { blockSize: 4096 } },
  { name: 'ext4 1k no journal', options: { blockSize: 1024, features: ['^has_journal'] } },
  { name: 'ext4 2k 64bit meta_bg', options: { blockSize: 2048, features: ['64bit', 'meta_bg', '^resize_inode'] } },
  { name: 'ext4 4k ^metadata_csum ^64bit (gdt_csum)', options: { blockSize: 4096, features: ['^metadata_csum', '^64bit', 'uninit_bg'] } },
  { name: 'ext4 1k 128-byte inodes, ^flex_bg', options: { blockSize: 1024, features: ['^flex_bg'], extra: ['-I', '128'] } },
  { name: 'ext4 4k 1024-byte inodes', options: { blockSize: 4096, extra: ['-I', '1024'] } },
  { name: 'ext4 64k blocks (rec_len encoding)', options: { blockSize: 65536 } },
  { name: 'ext4 8k blocks, ext3 ^extent', options: { blockSize: 8192, type: 'ext3' } },
  { name: 'ext4 4k bigalloc (16 KiB clusters)', options: { blockSize: 4096, features: ['bigalloc'], extra: ['-C', '16384'] } },
  { name: 'ext3 1k indirect maps', options: { blockSize: 1024, type: 'ext3' } },
  { name: 'ext3 4k indirect maps', options: { blockSize: 4096, type: 'ext3' } },
  { name: 'ext2 2k', options: { blockSize: 2048, type: 'ext2' } },
  { name: 'ext2 revision 0 (no features, no file types in entries)', options: { blockSize: 1024, type: 'ext2', extra: ['-r', '0'] }, expectRevision0: true },
  { name: 'ext4 4k inline_data', options: { blockSize: 4096, features: ['inline_data'] }, expectInline: true },
  { name: 'ext4 1k inline_data metadata_csum 64bit', options: { blockSize: 1024, features: ['inline_data', '64bit'] }, expectInline: true },
  { name: 'ext4 4k orphan_file, metadata_csum_seed (the e2fsprogs >= 1.47.1 defaults)', options: { blockSize: 4096, features: ['orphan_file', 'metadata_csum_seed'] } },
];

describe('ext4 reader vs debugfs', () => {
  for (const variant of VARIANTS) {
    it(variant.name, async () => {
      const image = join(dir, `${variant.name.replace(/\W+/g, '-')}.img`);
      await mkfs(image, { ...variant.options, size: 128 * 1024 * 1024, from: tree });
      const fs = await openRaw(image);
      expect(fs.blockSize).toBe(variant.options.blockSize);
      expect(fs.partition).toMatchObject({ index: 0, offset: 0, scheme: 'none' });
      expect(fs.needsRecovery).toBe(false);
      await checkImage(image, fs);
      if (variant.expectRevision0) {
        expect(fs.superblock.revLevel).toBe(0);
        expect(fs.superblock.inodeSize).toBe(128);
        // No file types in the entries: readdir takes them from the inodes.
        expect(Object.fromEntries((await fs.readdir('/dir')).map((e) => [e.name, e.type]))).toEqual({ '.': 'dir', '..': 'dir', small: 'file', sub: 'dir', exact4k: 'file' });
      }
      const tiny = await fs.stat('/inl/tiny');
      if (variant.expectInline) {
        expect(tiny.inline).toBe(true);
        expect(tiny.extents).toEqual([]);
        expect((await fs.stat('/inl')).inline).toBe(true); // a small inline directory
        expect(await debugfsOne(image, 'stat /inl/hundred')).toMatch(/Size of inline data: 100/); // 60 in i_block + 40 in the xattr
      } else {
        expect(tiny.extents.length).toBe(1);
      }
    });
  }
});
