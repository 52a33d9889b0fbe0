/**
 * The unwritten-extent flip against its oracle: e2fsprogs' debugfs does the same flip on a twin
 * image (extent_open, goto_block, replace_node without --uninit), and both images must then be
 * byte-identical, e2fsck-clean, and read the bytes under the extents through debugfs dump.
 */
import { copyFile, open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { markPlaceholdersWritten, openGuestFilesystem } from '../../src/fs/index.js';
import type { WritableByteSource } from '../../src/io/byte-source.js';
import { debugfsFlip, debugfsLeaves, debugfsRead, debugfsWrite, type LeafExtent } from '../helpers/offline-guest.js';
import { tempDir } from '../helpers/qemu.js';
import { mkfs } from './e2fs.js';

/** A raw image file as a writable source. */
async function rawWritable(path: string): Promise<{ source: WritableByteSource; close: () => Promise<void> }> {
  const handle = await open(path, 'r+');
  const { size } = await handle.stat();
  return {
    source: {
      size,
      async readAt(into, offset) {
        into.fill(0);
        await handle.read(into, 0, into.length, offset);
      },
      async writeAt(data, offset) {
        await handle.write(data, 0, data.length, offset);
      },
    },
    close: () => handle.close(),
  };
}

/** Fill every block of `path` on the raw image with a pattern derived from its block number. */
async function stampBlocks(raw: string, leaves: LeafExtent[], blockSize: number): Promise<Buffer> {
  const handle = await open(raw, 'r+');
  const chunks: Buffer[] = [];
  try {
    for (const e of [...leaves].sort((a, b) => a.logical - b.logical)) {
      const data = Buffer.alloc(e.length * blockSize);
      for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((e.physical * blockSize + i) >>> 0, i);
      await handle.write(data, 0, data.length, e.physical * blockSize);
      chunks.push(data);
    }
  } finally {
    await handle.close();
  }
  return Buffer.concat(chunks);
}

const variants: Array<{ name: string; blockSize: 1024 | 4096; features?: string[]; extra?: string[] }> = [
  { name: '4 KiB blocks, metadata_csum, 64bit (Debian 12 defaults)', blockSize: 4096 },
  { name: '1 KiB blocks, metadata_csum', blockSize: 1024 },
  { name: '4 KiB blocks, no metadata_csum', blockSize: 4096, features: ['^metadata_csum'] },
  { name: '4 KiB blocks, no 64bit', blockSize: 4096, features: ['^64bit'] },
  { name: '1 KiB blocks, neither metadata_csum nor 64bit', blockSize: 1024, features: ['^metadata_csum', '^64bit'] },
  { name: '128-byte inodes (no high checksum half)', blockSize: 4096, extra: ['-I', '128'] },
  { name: 'orphan_file, metadata_csum_seed (e2fsprogs >= 1.47.1)', blockSize: 4096, features: ['orphan_file', 'metadata_csum_seed'] },
];

describe('unwritten-extent flip, against debugfs', () => {
  let temp: { dir: string; cleanup: () => Promise<void> };
  beforeAll(async () => {
    temp = await tempDir('qlayer-flip-');
  });
  afterAll(async () => temp?.cleanup());

  it.each(variants)('$name: same bytes as debugfs, e2fsck clean, data readable, rerun changes nothing', async ({ name, blockSize, features, extra }) => {
    const raw = join(temp.dir, `${name.replace(/\W+/g, '-')}.raw`);
    await mkfs(raw, { size: 32 << 20, blockSize, ...(features ? { features } : {}), ...(extra ? { extra } : {}) });
    // small: one extent in the inode. deep/other: fallocated in turns, so each gets 24 extents
    // and a leaf block. mixed: written blocks, then unwritten ones after them.
    const commands = ['write /dev/null small', 'write /dev/null deep', 'write /dev/null other', 'mkdir dir', 'write /dev/null dir/mixed'];
    commands.push('fallocate small 0 2', `sif small size ${2 * blockSize + 100}`);
    for (let i = 0; i < 24; i++) commands.push(`fallocate deep ${i * 4} ${i * 4 + 3}`, `fallocate other ${i * 4} ${i * 4 + 3}`);
    commands.push(`sif deep size ${96 * blockSize}`, `sif other size ${96 * blockSize}`);
    await debugfsWrite(raw, commands);
    // A file whose first blocks are written data: only its unwritten tail may change.
    const data = join(temp.dir, 'data');
    await writeFile(data, Buffer.alloc(3 * blockSize, 0x5a));
    await debugfsWrite(raw, ['rm dir/mixed', `write ${data} dir/mixed`, `fallocate dir/mixed 3 7`, `sif dir/mixed size ${8 * blockSize}`]);

    const paths = ['small', 'deep', 'dir/mixed'];
    const expectedContent = new Map<string, Buffer>();
    for (const path of paths) {
      const leaves = await debugfsLeaves(raw, path);
      expect(leaves.some((l) => l.unwritten), `${path} has unwritten extents`).toBe(true);
      if (path === 'deep') expect(leaves.length).toBeGreaterThan(4); // beyond the inode's 4 slots
      const unwritten = leaves.filter((l) => l.unwritten);
      const stamped = await stampBlocks(raw, unwritten, blockSize);
      expectedContent.set(path, stamped);
    }
    const twin = `${raw}.twin`;
    await copyFile(raw, twin);
    for (const path of paths) await debugfsFlip(twin, path);

    const { source, close } = await rawWritable(raw);
    try {
      const fs = await openGuestFilesystem(source);
      const files = await Promise.all(paths.map(async (path) => ({ path, extents: await fs.extents(path) })));
      const report = await markPlaceholdersWritten(source, files);
      expect(report.filesChanged).toBe(3);
      expect(report.extentsFlipped).toBeGreaterThan(24);
      // A rerun (a resumed recompose) finds nothing left to do and writes nothing.
      const again = await markPlaceholdersWritten(source, files);
      expect(again).toMatchObject({ filesChanged: 0, extentsFlipped: 0, metadataWrites: 0 });
    } finally {
      await close();
    }

    const [ours, theirs] = await Promise.all([readFile(raw), readFile(twin)]);
    expect(ours.equals(theirs), 'our flip wrote the same bytes as debugfs').toBe(true);
    for (const image of [raw, twin]) {
      const fsck = await execa('e2fsck', ['-fn', image], { reject: false });
      expect(fsck.exitCode, fsck.stdout).toBe(0);
    }
    // The stamped bytes now show through the files (debugfs dump reads written extents only).
    for (const path of ['small', 'deep']) {
      const out = join(temp.dir, 'dump');
      await debugfsRead(raw, `dump ${path} ${out}`);
      const dumped = await readFile(out);
      const stamped = expectedContent.get(path)!;
      expect(dumped.equals(stamped.subarray(0, dumped.length)), `${path} reads its blocks`).toBe(true);
    }
    expect((await debugfsLeaves(raw, 'dir/mixed')).every((l) => !l.unwritten)).toBe(true);
  }, 60_000);

  it('refuses a filesystem whose orphan file is not empty (a dirty guest), writing nothing', async () => {
    const raw = join(temp.dir, 'orphans.raw');
    await mkfs(raw, { size: 16 << 20, blockSize: 4096, features: ['orphan_file'] });
    await debugfsWrite(raw, ['write /dev/null f', 'fallocate f 0 9', 'sif f size 40960', 'feature orphan_present']);
    const before = await readFile(raw);
    const { source, close } = await rawWritable(raw);
    try {
      await expect(openGuestFilesystem(source)).rejects.toMatchObject({ code: 'fs.orphans-pending' });
      await expect(markPlaceholdersWritten(source, [{ path: 'f', extents: [] }])).rejects.toMatchObject({ code: 'fs.orphans-pending' });
    } finally {
      await close();
    }
    expect((await readFile(raw)).equals(before)).toBe(true);
  });

  it('refuses a file whose blocks differ from the located ones, writing nothing', async () => {
    const raw = join(temp.dir, 'moved.raw');
    await mkfs(raw, { size: 16 << 20, blockSize: 4096 });
    await debugfsWrite(raw, ['write /dev/null f', 'fallocate f 0 9', 'sif f size 40960']);
    const before = await readFile(raw);
    const { source, close } = await rawWritable(raw);
    try {
      const fs = await openGuestFilesystem(source);
      const extents = await fs.extents('f');
      const shifted = extents.map((e) => ({ ...e, diskOffset: e.diskOffset + 4096 }));
      await expect(markPlaceholdersWritten(source, [{ path: 'f', extents: shifted }])).rejects.toMatchObject({ code: 'fs.layout-changed' });
      await expect(markPlaceholdersWritten(source, [{ path: 'missing', extents }])).rejects.toMatchObject({ code: 'fs.not-found' });
    } finally {
      await close();
    }
    expect((await readFile(raw)).equals(before)).toBe(true);
  });
});
