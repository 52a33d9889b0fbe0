/**
 * Sharing byte ranges between host files instead of copying them: FICLONERANGE through the
 * native helper. On XFS (reflink=1), btrfs or OpenZFS >= 2.2 the destination range then points
 * at the source's blocks and costs no space until one side is written. Everywhere else (ext4,
 * tmpfs, no helper, a test's fault-injecting file without an fd) the caller copies.
 */
import type { HostFile } from './host-file.js';
import { nativeBinding } from './native.js';

/** Errors that mean "this file system (or pair of files) cannot share blocks", not a failure. */
const CANNOT_CLONE = new Set(['EOPNOTSUPP', 'EXDEV', 'EINVAL', 'ENOTTY', 'EPERM', 'ETXTBSY']);

export type CloneResult = { cloned: true } | { cloned: false; reason: string };

/**
 * Make dst[dstOffset, +length) share src[srcOffset, +length). Offsets and length must be
 * multiples of the file system block size. Returns why not when it cannot; throws only for real
 * errors (ENOSPC for the new extent metadata, EIO).
 */
export function cloneRange(src: HostFile, srcOffset: number, dst: HostFile, dstOffset: number, length: number): CloneResult {
  const b = nativeBinding();
  if (!b?.clone) return { cloned: false, reason: 'the native helper is not built' };
  if (src.fd === undefined || dst.fd === undefined) return { cloned: false, reason: 'the files have no descriptors to clone between' };
  const error = b.clone(src.fd, srcOffset, length, dst.fd, dstOffset);
  if (error === null) return { cloned: true };
  if (CANNOT_CLONE.has(error)) return { cloned: false, reason: `the file system cannot share blocks here (${error})` };
  throw Object.assign(new Error(`cloning ${length} bytes failed: ${error}`), { code: error });
}
