/**
 * Where a file's blocks are: the extent tree (any depth, unwritten extents flagged) or the
 * legacy ext2/3 block map (12 direct pointers, then single, double and triple indirect blocks).
 * The result is a sorted list of runs of logical -> physical blocks, holes omitted, adjacent
 * runs merged. Every structure is bounds-checked and budgeted so that a corrupt or hostile
 * image ends in fs.corrupt, never a loop or a read of the whole disk.
 */
import { crc32cRaw } from '../crc.js';
import { Ext4Error, corrupt } from '../errors.js';
import type { BlockReader } from './block-reader.js';
import { INODE_FLAGS, type Inode } from './inode.js';
import type { Superblock } from './superblock.js';

export interface BlockRun {
  logical: number;
  physical: number;
  count: number;
  /** An unwritten (uninitialised) extent: allocated, but reads as zeros whatever the disk holds. */
  unwritten: boolean;
}

export const EXTENT_MAGIC = 0xf30a;
/** EXT4_MAX_EXTENT_DEPTH in the kernel: a deeper tree is corrupt. */
const MAX_EXTENT_DEPTH = 5;
/** ee_len above this marks an unwritten extent of (ee_len - MAX_INIT_LEN) blocks. */
export const MAX_INIT_LEN = 32768;
/** Logical block numbers are 32 bits in both formats. */
const MAX_LOGICAL = 2 ** 32;

function pushRun(runs: BlockRun[], run: BlockRun): void {
  const last = runs[runs.length - 1];
  if (last && last.unwritten === run.unwritten && last.logical + last.count === run.logical && last.physical + last.count === run.physical) {
    last.count += run.count;
  } else {
    runs.push(run);
  }
}

export async function mapBlocks(sb: Superblock, reader: BlockReader, inode: Inode): Promise<BlockRun[]> {
  if ((inode.flags & INODE_FLAGS.INLINE_DATA) !== 0) return [];
  if (inode.type === 'symlink' && inode.size > 0 && inode.size < 60 && (inode.flags & INODE_FLAGS.EXTENTS) === 0) return [];
  if (inode.type === 'char' || inode.type === 'block' || inode.type === 'fifo' || inode.type === 'socket') return [];
  if ((inode.flags & INODE_FLAGS.EXTENTS) !== 0) return mapExtents(sb, reader, inode);
  return mapIndirect(sb, reader, inode);
}

interface ExtentHeader {
  entries: number;
  max: number;
  depth: number;
}

function parseHeader(node: Buffer, where: string, capacity: number): ExtentHeader {
  const magic = node.readUInt16LE(0);
  if (magic !== EXTENT_MAGIC) throw corrupt(`${where}: bad extent header magic 0x${magic.toString(16)}`);
  const entries = node.readUInt16LE(2);
  const max = node.readUInt16LE(4);
  const depth = node.readUInt16LE(6);
  if (max > capacity || entries > max) throw corrupt(`${where}: extent header claims ${entries} of ${max} entries, room for ${capacity}`);
  if (depth > MAX_EXTENT_DEPTH) throw corrupt(`${where}: extent tree depth ${depth} exceeds ${MAX_EXTENT_DEPTH}`);
  return { entries, max, depth };
}

async function mapExtents(sb: Superblock, reader: BlockReader, inode: Inode): Promise<BlockRun[]> {
  const runs: BlockRun[] = [];
  const visited = new Set<number>();
  const blockCapacity = Math.floor((sb.blockSize - 12) / 12);
  let nextLogical = 0;
  // Tree blocks are counted in i_blocks: a tree with more nodes than that is corrupt (and,
  // crafted, could otherwise fan out into billions of reads).
  let nodeBudget = inode.allocatedBlocks + 1;

  const walk = async (node: Buffer, header: ExtentHeader, where: string, lo: number, hi: number): Promise<void> => {
    let previous = -1;
    for (let i = 0; i < header.entries; i += 1) {
      const at = 12 + i * 12;
      const logical = node.readUInt32LE(at);
      // Entries are sorted and each child covers [its key, next key): anything else is corrupt
      // and, left unchecked, could make the walk revisit the same ranges forever.
      if (logical <= previous || logical < lo || logical >= hi) {
        throw corrupt(`${where}: extent entry ${i} (logical block ${logical}) is out of order`);
      }
      previous = logical;
      if (header.depth === 0) {
        const rawLen = node.readUInt16LE(at + 4);
        const unwritten = rawLen > MAX_INIT_LEN;
        const count = unwritten ? rawLen - MAX_INIT_LEN : rawLen;
        const physical = node.readUInt16LE(at + 6) * 2 ** 32 + node.readUInt32LE(at + 8);
        if (count === 0) throw corrupt(`${where}: extent ${i} has length 0`);
        if (logical < nextLogical || logical + count > hi) throw corrupt(`${where}: extent ${i} overlaps its neighbour`);
        reader.checkRange(physical, count, `${where} extent ${i}`);
        if (physical < sb.firstDataBlock + 1) throw corrupt(`${where}: extent ${i} maps onto the superblock (block ${physical})`);
        nextLogical = logical + count;
        pushRun(runs, { logical, physical, count, unwritten });
      } else {
        const child = node.readUInt32LE(at + 4) + node.readUInt16LE(at + 8) * 2 ** 32;
        const childHi = i + 1 < header.entries ? node.readUInt32LE(at + 12) : hi;
        if (visited.has(child)) throw corrupt(`${where}: extent tree loops back to block ${child}`);
        visited.add(child);
        nodeBudget -= 1;
        if (nodeBudget < 0) throw corrupt(`inode ${inode.number}: its extent tree has more blocks than i_blocks says it owns`);
        const childWhere = `inode ${inode.number} extent block ${child}`;
        const block = await reader.block(child, childWhere);
        const childHeader = parseHeader(block, childWhere, blockCapacity);
        if (childHeader.depth !== header.depth - 1) {
          throw corrupt(`${childWhere}: depth ${childHeader.depth} under a node of depth ${header.depth}`);
        }
        if (sb.metadataCsum) verifyExtentBlock(block, childHeader, inode, childWhere);
        await walk(block, childHeader, childWhere, logical, Math.min(childHi, hi));
      }
    }
  };

  const rootWhere = `inode ${inode.number} extent root`;
  const rootHeader = parseHeader(inode.iBlock, rootWhere, 4);
  await walk(inode.iBlock, rootHeader, rootWhere, 0, MAX_LOGICAL);
  return runs;
}

/**
 * Where an extent tree block keeps its checksum (struct ext4_extent_tail, right after the last
 * entry slot), or -1 when the slots leave no room for one.
 */
export function extentTailOffset(block: Buffer, max: number): number {
  const tail = 12 + max * 12;
  return tail + 4 > block.length ? -1 : tail;
}

/** The checksum an extent tree block's tail must hold: crc32c of everything before the tail. */
export function extentBlockChecksum(block: Buffer, tail: number, seed: number): number {
  return crc32cRaw(seed, block.subarray(0, tail));
}

function verifyExtentBlock(block: Buffer, header: ExtentHeader, inode: Inode, where: string): void {
  const tail = extentTailOffset(block, header.max);
  if (tail < 0) return;
  const stored = block.readUInt32LE(tail);
  const computed = extentBlockChecksum(block, tail, inode.checksumSeed);
  if (stored !== computed) {
    throw new Ext4Error('fs.bad-checksum', `${where}: checksum mismatch (stored 0x${stored.toString(16)}, computed 0x${computed.toString(16)})`);
  }
}

async function mapIndirect(sb: Superblock, reader: BlockReader, inode: Inode): Promise<BlockRun[]> {
  const runs: BlockRun[] = [];
  const perBlock = sb.blockSize / 4;
  const fileBlocks = Math.ceil(inode.size / sb.blockSize);
  // Every pointer followed costs one block of the inode's i_blocks; more than that is corrupt.
  // (+1: an xattr block counts in i_blocks too, so the budget is never too small by it.)
  let budget = inode.allocatedBlocks + 1;
  const spend = (what: string): void => {
    budget -= 1;
    if (budget < 0) throw corrupt(`inode ${inode.number}: its block map references more blocks than i_blocks says it owns (${what})`);
  };

  const data = (logical: number, physical: number): void => {
    reader.checkRange(physical, 1, `inode ${inode.number} block ${logical}`);
    spend(`data block ${logical}`);
    pushRun(runs, { logical, physical, count: 1, unwritten: false });
  };

  // Walk an indirect block of `level` (1 = single) covering logical blocks from `first`.
  const indirect = async (pointer: number, level: number, first: number): Promise<void> => {
    if (first >= fileBlocks) return;
    spend(`indirect block ${pointer}`);
    const block = await reader.block(pointer, `inode ${inode.number} indirect block`);
    const span = perBlock ** (level - 1);
    for (let i = 0; i < perBlock; i += 1) {
      const logical = first + i * span;
      if (logical >= fileBlocks) break;
      const p = block.readUInt32LE(i * 4);
      if (p === 0) continue;
      if (level === 1) data(logical, p);
      else await indirect(p, level - 1, logical);
    }
  };

  for (let i = 0; i < 12 && i < fileBlocks; i += 1) {
    const p = inode.iBlock.readUInt32LE(i * 4);
    if (p !== 0) data(i, p);
  }
  let first = 12;
  for (let level = 1; level <= 3; level += 1) {
    const p = inode.iBlock.readUInt32LE((11 + level) * 4);
    if (p !== 0) await indirect(p, level, first);
    first += perBlock ** level;
  }
  return runs;
}
