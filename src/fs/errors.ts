import { QlayerError } from '../errors.js';

/**
 * Stable codes of the guest-filesystem reader. Scripts match on these, so they never change
 * meaning; new situations get new codes.
 */
export type Ext4ErrorCode =
  | 'fs.not-found'
  | 'fs.not-a-directory'
  | 'fs.is-a-directory'
  | 'fs.not-a-regular-file'
  | 'fs.needs-recovery'
  | 'fs.unsupported-feature'
  | 'fs.encrypted'
  | 'fs.corrupt'
  | 'fs.bad-checksum'
  | 'fs.symlink-loop'
  | 'fs.not-ext'
  | 'fs.file-too-large'
  | 'fs.invalid-path'
  | 'fs.not-a-symlink'
  | 'fs.partition-not-found'
  | 'fs.partition-ambiguous'
  | 'fs.partition-table-corrupt'
  | 'fs.layout-changed'
  | 'fs.orphans-pending'
  | 'fs.not-writable'
  | 'fs.lvm-corrupt'
  | 'fs.lvm-unsupported'
  | 'fs.lvm-missing-pv';

/** Every error the filesystem reader raises on purpose (bad input never escapes as a TypeError). */
export class Ext4Error extends QlayerError {
  declare readonly code: Ext4ErrorCode;
  constructor(code: Ext4ErrorCode, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/** Shorthand for the most common case: on-disk data that contradicts itself. */
export function corrupt(message: string): Ext4Error {
  return new Ext4Error('fs.corrupt', `ext4 metadata is corrupt: ${message}`);
}
