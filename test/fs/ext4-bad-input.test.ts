/**
 * Damaged and hostile images: every failure must be a typed QlayerError (fs.*), never a
 * TypeError, RangeError, crash or hang. Targeted corruptions first, then a seeded fuzz test that
 * flips bytes in the metadata blocks of small images.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { open, readFile } from 'node:fs/promises';
import { copyFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { seededRandom, tempDir } from '../helpers/qemu.js';
import { isQlayerError } from '../../src/errors.js';
import { openGuestFilesystem, readPartitions, type GuestFilesystem } from '../../src/fs/index.js';
import { bufferSource } from '../../src/io/byte-source.js';
import { debugfs, debugfsOne, makeTree, mkfs, openRaw, patternBytes } from './e2fs.js';
import { closeOpened } from './e2fs.js';

let dir: string;
let cleanup: () => Promise<void>;
let tree: string;

function alternating(blocks: number, blockSize: number): { sparse: number; writes: Array<[number, Buffer]> } {
  const writes: Array<[number, Buffer]> = [];
  for (let i = 0; i < blocks; i += 2) writes.push([i * blockSize, patternBytes(blockSize, i + 1)]);
  return { sparse: blocks * blockSize, writes };
}

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-fs-bad-'));
  tree = join(dir, 'tree');
  await makeTree(tree, {
    'a.txt': 'alpha\n',
    'dir/b.bin': patternBytes(20_000, 2),
    'dir/sub/c.txt': 'gamma\n',
    frag: alternating(400, 1024),
    'ind/x': patternBytes(300_000, 3),
    link: { symlink: 'dir/sub/c.txt' },
    slow: { symlink: `dir/${'./'.repeat(40)}b.bin` },
  });
});
afterAll(async () => {
  await closeOpened();
  await cleanup();
});

async function patch(image: string, offset: number, bytes: number[] | Buffer): Promise<void> {
  const handle = await open(image, 'r+');
  await handle.write(Buffer.from(bytes), 0, bytes.length, offset);
  await handle.close();
}

async function readU32(image: string, offset: number): Promise<number> {
  const handle = await open(image, 'r');
  const b = Buffer.alloc(4);
  await handle.read(b, 0, 4, offset);
  await handle.close();
  return b.readUInt32LE(0);
}

function u16(v: number): number[] {
  return [v & 0xff, (v >> 8) & 0xff];
}
function u32(v: number): number[] {
  return [v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff];
}

/** Byte offset of an inode's slot, from debugfs imap. */
async function inodeOffset(image: string, path: string, blockSize: number): Promise<number> {
  const out = await debugfsOne(image, `imap "${path}"`);
  const m = /located at block (\d+), offset (0x[0-9a-f]+)/.exec(out);
  if (!m) throw new Error(`imap failed: ${out}`);
  return Number(m[1]) * blockSize + Number(m[2]);
}

async function firstBlock(image: string, path: string): Promise<number> {
  const out = await debugfsOne(image, `blocks "${path}"`);
  return Number(out.trim().split(/\s+/)[0]);
}

async function plainImage(name: string, blockSize: 1024 | 4096 = 1024, features: string[] = ['^metadata_csum']): Promise<string> {
  const image = join(dir, name);
  await mkfs(image, { size: 16 * 1024 * 1024, blockSize, from: tree, features });
  return image;
}

describe('targeted corruption', () => {
  it('superblock: bad checksum, bad magic, impossible geometry, unknown features', async () => {
    const csum = await plainImage('sb-csum.img', 4096, []);
    await patch(csum, 1024 + 0x78, Buffer.from('renamed!')); // volume name: only the checksum notices
    await expect(openRaw(csum)).rejects.toMatchObject({ code: 'fs.bad-checksum', message: expect.stringContaining('superblock checksum') });

    const plain = await plainImage('sb.img');
    const copy = async (n: string): Promise<string> => {
      const p = join(dir, n);
      await copyFile(plain, p);
      return p;
    };
    const magic = await copy('sb-magic.img');
    await patch(magic, 1024 + 0x38, [0, 0]);
    await expect(openRaw(magic)).rejects.toMatchObject({ code: 'fs.not-ext' });
    const logBlock = await copy('sb-log.img');
    await patch(logBlock, 1024 + 0x18, u32(20));
    await expect(openRaw(logBlock)).rejects.toMatchObject({ code: 'fs.corrupt', message: expect.stringContaining('s_log_block_size') });
    const ipg = await copy('sb-ipg.img');
    await patch(ipg, 1024 + 0x28, u32(0));
    await expect(openRaw(ipg)).rejects.toMatchObject({ code: 'fs.corrupt', message: expect.stringContaining('s_inodes_per_group') });
    const tooBig = await copy('sb-blocks.img');
    await patch(tooBig, 1024 + 0x04, u32(0x7fffffff));
    await expect(openRaw(tooBig)).rejects.toMatchObject({ code: 'fs.corrupt' });
    const unknown = await copy('sb-incompat.img');
    const incompat = await readU32(unknown, 1024 + 0x60);
    await patch(unknown, 1024 + 0x60, u32((incompat | 0x40000000) >>> 0));
    await expect(openRaw(unknown)).rejects.toMatchObject({ code: 'fs.unsupported-feature', message: expect.stringContaining('unknown bit 0x40000000') });
    const casefold = await copy('sb-casefold.img');
    await patch(casefold, 1024 + 0x60, u32((incompat | 0x20000) >>> 0));
    await expect(openRaw(casefold)).rejects.toMatchObject({ code: 'fs.unsupported-feature', message: expect.stringContaining('casefold') });
    const ro = await copy('sb-ro.img');
    const roCompat = await readU32(ro, 1024 + 0x64);
    await patch(ro, 1024 + 0x64, u32((roCompat | 0x80) >>> 0));
    await expect(openRaw(ro)).rejects.toMatchObject({ code: 'fs.unsupported-feature', message: expect.stringContaining('snapshot') });
  });

  it('a non-ext filesystem or an empty disk is named in the error', async () => {
    const xfsLike = Buffer.alloc(4 * 1024 * 1024);
    xfsLike.write('XFSB', 0, 'latin1');
    await expect(openGuestFilesystem(bufferSource(xfsLike))).rejects.toMatchObject({ code: 'fs.not-ext', message: expect.stringContaining('XFS') });
    await expect(openGuestFilesystem(bufferSource(Buffer.alloc(1024 * 1024)))).rejects.toMatchObject({ code: 'fs.not-ext', message: expect.stringContaining('all zeros') });
    await expect(openGuestFilesystem(bufferSource(Buffer.alloc(100)))).rejects.toMatchObject({ code: 'fs.not-ext' });
  });

  it('partition tables: a looping extended chain, a bad GPT entry array, a partition past the disk end', async () => {
    const disk = Buffer.alloc(8 * 1024 * 1024);
    const mbrEntry = (slot: number, type: number, start: number, sectors: number, sector = 0): void => {
      const at = sector * 512 + 446 + slot * 16;
      disk[at + 4] = type;
      disk.writeUInt32LE(start, at + 8);
      disk.writeUInt32LE(sectors, at + 12);
      disk[sector * 512 + 510] = 0x55;
      disk[sector * 512 + 511] = 0xaa;
    };
    mbrEntry(0, 0x05, 2048, 8192);
    mbrEntry(0, 0x83, 63, 1000, 2048); // logical partition
    mbrEntry(1, 0x05, 0, 8192, 2048); // "next" EBR: itself
    await expect(openGuestFilesystem(bufferSource(disk))).rejects.toMatchObject({ code: 'fs.partition-table-corrupt', message: expect.stringContaining('loops') });

    const past = Buffer.alloc(4 * 1024 * 1024);
    past.set(disk.subarray(0, 512));
    past.fill(0, 446, 510);
    past[446 + 4] = 0x83;
    past.writeUInt32LE(2048, 446 + 8);
    past.writeUInt32LE(100_000, 446 + 12);
    await expect(openGuestFilesystem(bufferSource(past))).rejects.toMatchObject({ code: 'fs.partition-table-corrupt', message: expect.stringContaining('outside') });
  });

  it('GPT with a damaged entry array', async () => {
    const image = join(dir, 'gpt-bad.img');
    await mkfs(image, { size: 16 * 1024 * 1024, blockSize: 1024 });
    await execa('sgdisk', ['-o', '-n', '1:2048:+4M', '-t', '1:8300', image]);
    await patch(image, 2 * 512 + 56, [0x41]); // a byte of entry 1's name: only the array CRC notices
    // The backup header and array at the end of the disk still describe the partition.
    expect((await readPartitions(bufferSource(await readFile(image)))).map((p) => [p.index, p.offset])).toEqual([[1, 2048 * 512]]);
    const sectors = (16 * 1024 * 1024) / 512;
    await patch(image, (sectors - 33) * 512 + 56, [0x41]); // the backup array too
    await expect(openRaw(image)).rejects.toMatchObject({ code: 'fs.partition-table-corrupt', message: expect.stringContaining('entry array CRC32') });
  });

  it('a looping extent tree', async () => {
    const image = await plainImage('loop.img');
    const stat = await debugfsOne(image, 'stat /frag');
    const etb = Number(/\(ETB0\):(\d+)/.exec(stat)![1]);
    const slot = await inodeOffset(image, '/frag', 1024);
    // Make the root claim depth 2 and turn the first leaf block into an index node pointing at itself.
    await patch(image, slot + 0x28 + 6, u16(2));
    await patch(image, etb * 1024 + 6, u16(1));
    await patch(image, etb * 1024 + 12 + 4, [...u32(etb), 0, 0]);
    const fs = await openRaw(image);
    await expect(fs.extents('/frag')).rejects.toMatchObject({ code: 'fs.corrupt', message: expect.stringMatching(/loops|depth|order/) });
    await expect(fs.readFile('/frag')).rejects.toMatchObject({ code: 'fs.corrupt' });
    // The rest of the filesystem is still readable.
    expect((await fs.readFile('/a.txt')).toString()).toBe('alpha\n');
  });

  it('a directory entry whose rec_len runs past its block', async () => {
    const image = await plainImage('reclen.img');
    const block = await firstBlock(image, '/dir');
    // "." is 12 bytes, ".." follows; stretch ".." past the 1 KiB block.
    await patch(image, block * 1024 + 12 + 4, u16(2000));
    const fs = await openRaw(image);
    await expect(fs.readdir('/dir')).rejects.toMatchObject({ code: 'fs.corrupt', message: expect.stringContaining('rec_len') });
    await expect(fs.lookup('/dir/b.bin')).rejects.toMatchObject({ code: 'fs.corrupt' });
    expect((await fs.readFile('/a.txt')).toString()).toBe('alpha\n');
  });

  it('an inode number out of range in a directory entry', async () => {
    const image = await plainImage('inum.img');
    const block = await firstBlock(image, '/dir');
    await patch(image, block * 1024 + 12, u32(0x7ffffff0)); // ".." -> a huge inode number
    const fs = await openRaw(image);
    await expect(fs.readdir('/dir')).rejects.toMatchObject({ code: 'fs.corrupt', message: expect.stringContaining('out of range') });
    const inodeApi = await openRaw(image);
    await expect(inodeApi.lookup('/dir/..')).rejects.toMatchObject({ code: 'fs.corrupt' });
  });

  it('an indirect map that claims more blocks than the inode owns', async () => {
    const image = join(dir, 'ind.img');
    await mkfs(image, { size: 16 * 1024 * 1024, blockSize: 1024, type: 'ext3', from: tree });
    const stat = await debugfsOne(image, 'stat /ind/x');
    const ind = Number(/\(IND\):(\d+)/.exec(stat)![1]);
    const slot = await inodeOffset(image, '/ind/x', 1024);
    // Point the double-indirect slot at the single-indirect block: its data pointers become
    // "indirect blocks", and the walk must stop on the i_blocks budget or bounds, not read on.
    await patch(image, slot + 0x28 + 13 * 4, u32(ind));
    const fs = await openRaw(image);
    await expect(fs.extents('/ind/x')).rejects.toMatchObject({ code: 'fs.corrupt' });
  });

  it('encrypted inodes are refused by name', async () => {
    const image = await plainImage('enc.img');
    await debugfs(image, ['sif /a.txt flags 0x80800'], true);
    const fs = await openRaw(image);
    expect((await fs.lookup('/a.txt')).size).toBe(6);
    await expect(fs.readFile('/a.txt')).rejects.toMatchObject({ code: 'fs.encrypted' });
  });

  it('metadata_csum: a flipped byte in an inode or a directory block is a checksum error', async () => {
    const image = await plainImage('csum.img', 1024, []);
    const slot = await inodeOffset(image, '/a.txt', 1024);
    await patch(image, slot + 0x08, [0x12]); // atime: harmless except for the checksum
    const fs = await openRaw(image);
    await expect(fs.lookup('/a.txt')).rejects.toMatchObject({ code: 'fs.bad-checksum', message: expect.stringContaining('inode') });
    const block = await firstBlock(image, '/dir/sub');
    await patch(image, block * 1024 + 40, [0x5a]); // inside the unused tail of the last entry's record
    const fs2 = await openRaw(image);
    await expect(fs2.readdir('/dir/sub')).rejects.toMatchObject({ code: 'fs.bad-checksum' });
  });
});

describe('partition table fuzz', () => {
  it('flipped bytes in MBR, EBR and GPT sectors give a typed error or a readable filesystem', async () => {
    const MiB = 1024 * 1024;
    const images: string[] = [];
    const gpt = join(dir, 'fuzz-gpt.img');
    await mkfs(gpt, { size: 24 * MiB, blockSize: 1024 });
    await execa('sgdisk', ['-o', '-n', '1:2048:+4M', '-t', '1:ef00', '-n', '2:0:+8M', '-t', '2:8300', gpt]);
    await mkfs(gpt, { size: 24 * MiB, blockSize: 1024, from: tree, offset: 2048 * 512 + 4 * MiB, fsBytes: 8 * MiB });
    images.push(gpt);
    const mbr = join(dir, 'fuzz-mbr.img');
    await mkfs(mbr, { size: 24 * MiB, blockSize: 1024 });
    await execa('sfdisk', ['-q', mbr], { input: 'label: dos\nstart=2048, size=4096, type=c\nstart=8192, type=5\nstart=10240, size=16384, type=83\n' });
    await mkfs(mbr, { size: 24 * MiB, blockSize: 1024, from: tree, offset: 10240 * 512, fsBytes: 16384 * 512 });
    images.push(mbr);
    const random = seededRandom(0xd15c);
    const outcomes = { opened: 0, refused: 0 };
    for (const image of images) {
      const pristine = await readFile(image);
      // Table sectors: MBR + primary GPT (0..33), the EBR at 8192, the backup GPT (last 33).
      const sectors = [...Array(34).keys(), 8192, ...Array.from({ length: 33 }, (_, i) => pristine.length / 512 - 33 + i)];
      for (let round = 0; round < 150; round += 1) {
        const flips = new Map<number, number>();
        for (let i = 0; i < 1 + Math.floor(random() * 3); i += 1) {
          const sector = sectors[Math.floor(random() * sectors.length)]!;
          const at = sector * 512 + Math.floor(random() * 512);
          flips.set(at, pristine[at]! ^ (1 + Math.floor(random() * 255)));
        }
        const base = bufferSource(pristine);
        try {
          const fs = await openGuestFilesystem({
            size: base.size,
            async readAt(into, offset) {
              await base.readAt(into, offset);
              for (const [at, value] of flips) if (at >= offset && at < offset + into.length) into[at - offset] = value;
            },
          });
          expect((await fs.readFile('/a.txt')).toString()).toBe('alpha\n');
          outcomes.opened += 1;
        } catch (error) {
          if (!isQlayerError(error)) throw new Error(`${image} round ${round}: untyped error ${String(error)}`, { cause: error });
          outcomes.refused += 1;
        }
      }
    }
    expect(outcomes.opened).toBeGreaterThan(50);
    expect(outcomes.refused).toBeGreaterThan(5);
  });
});

describe('htree index damage', () => {
  async function htreeImage(name: string, features: string[], count = 600): Promise<string> {
    const t = join(dir, `${name}-tree`);
    const files: Record<string, string> = {};
    for (let i = 0; i < count; i += 1) files[`h/entry-${i}`] = '';
    await makeTree(t, files);
    const image = join(dir, `${name}.img`);
    await mkfs(image, { size: 32 * 1024 * 1024, blockSize: 1024, from: t, features, extra: ['-N', String(count + 100)] });
    await execa('e2fsck', ['-fyD', image], { reject: false });
    expect(await debugfsOne(image, 'htree /h')).toMatch(/Number of entries/);
    return image;
  }

  it('metadata_csum: a changed index hash is a checksum error', async () => {
    const image = await htreeImage('htree-csum', []);
    const root = await firstBlock(image, '/h');
    const entryHash = root * 1024 + 24 + 8 + 8;
    const handle = await open(image, 'r+');
    const b = Buffer.alloc(1);
    await handle.read(b, 0, 1, entryHash);
    await handle.write(Buffer.from([b[0]! ^ 0x40]), 0, 1, entryHash);
    await handle.close();
    const fs = await openRaw(image);
    await expect(fs.lookup('/h/entry-7')).rejects.toMatchObject({ code: 'fs.bad-checksum', message: expect.stringContaining('htree') });
  });

  it('fuzzed index blocks give a typed error, a correct answer, or not-found, never a hang', async () => {
    // 6,000 entries in 1 KiB blocks: more leaves than the root can index, so a second level.
    const image = await htreeImage('htree-fuzz', ['^metadata_csum'], 6000);
    expect(await debugfsOne(image, 'htree /h')).toMatch(/Indirect levels: 1/);
    const pristine = await readFile(image);
    const blocks = (await debugfsOne(image, 'blocks /h')).trim().split(/\s+/).map(Number);
    // The index blocks: the root and the internal nodes (an empty entry spanning the block).
    const indexBlocks = blocks.filter((b, i) => i === 0 || (pristine.readUInt32LE(b * 1024) === 0 && pristine.readUInt16LE(b * 1024 + 4) === 1024));
    expect(indexBlocks.length).toBeGreaterThan(1);
    const random = seededRandom(77);
    let found = 0;
    for (let round = 0; round < 200; round += 1) {
      // The pristine image with a few bytes flipped, without copying 32 MiB per round.
      const flips = new Map<number, number>();
      for (let i = 0; i < 1 + Math.floor(random() * 4); i += 1) {
        // Mostly index blocks, sometimes a leaf.
        const which = random() < 0.7 ? indexBlocks[Math.floor(random() * indexBlocks.length)]! : blocks[Math.floor(random() * blocks.length)]!;
        const at = which * 1024 + Math.floor(random() * 1024);
        flips.set(at, pristine[at]! ^ (1 + Math.floor(random() * 255)));
      }
      const base = bufferSource(pristine);
      const fs = await openGuestFilesystem({
        size: base.size,
        async readAt(into, offset) {
          await base.readAt(into, offset);
          for (const [at, value] of flips) if (at >= offset && at < offset + into.length) into[at - offset] = value;
        },
      });
      for (let n = 0; n < 20; n += 1) {
        const name = `entry-${Math.floor(random() * 6000)}`;
        try {
          const info = await fs.lookup(`/h/${name}`);
          expect(info.type).toBe('file');
          found += 1;
        } catch (error) {
          if (!isQlayerError(error)) throw new Error(`round ${round}: untyped error: ${String(error)}`, { cause: error });
        }
      }
    }
    expect(found).toBeGreaterThan(100);
  });
});

/** Walk everything reachable; every failure must be a QlayerError. Returns operations done. */
async function walkAll(fs: GuestFilesystem): Promise<number> {
  let ops = 0;
  const seen = new Set<number>();
  const attempt = async <T>(job: () => Promise<T>): Promise<T | undefined> => {
    ops += 1;
    try {
      return await job();
    } catch (error) {
      if (!isQlayerError(error)) throw error;
      expect(error.code).toMatch(/^fs\./);
      return undefined;
    }
  };
  const queue = ['/'];
  while (queue.length > 0 && ops < 2000) {
    const path = queue.shift()!;
    const entries = await attempt(() => fs.readdir(path));
    if (!entries) continue;
    for (const entry of entries) {
      if (entry.name === '.' || entry.name === '..') continue;
      const child = `${path === '/' ? '' : path}/${entry.name}`;
      const info = await attempt(() => fs.lookup(child));
      if (!info) continue;
      await attempt(() => fs.extents(child));
      if (info.type === 'dir' && !seen.has(info.inode)) {
        seen.add(info.inode);
        queue.push(child);
      } else if (info.type === 'file' && info.size < 64 * 1024 * 1024) {
        await attempt(() => fs.readFile(child));
      } else if (info.type === 'symlink') {
        await attempt(() => fs.readlink(child));
        await attempt(() => fs.lookup(child, { follow: true }));
      }
    }
  }
  return ops;
}

/** Byte ranges holding metadata: superblock, descriptors, used inode slots, dir/extent/indirect blocks. */
async function metadataRanges(image: string, blockSize: number): Promise<Array<[number, number]>> {
  const ranges: Array<[number, number]> = [[1024, 2048], [(blockSize === 1024 ? 2 : 1) * blockSize, (blockSize === 1024 ? 3 : 2) * blockSize]];
  const paths = ['/', '/a.txt', '/dir', '/dir/b.bin', '/dir/sub', '/dir/sub/c.txt', '/frag', '/ind', '/ind/x', '/link', '/slow'];
  for (const path of paths) {
    const slot = await inodeOffset(image, path, blockSize);
    ranges.push([slot, slot + 256]);
    const stat = await debugfsOne(image, `stat "${path}"`);
    for (const m of stat.matchAll(/\((?:ETB\d|IND|DIND|TIND)\):(\d+)/g)) ranges.push([Number(m[1]) * blockSize, (Number(m[1]) + 1) * blockSize]);
    if (/Type: directory/.test(stat)) {
      for (const b of (await debugfsOne(image, `blocks "${path}"`)).trim().split(/\s+/)) {
        ranges.push([Number(b) * blockSize, (Number(b) + 1) * blockSize]);
      }
    }
  }
  return ranges;
}

describe('fuzz', () => {
  const cases: Array<{ name: string; type?: 'ext3'; blockSize: 1024 | 4096; features: string[] }> = [
    { name: 'ext4 ^metadata_csum', blockSize: 1024, features: ['^metadata_csum'] },
    { name: 'ext3 indirect', type: 'ext3', blockSize: 1024, features: [] },
    { name: 'ext4 metadata_csum inline_data', blockSize: 4096, features: ['inline_data'] },
  ];
  for (const c of cases) {
    it(`flipping bytes in metadata (${c.name}) gives a typed error or success, never a crash or hang`, async () => {
      const image = join(dir, `fuzz-${c.name.replace(/\W+/g, '-')}.img`);
      await mkfs(image, { size: 8 * 1024 * 1024, blockSize: c.blockSize, type: c.type ?? 'ext4', from: tree, features: c.features });
      const pristine = await readFile(image);
      const ranges = await metadataRanges(image, c.blockSize);
      const random = seededRandom(0x5eed + c.blockSize);
      const outcomes = { opened: 0, refused: 0, ops: 0 };
      for (let round = 0; round < 250; round += 1) {
        const data = Buffer.from(pristine);
        const flips = 1 + Math.floor(random() * 6);
        for (let i = 0; i < flips; i += 1) {
          const [from, to] = ranges[Math.floor(random() * ranges.length)]!;
          const at = from + Math.floor(random() * (to - from));
          data[at] = data[at]! ^ (1 + Math.floor(random() * 255));
        }
        let fs: GuestFilesystem | undefined;
        try {
          fs = await openGuestFilesystem(bufferSource(data));
        } catch (error) {
          if (!isQlayerError(error)) throw new Error(`round ${round}: untyped error on open: ${String(error)}`, { cause: error });
          outcomes.refused += 1;
          continue;
        }
        outcomes.opened += 1;
        const started = Date.now();
        try {
          outcomes.ops += await walkAll(fs);
        } catch (error) {
          throw new Error(`round ${round}: untyped error while reading: ${String(error)}`, { cause: error });
        }
        expect(Date.now() - started, `round ${round} took too long`).toBeLessThan(30_000);
      }
      console.log(`fuzz ${c.name}: ${JSON.stringify(outcomes)}`);
      expect(outcomes.opened + outcomes.refused).toBe(250);
      expect(outcomes.ops).toBeGreaterThan(100);
    });
  }
});
