/** The LVM reader's errors: Ext4Error (the fs reader's one error type) with LVM codes. */
import { Ext4Error } from '../errors.js';

/** On-disk LVM data that contradicts itself or is unreadable. */
export function lvmCorrupt(message: string): Ext4Error {
  return new Ext4Error('fs.lvm-corrupt', `LVM metadata is corrupt: ${message}`);
}

/** A well-formed LVM volume this reader cannot map (thin, RAID, striped, ...). */
export function lvmUnsupported(message: string): Ext4Error {
  return new Ext4Error('fs.lvm-unsupported', message);
}
