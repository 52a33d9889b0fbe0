/**
 * The one ext4 write a recompose needs: turning a placeholder's unwritten extents into written
 * ones. fallocate(2) leaves extents flagged unwritten (ee_len above 32768), which read as zeros
 * whatever the disk holds; once the app's bytes sit under them, clearing that flag makes the
 * file read them. Nothing else on disk records the state: the block bitmaps, i_blocks and i_size
 * already count the blocks. What changes is the extent entry's length field, plus the checksum
 * that covers it with metadata_csum: the inode's (extents in i_block) or the extent block's tail
 * (extents in leaf blocks). debugfs's `replace_node` without `--uninit` does the same, and the
 * tests hold this code to its bytes.
 *
 * Idempotent: an extent already written is left alone, so an interrupted recompose reruns it.
 */
import type { BlockReader } from './block-reader.js';
import { EXTENT_MAGIC, MAX_INIT_LEN, extentBlockChecksum, extentTailOffset } from './block-map.js';
import { INODE_FLAGS, storeInodeChecksum, type Inode } from './inode.js';
import type { Superblock } from './superblock.js';
import { corrupt } from '../errors.js';

/** Writes bytes at a byte offset inside the filesystem (the caller adds the partition's offset). */
export type FilesystemWriter = (data: Buffer, fsOffset: number) => Promise<void>;

export interface ExtentFlipCount {
  /** Unwritten extents turned written. */
  flipped: number;
  /** Extents that were written already (a rerun, or a file that never had unwritten ones). */
  alreadyWritten: number;
  /** Metadata blocks (or inodes) written back. */
  blocksWritten: number;
}

/** Clear the unwritten flag of every leaf entry in `node`; returns how many changed. */
function flipLeafEntries(node: Buffer, entries: number, count: ExtentFlipCount): number {
  let changed = 0;
  for (let i = 0; i < entries; i += 1) {
    const at = 12 + i * 12 + 4;
    const rawLen = node.readUInt16LE(at);
    if (rawLen > MAX_INIT_LEN) {
      node.writeUInt16LE(rawLen - MAX_INIT_LEN, at);
      changed += 1;
    } else {
      count.alreadyWritten += 1;
    }
  }
  count.flipped += changed;
  return changed;
}

/**
 * Mark every extent of `inode` written. The caller has already walked the tree with mapBlocks,
 * which checks magic, depth, ordering, bounds, loops and checksums, so this walk can follow it
 * without repeating those checks; it still refuses anything that is not an extent node.
 */
export async function markInodeExtentsWritten(sb: Superblock, reader: BlockReader, inode: Inode, write: FilesystemWriter): Promise<ExtentFlipCount> {
  const count: ExtentFlipCount = { flipped: 0, alreadyWritten: 0, blocksWritten: 0 };
  if ((inode.flags & INODE_FLAGS.EXTENTS) === 0) return count; // block-mapped files have no unwritten state

  const headerOf = (node: Buffer, where: string): { entries: number; max: number; depth: number } => {
    if (node.readUInt16LE(0) !== EXTENT_MAGIC) throw corrupt(`${where}: not an extent node`);
    return { entries: node.readUInt16LE(2), max: node.readUInt16LE(4), depth: node.readUInt16LE(6) };
  };

  const visitBlock = async (blockNumber: number): Promise<void> => {
    const where = `inode ${inode.number} extent block ${blockNumber}`;
    // A copy: the reader's cache must keep what the disk held when it was read.
    const block = Buffer.from(await reader.block(blockNumber, where));
    const header = headerOf(block, where);
    if (header.depth > 0) {
      for (let i = 0; i < header.entries; i += 1) {
        const at = 12 + i * 12;
        await visitBlock(block.readUInt32LE(at + 4) + block.readUInt16LE(at + 8) * 2 ** 32);
      }
      return;
    }
    if (flipLeafEntries(block, header.entries, count) === 0) return;
    const tail = extentTailOffset(block, header.max);
    if (sb.metadataCsum && tail >= 0) block.writeUInt32LE(extentBlockChecksum(block, tail, inode.checksumSeed), tail);
    await write(block, blockNumber * sb.blockSize);
    count.blocksWritten += 1;
  };

  const raw = Buffer.from(inode.raw);
  const root = raw.subarray(0x28, 0x28 + 60);
  const header = headerOf(root, `inode ${inode.number} extent root`);
  if (header.depth > 0) {
    for (let i = 0; i < header.entries; i += 1) {
      const at = 12 + i * 12;
      await visitBlock(root.readUInt32LE(at + 4) + root.readUInt16LE(at + 8) * 2 ** 32);
    }
    return count;
  }
  if (flipLeafEntries(root, header.entries, count) === 0) return count;
  if (sb.metadataCsum) storeInodeChecksum(inode.checksumSeed, raw, sb.inodeSize);
  await write(raw, inode.offset);
  count.blocksWritten += 1;
  return count;
}
