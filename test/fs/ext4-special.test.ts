/**
 * The cases that need a particular image: a 10,000-entry htree directory, a > 4 GiB sparse
 * file, unwritten extents, files fragmented by interleaved writes, a depth-2 extent tree,
 * needs_recovery, MBR (with logical partitions) and GPT. Oracle: debugfs.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execa } from 'execa';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { tempDir } from '../helpers/qemu.js';
import { readPartitions } from '../../src/fs/index.js';
import { Ext4Filesystem } from '../../src/fs/ext4/filesystem.js';
import { nodeFileSystem, rawFileSource } from '../../src/io/host-file.js';
import { bufferSource } from '../../src/io/byte-source.js';
import { debugfs, debugfsOne, makeTree, mkfs, openRaw, oracleDump, oracleExtents, oracleLs, patternBytes } from './e2fs.js';
import { closeOpened } from './e2fs.js';

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-fs-special-'));
});
afterAll(async () => {
  await closeOpened();
  await cleanup();
});

describe('directories', () => {
  it('reads a 10,000-entry htree directory and finds every name, reading only its blocks', async () => {
    const tree = join(dir, 'many');
    const files: Record<string, string> = {};
    for (let i = 0; i < 10_000; i += 1) files[`big/file-${i}-${'n'.repeat(i % 40)}`] = i % 97 === 0 ? `content ${i}\n` : '';
    files['other/x'] = 'x';
    await makeTree(tree, files);
    const image = join(dir, 'many.img');
    await mkfs(image, { size: 256 * 1024 * 1024, blockSize: 4096, from: tree });
    // mke2fs -d writes linear directories; e2fsck -D indexes them (htree with an internal level).
    const fsck = await execa('e2fsck', ['-fyD', image], { reject: false });
    expect(fsck.exitCode).toBeLessThanOrEqual(1);
    expect(await debugfsOne(image, 'stat /big')).toMatch(/Flags: 0x\w*1\w{3}\b/); // EXT4_INDEX_FL (htree)
    expect(await debugfsOne(image, 'htree /big')).toMatch(/Number of entries/);

    const fs = await openRaw(image);
    const entries = await fs.readdir('/big');
    const oracle = await oracleLs(image, '/big');
    expect(entries.length).toBe(10_002);
    expect(entries.map(({ name, inode }) => ({ name, inode }))).toEqual(oracle);

    const before = fs.readStats.metadataBlocksRead;
    for (const entry of entries) {
      if (entry.name === '.' || entry.name === '..') continue;
      const info = await fs.lookup(`/big/${entry.name}`);
      expect(info.inode).toBe(entry.inode);
    }
    // 10,000 inodes of 256 bytes are 625 inode-table blocks; nothing else should be read again.
    expect(fs.readStats.metadataBlocksRead - before).toBeLessThanOrEqual(700);
    expect((await fs.readFile('/big/file-97-' + 'n'.repeat(97 % 40))).toString()).toBe('content 97\n');
    expect(fs.readStats.bytesRead).toBeLessThan(8 * 1024 * 1024);

    // Hash lookups only (no whole-directory read): every name found, each reading a handful of blocks.
    const file = await nodeFileSystem.open(image, 'read');
    try {
      const hashed = await Ext4Filesystem.open(await rawFileSource(file));
      hashed.htreeLookupLimit = Infinity;
      await hashed.resolve('/big/file-5000-' + 'n'.repeat(5000 % 40));
      expect(hashed.reader.stats.metadataBlocksRead).toBeLessThanOrEqual(8); // descriptors, 2 inodes, dx root + node, leaf
      for (const entry of entries) {
        if (entry.name === '.' || entry.name === '..') continue;
        expect((await hashed.resolve(`/big/${entry.name}`)).number).toBe(entry.inode);
      }
      const missesBefore = hashed.reader.stats.metadataBlocksRead;
      await expect(hashed.resolve('/big/not-there')).rejects.toMatchObject({ code: 'fs.not-found' });
      await expect(hashed.resolve('/big/file-1-')).rejects.toMatchObject({ code: 'fs.not-found' });
      expect(hashed.reader.stats.metadataBlocksRead - missesBefore).toBeLessThanOrEqual(2);
    } finally {
      await file.close();
    }
  });
});

describe('group descriptors', () => {
  it('meta_bg: finds inodes whose group descriptors live in the second meta group', async () => {
    const tree = join(dir, 'metabg');
    const files: Record<string, string> = {};
    for (let d = 0; d < 3; d += 1) for (let i = 0; i < 100; i += 1) files[`d${d}/f${i}`] = `file ${d} ${i}\n`.repeat(i);
    await makeTree(tree, files);
    const image = join(dir, 'metabg.img');
    // 1 KiB blocks, 64-byte descriptors: 16 per block, so groups 16.. are in meta group 1.
    await mkfs(image, { size: 256 * 1024 * 1024, blockSize: 1024, features: ['64bit', 'meta_bg', '^resize_inode'], extra: ['-N', '512'], from: tree });
    const fs = await openRaw(image);
    expect(fs.superblock.inodesPerGroup).toBe(16);
    let inLaterMetaGroup = 0;
    for (let d = 0; d < 3; d += 1) {
      expect((await fs.readdir(`/d${d}`)).map(({ name, inode }) => ({ name, inode }))).toEqual(await oracleLs(image, `/d${d}`));
      for (let i = 0; i < 100; i += 7) {
        const path = `/d${d}/f${i}`;
        const info = await fs.lookup(path);
        if (Math.floor((info.inode - 1) / 16) >= 16) inLaterMetaGroup += 1;
        expect(await fs.extents(path)).toEqual(await oracleExtents(image, path, 1024));
        expect((await fs.readFile(path)).toString()).toBe(`file ${d} ${i}\n`.repeat(i));
      }
    }
    expect(inLaterMetaGroup).toBeGreaterThan(5);
  });
});

describe('file layouts', () => {
  it('maps a > 4 GiB sparse file and reads its far end', async () => {
    const tree = join(dir, 'large');
    const far = 5 * 1024 ** 3 + 12_345;
    await makeTree(tree, {
      huge: { sparse: 6 * 1024 ** 3, writes: [[0, patternBytes(10_000, 1)], [far, patternBytes(70_000, 2)], [4 * 1024 ** 3 - 2048, patternBytes(8192, 3)]] },
    });
    const image = join(dir, 'large.img');
    await mkfs(image, { size: 8 * 1024 ** 3, blockSize: 4096, from: tree });
    const fs = await openRaw(image);
    const info = await fs.lookup('/huge');
    expect(info.size).toBe(6 * 1024 ** 3);
    const extents = await fs.extents('/huge');
    expect(extents).toEqual(await oracleExtents(image, '/huge', 4096));
    expect(extents.some((e) => e.fileOffset > 2 ** 32)).toBe(true);
    // Read the far piece through the extents and compare with what was written.
    const chunks: Buffer[] = [];
    let total = 0;
    for await (const chunk of fs.readFileChunks('/huge', 1024 ** 3)) {
      if (total <= far && far < total + chunk.length) chunks.push(chunk.subarray(far - total, far - total + 70_000));
      total += chunk.length;
    }
    expect(total).toBe(6 * 1024 ** 3);
    expect(Buffer.concat(chunks).equals(patternBytes(70_000, 2))).toBe(true);
    await expect(fs.readFile('/huge')).rejects.toMatchObject({ code: 'fs.file-too-large' });
  });

  it('reports unwritten (fallocated) extents as unwritten and reads them as zeros', async () => {
    const image = join(dir, 'unwritten.img');
    await mkfs(image, { size: 64 * 1024 * 1024, blockSize: 4096 });
    const data = join(dir, 'data.bin');
    await writeFile(data, patternBytes(40_960, 5));
    await debugfs(image, [`write ${data} /mixed`, 'fallocate /mixed 10 49', 'sif /mixed size 204800', 'write /dev/null /prealloc', 'fallocate /prealloc 0 31', 'sif /prealloc size 131072'], true);
    const fs = await openRaw(image);
    for (const path of ['/mixed', '/prealloc']) {
      const extents = await fs.extents(path);
      expect(extents).toEqual(await oracleExtents(image, path, 4096));
      expect(extents.some((e) => e.unwritten)).toBe(true);
      expect((await fs.readFile(path)).equals(await oracleDump(image, path, dir))).toBe(true);
    }
    const mixed = await fs.readFile('/mixed');
    expect(mixed.subarray(0, 40_960).equals(patternBytes(40_960, 5))).toBe(true);
    expect(mixed.subarray(40_960).every((b) => b === 0)).toBe(true);
  });

  it('follows files fragmented by interleaved writes, and a depth-2 extent tree', async () => {
    const image = join(dir, 'frag.img');
    await mkfs(image, { size: 64 * 1024 * 1024, blockSize: 1024, features: ['^has_journal'] });
    const chunk = join(dir, 'chunk.bin');
    await writeFile(chunk, patternBytes(1024, 9));
    // Fill the disk with 1-block files, free every other one, then write a big file into the gaps.
    const commands: string[] = [];
    for (let i = 0; i < 1200; i += 1) commands.push(`write ${chunk} /f${i}`);
    for (let i = 0; i < 1200; i += 2) commands.push(`rm /f${i}`);
    const big = join(dir, 'bigfrag.bin');
    await writeFile(big, patternBytes(3 * 1024 * 1024, 10));
    commands.push(`write ${big} /big`);
    await debugfs(image, commands, true);
    const fs = await openRaw(image);
    const extents = await fs.extents('/big');
    expect(extents).toEqual(await oracleExtents(image, '/big', 1024));
    expect(extents.length).toBeGreaterThan(400);
    const tree = await debugfsOne(image, 'ex /big');
    expect(tree).toMatch(/^\s*2\/\s*2\s/m); // a leaf at level 2 of 2: depth-2 tree
    expect((await fs.readFile('/big')).equals(patternBytes(3 * 1024 * 1024, 10))).toBe(true);
    expect((await fs.readFile('/big')).equals(await oracleDump(image, '/big', dir))).toBe(true);
  });
});

describe('inline directories', () => {
  it('reads entries that spill from i_block into the system.data xattr', async () => {
    // libext2fs never writes such a directory (it converts to blocks); the kernel does. Build
    // one by hand: an inline directory whose system.data value holds one more entry.
    const tree = join(dir, 'inline-tree');
    await makeTree(tree, { 'inl/tiny': 't\n' });
    const image = join(dir, 'inline-dir.img');
    await mkfs(image, { size: 16 * 1024 * 1024, blockSize: 1024, features: ['inline_data', '^metadata_csum'], from: tree });
    const imap = /located at block (\d+), offset (0x[0-9a-f]+)/.exec(await debugfsOne(image, 'imap /inl'))!;
    const slot = Number(imap[1]) * 1024 + Number(imap[2]);
    const tinyInode = (await openRaw(image)).lookup('/inl/tiny');
    const { open: openFile } = await import('node:fs/promises');
    const handle = await openFile(image, 'r+');
    const inode = Buffer.alloc(256);
    await handle.read(inode, 0, 256, slot);
    const xattrs = 128 + inode.readUInt16LE(0x80);
    expect(inode.readUInt32LE(xattrs)).toBe(0xea020000);
    const valueSize = 32;
    const value = Buffer.alloc(valueSize);
    value.writeUInt32LE((await tinyInode).inode, 0);
    value.writeUInt16LE(valueSize, 4);
    value[6] = 5;
    value[7] = 1;
    value.write('spill', 8, 'latin1');
    const area = Buffer.alloc(256 - xattrs);
    area.writeUInt32LE(0xea020000, 0);
    const valueOffset = area.length - 4 - valueSize; // relative to the first entry
    area[4] = 4; // name_len
    area[5] = 7; // "system." index
    area.writeUInt16LE(valueOffset, 6);
    area.writeUInt32LE(valueSize, 12);
    area.write('data', 20, 'latin1');
    value.copy(area, 4 + valueOffset);
    area.copy(inode, xattrs);
    inode.writeUInt32LE(60 + valueSize, 0x04); // i_size covers both parts
    await handle.write(inode, 0, 256, slot);
    await handle.close();

    const fs = await openRaw(image);
    const ours = (await fs.readdir('/inl')).map(({ name, inode: n }) => ({ name, inode: n }));
    expect(ours.map((e) => e.name)).toEqual(['.', '..', 'tiny', 'spill']);
    expect(ours).toEqual(await oracleLs(image, '/inl'));
    expect((await fs.readFile('/inl/spill')).toString()).toBe('t\n');
    expect((await fs.stat('/inl')).inline).toBe(true);
  });
});

describe('journal', () => {
  it('refuses a filesystem whose journal needs recovery, unless asked to read anyway', async () => {
    const image = join(dir, 'dirty.img');
    const tree = join(dir, 'dirty-tree');
    await makeTree(tree, { 'f.txt': 'hello' });
    await mkfs(image, { size: 32 * 1024 * 1024, blockSize: 4096, from: tree });
    await debugfs(image, ['feature needs_recovery'], true);
    await expect(openRaw(image)).rejects.toMatchObject({
      code: 'fs.needs-recovery',
      message: expect.stringContaining('did not shut down cleanly'),
    });
    const fs = await openRaw(image, { allowNeedsRecovery: true });
    expect(fs.needsRecovery).toBe(true);
    expect((await fs.readFile('/f.txt')).toString()).toBe('hello');
  });
});

describe('partition tables', () => {
  const MiB = 1024 * 1024;
  let tree: string;
  beforeAll(async () => {
    tree = join(dir, 'ptree');
    await makeTree(tree, { 'etc/hostname': 'guest\n', 'data.bin': patternBytes(200_000, 21), 'link': { symlink: 'etc/hostname' } });
  });

  async function checkPartition(image: string, offset: number, size: number, partition?: number): Promise<void> {
    const fs = await openRaw(image, partition === undefined ? {} : { partition });
    expect(fs.partition.offset).toBe(offset);
    expect(fs.partition.length).toBe(size);
    // debugfs reads the filesystem through the same offset (image?offset= is not supported, so
    // extract the partition and add the offset back).
    const part = join(dir, `part-${offset}.img`);
    await execa('dd', [`if=${image}`, `of=${part}`, 'bs=1M', `skip=${offset / MiB}`, `count=${size / MiB}`, 'status=none']);
    expect(await fs.extents('/data.bin')).toEqual(await oracleExtents(part, '/data.bin', fs.blockSize, offset));
    expect((await fs.readFile('/data.bin')).equals(patternBytes(200_000, 21))).toBe(true);
    expect((await fs.readFile('/link')).toString()).toBe('guest\n');
    // The disk bytes at the reported offsets are the file's bytes.
    const raw = await (await import('node:fs/promises')).readFile(image);
    const pieces = (await fs.extents('/data.bin')).map((e) => raw.subarray(e.diskOffset, e.diskOffset + e.length));
    expect(Buffer.concat(pieces).subarray(0, 200_000).equals(patternBytes(200_000, 21))).toBe(true);
  }

  it('MBR: picks the only Linux partition, and --partition N picks a logical one', async () => {
    const image = join(dir, 'mbr.img');
    await writeFile(image, '');
    await execa('truncate', ['-s', `${80 * MiB}`, image]);
    await execa('sfdisk', ['-q', image], {
      input: 'label: dos\nstart=2048, size=20480, type=c\nstart=22528, size=30720, type=83\nstart=53248, type=5\nstart=55296, size=20480, type=83\n',
    });
    await mkfs(image, { size: 80 * MiB, blockSize: 1024, from: tree, offset: 22528 * 512, fsBytes: 30720 * 512 });
    await mkfs(image, { size: 80 * MiB, blockSize: 4096, from: tree, offset: 55296 * 512, fsBytes: 20480 * 512 });
    const parts = await readPartitions(bufferSource(await (await import('node:fs/promises')).readFile(image)));
    expect(parts.map((p) => [p.index, p.offset, p.type])).toEqual([
      [1, 2048 * 512, '0x0c'],
      [2, 22528 * 512, '0x83'],
      [5, 55296 * 512, '0x83'],
    ]);
    // Two Linux partitions: the default must not guess.
    await expect(openRaw(image)).rejects.toMatchObject({ code: 'fs.partition-ambiguous' });
    await checkPartition(image, 22528 * 512, 30720 * 512, 2);
    await checkPartition(image, 55296 * 512, 20480 * 512, 5);
    await expect(openRaw(image, { partition: 1 })).rejects.toMatchObject({ code: 'fs.not-ext' });
    await expect(openRaw(image, { partition: 9 })).rejects.toMatchObject({ code: 'fs.partition-not-found' });
  });

  it('two Linux filesystems, a /boot and a root (as Debian and Ubuntu install on LVM): the one with /etc/fstab is the root', async () => {
    const rootTree = join(dir, 'root-tree');
    await mkdir(join(rootTree, 'etc'), { recursive: true });
    await writeFile(join(rootTree, 'etc', 'fstab'), 'UUID=x / ext4 defaults 0 1\n');
    await writeFile(join(rootTree, 'data.bin'), patternBytes(200_000, 21));
    const image = join(dir, 'boot-and-root.img');
    await writeFile(image, '');
    await execa('truncate', ['-s', `${80 * MiB}`, image]);
    await execa('sfdisk', ['-q', image], { input: 'label: dos\nstart=2048, size=20480, type=83\nstart=22528, size=40960, type=83\n' });
    await mkfs(image, { size: 80 * MiB, blockSize: 1024, type: 'ext2', from: tree, offset: 2048 * 512, fsBytes: 20480 * 512 });
    await mkfs(image, { size: 80 * MiB, blockSize: 4096, from: rootTree, offset: 22528 * 512, fsBytes: 40960 * 512 });
    const fs = await openRaw(image);
    expect(fs.partition.index).toBe(2);
    // debugfs (the oracle) reads the same file at the partition's offset.
    expect((await fs.readFile('/etc/fstab')).toString()).toBe('UUID=x / ext4 defaults 0 1\n');
    // Both holding /etc/fstab: no guess, and the message says which.
    await mkfs(image, { size: 80 * MiB, blockSize: 1024, type: 'ext2', from: rootTree, offset: 2048 * 512, fsBytes: 20480 * 512 });
    await expect(openRaw(image)).rejects.toMatchObject({ code: 'fs.partition-ambiguous', message: expect.stringContaining('2 of them hold /etc/fstab: 1, 2') });
    expect((await openRaw(image, { partition: 1 })).partition.index).toBe(1);
  });

  it('GPT: validates the CRCs, picks the Linux filesystem partition, falls back to the backup header', async () => {
    const image = join(dir, 'gpt.img');
    await writeFile(image, '');
    await execa('truncate', ['-s', `${64 * MiB}`, image]);
    await execa('sgdisk', ['-n', '1:2048:+8M', '-t', '1:ef00', '-n', '2:0:+40M', '-t', '2:8300', '-c', '2:root', image]);
    const start = 2048 * 512 + 8 * MiB;
    await mkfs(image, { size: 64 * MiB, blockSize: 4096, from: tree, offset: start, fsBytes: 40 * MiB });
    await checkPartition(image, start, 40 * MiB);
    const fs = await openRaw(image);
    expect(fs.partition).toMatchObject({ index: 2, scheme: 'gpt', type: '0fc63daf-8483-4772-8e79-3d69d8477de4', name: 'root' });

    // Damage the primary header: the backup at the last LBA still describes the disk.
    const { open } = await import('node:fs/promises');
    const handle = await open(image, 'r+');
    await handle.write(Buffer.from([0xff]), 0, 1, 512 + 40);
    await handle.close();
    await checkPartition(image, start, 40 * MiB);
    // Damage the backup too: a clear error.
    const h2 = await open(image, 'r+');
    await h2.write(Buffer.from([0xff]), 0, 1, 64 * MiB - 512 + 40);
    await h2.close();
    await expect(openRaw(image)).rejects.toMatchObject({ code: 'fs.partition-table-corrupt', message: expect.stringContaining('CRC32') });
  });
});
