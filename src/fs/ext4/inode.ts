/**
 * Inodes: locating one in its group's table, verifying its metadata_csum checksum, and
 * decoding the fields the reader needs. The raw bytes are kept for the block map and for
 * in-inode extended attributes (inline data).
 */
import { crc32cRaw } from '../crc.js';
import { Ext4Error, corrupt } from '../errors.js';
import type { BlockReader } from './block-reader.js';
import { RO_COMPAT } from './features.js';
import { BG_INODE_UNINIT, readGroupDescriptor, type GroupDescriptor } from './group-descriptors.js';
import { hasRoCompat, type Superblock } from './superblock.js';

export const ROOT_INODE = 2;

export const INODE_FLAGS = {
  ENCRYPT: 0x800,
  INDEX: 0x1000,
  HUGE_FILE: 0x40000,
  EXTENTS: 0x80000,
  VERITY: 0x100000,
  EA_INODE: 0x200000,
  INLINE_DATA: 0x10000000,
  CASEFOLD: 0x40000000,
} as const;

export type FileType = 'file' | 'dir' | 'symlink' | 'char' | 'block' | 'fifo' | 'socket' | 'unknown';

export function fileTypeOfMode(mode: number): FileType {
  switch (mode & 0xf000) {
    case 0x8000:
      return 'file';
    case 0x4000:
      return 'dir';
    case 0xa000:
      return 'symlink';
    case 0x2000:
      return 'char';
    case 0x6000:
      return 'block';
    case 0x1000:
      return 'fifo';
    case 0xc000:
      return 'socket';
    default:
      return 'unknown';
  }
}

export interface Inode {
  number: number;
  mode: number;
  type: FileType;
  uid: number;
  gid: number;
  size: number;
  links: number;
  /** Seconds since the epoch (with the extra epoch bits of large inodes). */
  mtime: number;
  flags: number;
  /** Blocks (of the filesystem's size) the inode has allocated, data and metadata. */
  allocatedBlocks: number;
  generation: number;
  /** The 60-byte i_block area: extent root, block map, fast symlink or inline data. */
  iBlock: Buffer;
  /** The whole on-disk inode (s_inode_size bytes). */
  raw: Buffer;
  /** Offset of the in-inode extended attribute area, or -1 when there is none. */
  xattrOffset: number;
  /** Seed of this inode's metadata checksums (extent blocks, directory blocks). */
  checksumSeed: number;
  /** Byte offset of the on-disk inode inside the filesystem (where a writer puts it back). */
  offset: number;
}

function signed32(v: number): number {
  return v | 0;
}

export function inodeChecksumSeed(sb: Superblock, number: number, generation: number): number {
  const buf = Buffer.alloc(8);
  buf.writeUInt32LE(number, 0);
  buf.writeUInt32LE(generation, 4);
  return crc32cRaw(sb.checksumSeed, buf);
}

/**
 * The metadata_csum checksum of an on-disk inode: crc32c over the whole inode with both checksum
 * fields (i_checksum_lo, and i_checksum_hi when i_extra_isize reaches it) taken as zero. Only the
 * low 16 bits are stored when the inode has no room for the high half.
 */
export function inodeChecksum(seed: number, raw: Buffer, extraIsize: number): number {
  const hasHi = extraIsize >= 4;
  const copy = Buffer.from(raw);
  copy.writeUInt16LE(0, 0x7c);
  if (hasHi) copy.writeUInt16LE(0, 0x82);
  const computed = crc32cRaw(seed, copy);
  return hasHi ? computed : computed & 0xffff;
}

/** Store `inodeChecksum` into the inode's checksum fields (for writers). */
export function storeInodeChecksum(seed: number, raw: Buffer, inodeSize: number): void {
  const extraIsize = inodeSize > 128 ? raw.readUInt16LE(0x80) : 0;
  const checksum = inodeChecksum(seed, raw, extraIsize);
  raw.writeUInt16LE(checksum & 0xffff, 0x7c);
  if (extraIsize >= 4) raw.writeUInt16LE(checksum >>> 16, 0x82);
}

/**
 * Read and verify inode `number`. `descriptors` caches parsed (and checksum-verified) group
 * descriptors across calls.
 */
export async function readInode(sb: Superblock, reader: BlockReader, number: number, descriptors?: Map<number, GroupDescriptor>): Promise<Inode> {
  if (!Number.isInteger(number) || number < 1 || number > sb.inodesCount) {
    throw corrupt(`inode number ${number} is out of range (1..${sb.inodesCount})`);
  }
  const group = Math.floor((number - 1) / sb.inodesPerGroup);
  const index = (number - 1) % sb.inodesPerGroup;
  let desc = descriptors?.get(group);
  if (!desc) {
    desc = await readGroupDescriptor(sb, reader, group);
    descriptors?.set(group, desc);
  }
  const csumGroups = hasRoCompat(sb, RO_COMPAT.GDT_CSUM) || sb.metadataCsum;
  if (csumGroups && ((desc.flags & BG_INODE_UNINIT) !== 0 || index >= sb.inodesPerGroup - desc.itableUnused)) {
    // The table there was never written: whatever the disk holds is not an inode.
    throw corrupt(`inode ${number} is referenced but lies in the uninitialised part of group ${group}'s inode table`);
  }
  const byte = index * sb.inodeSize;
  const block = desc.inodeTable + Math.floor(byte / sb.blockSize);
  const data = await reader.block(block, `inode ${number}`);
  const at = byte % sb.blockSize;
  const raw = data.subarray(at, at + sb.inodeSize);
  const extraIsize = sb.inodeSize > 128 ? raw.readUInt16LE(0x80) : 0;
  if (sb.inodeSize > 128 && (128 + extraIsize > sb.inodeSize || extraIsize % 4 !== 0)) {
    throw corrupt(`inode ${number} has i_extra_isize ${extraIsize}, more than its ${sb.inodeSize}-byte slot allows`);
  }
  const generation = raw.readUInt32LE(0x64);
  let checksumSeed = 0;
  if (sb.metadataCsum) {
    checksumSeed = inodeChecksumSeed(sb, number, generation);
    const hasHi = extraIsize >= 4;
    const stored = raw.readUInt16LE(0x7c) + (hasHi ? raw.readUInt16LE(0x82) * 65536 : 0);
    const expected = inodeChecksum(checksumSeed, raw, extraIsize);
    // An all-zero inode (never used) legitimately has no checksum.
    if (stored !== expected && !raw.every((b) => b === 0)) {
      throw new Ext4Error('fs.bad-checksum', `inode ${number} checksum mismatch (stored 0x${stored.toString(16)}, computed 0x${expected.toString(16)})`);
    }
  }
  const mode = raw.readUInt16LE(0x00);
  const flags = raw.readUInt32LE(0x20);
  const sizeHi = raw.readUInt32LE(0x6c);
  const size = raw.readUInt32LE(0x04) + sizeHi * 2 ** 32;
  if (!Number.isSafeInteger(size)) throw corrupt(`inode ${number} has an impossible size (i_size_high 0x${sizeHi.toString(16)})`);
  const hugeFile = hasRoCompat(sb, RO_COMPAT.HUGE_FILE);
  const iBlocks = raw.readUInt32LE(0x1c) + (hugeFile ? raw.readUInt16LE(0x74) * 2 ** 32 : 0);
  const allocatedBlocks =
    hugeFile && (flags & INODE_FLAGS.HUGE_FILE) !== 0 ? iBlocks : Math.ceil((iBlocks * 512) / sb.blockSize);
  const mtimeExtra = extraIsize >= 12 ? raw.readUInt32LE(0x88) : 0;
  const mtime = signed32(raw.readUInt32LE(0x10)) + (mtimeExtra & 3) * 2 ** 32;
  return {
    number,
    mode,
    type: fileTypeOfMode(mode),
    uid: raw.readUInt16LE(0x02) + raw.readUInt16LE(0x78) * 65536,
    gid: raw.readUInt16LE(0x18) + raw.readUInt16LE(0x7a) * 65536,
    size,
    links: raw.readUInt16LE(0x1a),
    mtime,
    flags,
    allocatedBlocks,
    generation,
    iBlock: raw.subarray(0x28, 0x28 + 60),
    raw,
    xattrOffset: sb.inodeSize > 128 && 128 + extraIsize + 4 <= sb.inodeSize ? 128 + extraIsize : -1,
    checksumSeed,
    offset: block * sb.blockSize + at,
  };
}
