/**
 * The ext2/3/4 superblock (1024 bytes at byte 1024 of the filesystem): geometry, features,
 * and the checks that decide whether this reader may go on at all.
 */
import { crc32cRaw } from '../crc.js';
import { Ext4Error, corrupt } from '../errors.js';
import { COMPAT_HAS_JOURNAL, INCOMPAT, RO_COMPAT, unsupportedIncompat, unsupportedRoCompat } from './features.js';

export const SUPERBLOCK_OFFSET = 1024;
export const SUPERBLOCK_SIZE = 1024;
const EXT_MAGIC = 0xef53;

export interface Superblock {
  inodesCount: number;
  blocksCount: number;
  firstDataBlock: number;
  blockSize: number;
  blocksPerGroup: number;
  inodesPerGroup: number;
  inodeSize: number;
  firstInode: number;
  revLevel: number;
  featureCompat: number;
  featureIncompat: number;
  featureRoCompat: number;
  /** Bytes per group descriptor: 32, or s_desc_size with the 64bit feature. */
  descSize: number;
  firstMetaBg: number;
  groupCount: number;
  /** s_backup_bgs: the only groups with superblock backups under sparse_super2. */
  backupGroups: [number, number];
  /** s_hash_seed and s_def_hash_version, for htree hashing. */
  hashSeed: Uint32Array;
  defHashVersion: number;
  /** s_flags: bit 1 / 2 select the unsigned/signed char variant of the legacy hashes. */
  flags: number;
  uuid: Uint8Array;
  volumeName: string;
  hasJournal: boolean;
  needsRecovery: boolean;
  metadataCsum: boolean;
  /** Seed of every metadata checksum: crc32c(~0, uuid), or s_checksum_seed with csum_seed. */
  checksumSeed: number;
}

export function hasIncompat(sb: Superblock, bit: number): boolean {
  return (sb.featureIncompat & bit) !== 0;
}

export function hasRoCompat(sb: Superblock, bit: number): boolean {
  return (sb.featureRoCompat & bit) !== 0;
}

/**
 * Parse and validate the superblock bytes. Throws Ext4Error for anything this reader must not
 * trust (bad magic, bad checksum, impossible geometry, unsupported features). The journal's
 * needs_recovery flag is reported, not thrown: the caller decides (openGuestFilesystem refuses).
 */
export function parseSuperblock(raw: Uint8Array, partitionBytes: number): Superblock {
  const b = Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength);
  if (b.length < SUPERBLOCK_SIZE) throw corrupt('superblock is truncated');
  const magic = b.readUInt16LE(0x38);
  if (magic !== EXT_MAGIC) {
    throw new Ext4Error('fs.not-ext', `no ext2/3/4 superblock (magic 0x${magic.toString(16)} instead of 0xef53)`);
  }
  const featureCompat = b.readUInt32LE(0x5c);
  const featureIncompat = b.readUInt32LE(0x60);
  const featureRoCompat = b.readUInt32LE(0x64);
  const metadataCsum = (featureRoCompat & RO_COMPAT.METADATA_CSUM) !== 0;
  if (metadataCsum) {
    const type = b[0x175];
    if (type !== 1) throw corrupt(`s_checksum_type is ${type}, only 1 (crc32c) exists`);
    const stored = b.readUInt32LE(0x3fc);
    const computed = crc32cRaw(0xffffffff, b.subarray(0, 0x3fc));
    if (stored !== computed) {
      throw new Ext4Error(
        'fs.bad-checksum',
        `superblock checksum mismatch (stored 0x${stored.toString(16)}, computed 0x${computed.toString(16)}): the superblock is corrupt`,
      );
    }
  }
  const revLevel = b.readUInt32LE(0x4c);
  const logBlockSize = b.readUInt32LE(0x18);
  if (logBlockSize > 6) throw corrupt(`s_log_block_size ${logBlockSize} gives a block size over 64 KiB`);
  const blockSize = 1024 << logBlockSize;
  const is64 = (featureIncompat & INCOMPAT.BIT64) !== 0;
  const blocksCount = b.readUInt32LE(0x04) + (is64 ? b.readUInt32LE(0x150) * 2 ** 32 : 0);
  const inodesCount = b.readUInt32LE(0x00);
  const firstDataBlock = b.readUInt32LE(0x14);
  const blocksPerGroup = b.readUInt32LE(0x20);
  const inodesPerGroup = b.readUInt32LE(0x28);
  const inodeSize = revLevel === 0 ? 128 : b.readUInt16LE(0x58);
  const firstInode = revLevel === 0 ? 11 : b.readUInt32LE(0x54);
  const descSize = is64 ? b.readUInt16LE(0xfe) : 32;

  // Geometry: every value is used to size reads or compute offsets, so none goes unchecked.
  if (blockSize === 1024 ? firstDataBlock !== 1 && firstDataBlock !== 0 : firstDataBlock !== 0) {
    throw corrupt(`s_first_data_block ${firstDataBlock} is impossible with ${blockSize}-byte blocks`);
  }
  if (blocksCount === 0 || blocksCount <= firstDataBlock) throw corrupt(`s_blocks_count ${blocksCount} is impossible`);
  // With bigalloc the block bitmap counts clusters, so the limit applies to clusters per group.
  const bigalloc = (featureRoCompat & RO_COMPAT.BIGALLOC) !== 0;
  const logClusterSize = b.readUInt32LE(0x1c);
  const clustersPerGroup = b.readUInt32LE(0x24);
  if (bigalloc && (logClusterSize < logBlockSize || logClusterSize - logBlockSize > 16 || blocksPerGroup !== clustersPerGroup * 2 ** (logClusterSize - logBlockSize))) {
    throw corrupt(`bigalloc geometry is inconsistent (s_log_cluster_size ${logClusterSize}, s_clusters_per_group ${clustersPerGroup}, s_blocks_per_group ${blocksPerGroup})`);
  }
  const perGroupLimit = bigalloc ? blockSize * 8 * 2 ** (logClusterSize - logBlockSize) : blockSize * 8;
  if (blocksPerGroup === 0 || blocksPerGroup > perGroupLimit) throw corrupt(`s_blocks_per_group ${blocksPerGroup} is out of range`);
  if (inodesPerGroup === 0 || inodesPerGroup > blockSize * 8) throw corrupt(`s_inodes_per_group ${inodesPerGroup} is out of range`);
  if (inodeSize < 128 || inodeSize > blockSize || (inodeSize & (inodeSize - 1)) !== 0) {
    throw corrupt(`s_inode_size ${inodeSize} is not a power of two between 128 and the block size`);
  }
  if (is64 && (descSize < 64 || descSize > 1024 || (descSize & (descSize - 1)) !== 0)) {
    throw corrupt(`s_desc_size ${descSize} is invalid for a 64bit filesystem`);
  }
  const groupCount = Math.ceil((blocksCount - firstDataBlock) / blocksPerGroup);
  if (inodesCount > groupCount * inodesPerGroup || inodesCount < Math.min(11, groupCount * inodesPerGroup)) {
    throw corrupt(`s_inodes_count ${inodesCount} does not match ${groupCount} groups of ${inodesPerGroup} inodes`);
  }
  if (firstInode < 11 || firstInode > inodesCount) throw corrupt(`s_first_ino ${firstInode} is out of range`);
  if (blocksCount * blockSize > partitionBytes) {
    throw corrupt(`the filesystem claims ${blocksCount * blockSize} bytes but its partition holds only ${partitionBytes}`);
  }

  const needsRecovery = (featureIncompat & INCOMPAT.RECOVER) !== 0;
  const badIncompat = unsupportedIncompat(featureIncompat);
  if (badIncompat.length > 0) {
    throw new Ext4Error('fs.unsupported-feature', `unsupported ext4 incompatible feature(s): ${badIncompat.join(', ')}`);
  }
  const badRo = unsupportedRoCompat(featureRoCompat);
  if (badRo.length > 0) {
    throw new Ext4Error('fs.unsupported-feature', `unsupported ext4 read-only-compatible feature(s): ${badRo.join(', ')}`);
  }

  const uuid = new Uint8Array(b.subarray(0x68, 0x78));
  let checksumSeed = 0;
  if (metadataCsum) {
    checksumSeed = (featureIncompat & INCOMPAT.CSUM_SEED) !== 0 ? b.readUInt32LE(0x270) : crc32cRaw(0xffffffff, uuid);
  }
  const hashSeed = new Uint32Array(4);
  for (let i = 0; i < 4; i += 1) hashSeed[i] = b.readUInt32LE(0xec + i * 4);
  return {
    inodesCount,
    blocksCount,
    firstDataBlock,
    blockSize,
    blocksPerGroup,
    inodesPerGroup,
    inodeSize,
    firstInode,
    revLevel,
    featureCompat,
    featureIncompat,
    featureRoCompat,
    descSize,
    firstMetaBg: b.readUInt32LE(0x104),
    groupCount,
    backupGroups: [b.readUInt32LE(0x24c), b.readUInt32LE(0x250)],
    hashSeed,
    defHashVersion: b[0xfc]!,
    flags: b.readUInt32LE(0x160),
    uuid,
    volumeName: b.toString('latin1', 0x78, 0x88).replace(/\0.*$/s, ''),
    hasJournal: (featureCompat & COMPAT_HAS_JOURNAL) !== 0,
    needsRecovery,
    metadataCsum,
    checksumSeed,
  };
}
