/**
 * Inline data (incompat inline_data): small files and directories kept inside the inode, the
 * first 60 bytes in i_block and the rest in the in-inode extended attribute "system.data".
 * Such files own no blocks, so their extent list is empty.
 */
import { corrupt } from '../errors.js';
import type { Inode } from './inode.js';

const XATTR_MAGIC = 0xea020000;
const XATTR_INDEX_SYSTEM = 7;
const I_BLOCK_BYTES = 60;

/** The value of system.data from the in-inode xattr area (empty when absent). */
function systemData(inode: Inode): Buffer {
  if (inode.xattrOffset < 0) return Buffer.alloc(0);
  const area = inode.raw.subarray(inode.xattrOffset);
  if (area.readUInt32LE(0) !== XATTR_MAGIC) return Buffer.alloc(0);
  const entries = area.subarray(4);
  let at = 0;
  while (at + 16 <= entries.length) {
    const nameLen = entries[at]!;
    const nameIndex = entries[at + 1]!;
    const valueOffset = entries.readUInt16LE(at + 2);
    const valueInode = entries.readUInt32LE(at + 4);
    const valueSize = entries.readUInt32LE(at + 8);
    if (nameLen === 0 && nameIndex === 0 && valueOffset === 0 && valueInode === 0) break; // end marker
    if (at + 16 + nameLen > entries.length) throw corrupt(`inode ${inode.number}: in-inode xattr entry runs past the inode`);
    const name = entries.toString('latin1', at + 16, at + 16 + nameLen);
    if (nameIndex === XATTR_INDEX_SYSTEM && name === 'data') {
      if (valueInode !== 0) throw corrupt(`inode ${inode.number}: system.data stored in an EA inode`);
      if (valueOffset + valueSize > entries.length) throw corrupt(`inode ${inode.number}: system.data value runs past the inode`);
      return entries.subarray(valueOffset, valueOffset + valueSize);
    }
    at += (16 + nameLen + 3) & ~3;
  }
  return Buffer.alloc(0);
}

/** The bytes of an inline-data inode, exactly i_size of them. */
export function readInlineData(inode: Inode): Buffer {
  const head = inode.iBlock.subarray(0, Math.min(inode.size, I_BLOCK_BYTES));
  if (inode.size <= I_BLOCK_BYTES) return Buffer.from(head);
  const rest = systemData(inode);
  if (I_BLOCK_BYTES + rest.length < inode.size) {
    throw corrupt(`inode ${inode.number}: inline data holds ${I_BLOCK_BYTES + rest.length} bytes, i_size says ${inode.size}`);
  }
  return Buffer.concat([head, rest.subarray(0, inode.size - I_BLOCK_BYTES)]);
}

/**
 * An inline directory: i_block starts with the parent's inode number (4 bytes), then entries
 * fill the rest of i_block; system.data holds a second run of entries.
 */
export function inlineDirectoryParts(inode: Inode): { parent: number; areas: Buffer[] } {
  const parent = inode.iBlock.readUInt32LE(0);
  const areas = [inode.iBlock.subarray(4, I_BLOCK_BYTES)];
  const rest = systemData(inode);
  if (rest.length > 0) areas.push(rest);
  return { parent, areas };
}
