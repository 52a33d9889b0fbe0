/**
 * Directory entries (ext4_dir_entry_2). Linear directories and the leaf blocks of htree
 * directories share one format; htree index blocks start with a fake entry of inode 0 whose
 * rec_len covers the whole block, so reading every block of a directory in order visits every
 * live entry exactly once, whatever its indexing.
 */
import { crc32cRaw } from '../crc.js';
import { Ext4Error, corrupt } from '../errors.js';
import type { FileType } from './inode.js';

export interface DirEntry {
  name: string;
  inode: number;
  type: FileType;
}

/** The raw name bytes, as latin1 (lossless), for exact matching. */
export interface RawDirEntry extends DirEntry {
  key: string;
}

const DIRENT_TYPES: FileType[] = ['unknown', 'file', 'dir', 'char', 'block', 'fifo', 'socket', 'symlink'];

function decodeRecLen(raw: number, blockSize: number): number {
  if (blockSize < 65536) return raw;
  if (raw === 65535 || raw === 0) return blockSize;
  return (raw & 65532) | ((raw & 3) << 16);
}

/**
 * Parse one area of directory entries (a block, or a part of an inline directory).
 * `where` names it in errors. Entries with inode 0 (deleted, htree index, checksum tail) are skipped.
 */
export function parseDirEntries(
  area: Buffer,
  hasFileType: boolean,
  maxInode: number,
  where: string,
  out: RawDirEntry[],
  blockSize = area.length,
): void {
  let at = 0;
  while (at < area.length) {
    if (at + 8 > area.length) throw corrupt(`${where}: directory entry at byte ${at} is cut off by the end of the block`);
    const inode = area.readUInt32LE(at);
    const recLen = decodeRecLen(area.readUInt16LE(at + 4), blockSize);
    const nameLen = hasFileType ? area[at + 6]! : area.readUInt16LE(at + 6);
    if (recLen < 8 || recLen % 4 !== 0 || at + recLen > area.length) {
      throw corrupt(`${where}: directory entry at byte ${at} has rec_len ${recLen}, which runs past its block of ${area.length} bytes`);
    }
    if (inode !== 0) {
      if (8 + nameLen > recLen) throw corrupt(`${where}: directory entry at byte ${at} has a ${nameLen}-byte name in a ${recLen}-byte record`);
      if (nameLen === 0) throw corrupt(`${where}: directory entry at byte ${at} has an empty name`);
      if (inode > maxInode) throw corrupt(`${where}: directory entry at byte ${at} names inode ${inode}, out of range (1..${maxInode})`);
      const nameBytes = area.subarray(at + 8, at + 8 + nameLen);
      const type = hasFileType ? (DIRENT_TYPES[area[at + 7]!] ?? 'unknown') : 'unknown';
      out.push({ name: nameBytes.toString('utf8'), key: nameBytes.toString('latin1'), inode, type });
    }
    at += recLen;
  }
}

/**
 * With metadata_csum, a leaf block ends in a 12-byte fake entry (inode 0, rec_len 12, name_len 0,
 * file type 0xDE) holding crc32c(inode seed, block without the tail). Index blocks have other
 * tails and are not checked here.
 */
export function verifyDirBlock(block: Buffer, seed: number, where: string): void {
  const t = block.length - 12;
  if (block.readUInt32LE(t) !== 0 || block.readUInt16LE(t + 4) !== 12 || block[t + 6] !== 0 || block[t + 7] !== 0xde) return;
  const stored = block.readUInt32LE(t + 8);
  const computed = crc32cRaw(seed, block.subarray(0, t));
  if (stored !== computed) {
    throw new Ext4Error('fs.bad-checksum', `${where}: directory block checksum mismatch (stored 0x${stored.toString(16)}, computed 0x${computed.toString(16)})`);
  }
}
