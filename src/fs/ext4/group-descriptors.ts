/**
 * Block group descriptors: where each group's inode table is. Only the descriptor block a
 * lookup needs is read (the BlockReader caches it), so opening a filesystem with thousands of
 * groups costs one block, not the whole table. Handles 32- and 64-byte descriptors and meta_bg,
 * where descriptors live in the first group of each meta group instead of after the superblock.
 */
import { crc32cRaw } from '../crc.js';
import { Ext4Error, corrupt } from '../errors.js';
import type { BlockReader } from './block-reader.js';
import { INCOMPAT, RO_COMPAT } from './features.js';
import { hasIncompat, hasRoCompat, type Superblock } from './superblock.js';

export interface GroupDescriptor {
  group: number;
  inodeTable: number;
  flags: number;
  /** Inodes at the end of the table that were never initialised (bg_itable_unused). */
  itableUnused: number;
}

export const BG_INODE_UNINIT = 0x1;

function isPowerOf(n: number, base: number): boolean {
  while (n > 1 && n % base === 0) n /= base;
  return n === 1;
}

/** Whether group `g` carries a superblock copy (and so, without meta_bg, descriptor copies). */
export function groupHasSuper(sb: Superblock, g: number): boolean {
  if (g === 0) return true;
  if ((sb.featureCompat & 0x200) !== 0) return g === sb.backupGroups[0] || g === sb.backupGroups[1]; // sparse_super2
  if (!hasRoCompat(sb, RO_COMPAT.SPARSE_SUPER)) return true;
  return g === 1 || isPowerOf(g, 3) || isPowerOf(g, 5) || isPowerOf(g, 7);
}

/** Block holding the primary copy of group `g`'s descriptor, and the slot inside it. */
export function descriptorLocation(sb: Superblock, g: number): { block: number; offset: number } {
  const perBlock = sb.blockSize / sb.descSize;
  const descBlock = Math.floor(g / perBlock);
  const offset = (g % perBlock) * sb.descSize;
  if (hasIncompat(sb, INCOMPAT.META_BG) && descBlock >= sb.firstMetaBg) {
    const first = descBlock * perBlock;
    const groupStart = sb.firstDataBlock + first * sb.blocksPerGroup;
    return { block: groupStart + (groupHasSuper(sb, first) ? 1 : 0), offset };
  }
  return { block: sb.firstDataBlock + 1 + descBlock, offset };
}

export async function readGroupDescriptor(sb: Superblock, reader: BlockReader, g: number): Promise<GroupDescriptor> {
  if (g < 0 || g >= sb.groupCount) throw corrupt(`block group ${g} does not exist (the filesystem has ${sb.groupCount})`);
  const { block, offset } = descriptorLocation(sb, g);
  const data = await reader.block(block, `group descriptor ${g}`);
  const d = data.subarray(offset, offset + sb.descSize);
  const wide = sb.descSize >= 64;
  if (sb.metadataCsum) {
    const copy = Buffer.from(d);
    copy.writeUInt16LE(0, 0x1e);
    const index = Buffer.alloc(4);
    index.writeUInt32LE(g, 0);
    const computed = crc32cRaw(crc32cRaw(sb.checksumSeed, index), copy) & 0xffff;
    const stored = d.readUInt16LE(0x1e);
    if (computed !== stored) {
      throw new Ext4Error('fs.bad-checksum', `group descriptor ${g} checksum mismatch (stored 0x${stored.toString(16)}, computed 0x${computed.toString(16)})`);
    }
  }
  const inodeTable = d.readUInt32LE(0x08) + (wide ? d.readUInt32LE(0x28) * 2 ** 32 : 0);
  const itableUnused = d.readUInt16LE(0x1c) + (wide ? d.readUInt16LE(0x32) * 65536 : 0);
  const tableBlocks = Math.ceil((sb.inodesPerGroup * sb.inodeSize) / sb.blockSize);
  reader.checkRange(inodeTable, tableBlocks, `group ${g}'s inode table`);
  if (inodeTable === 0) throw corrupt(`group ${g}'s inode table is at block 0`);
  return { group: g, inodeTable, flags: d.readUInt16LE(0x12), itableUnused };
}
