/**
 * Where a host file holds data, as the file system sees it: lseek(SEEK_DATA / SEEK_HOLE)
 * through the optional native helper in native/ (Node's fs has no such call). This is what
 * lets convert skip the holes of a sparse raw file without reading them, and map report them
 * as zeros the way qemu-img does.
 *
 * Everything here is best effort: when the helper was not built (or QLAYER_NO_NATIVE=1), the
 * HostFile has no fd (a test wrapper), or the file system refuses SEEK_DATA, dataRanges
 * returns null and callers treat the whole range as data (and read it).
 */
import type { HostFile } from './host-file.js';
import { nativeBinding, resetNativeBinding } from './native.js';

export interface ByteRange {
  offset: number;
  length: number;
}

/** The native helper, or null when it is missing, disabled, or cannot seek data/holes here. */
function loadBinding(): { seek(fd: number, offset: number, whence: number): number; SEEK_DATA: number; SEEK_HOLE: number } | null {
  const b = nativeBinding();
  if (!b || typeof b.seek !== 'function' || typeof b.SEEK_DATA !== 'number' || typeof b.SEEK_HOLE !== 'number') return null;
  return { seek: b.seek, SEEK_DATA: b.SEEK_DATA, SEEK_HOLE: b.SEEK_HOLE };
}

/** True when dataRanges can answer at all (the helper is loaded); for tests and diagnostics. */
export function sparseSupported(): boolean {
  return loadBinding() !== null;
}

/** For tests: forget the loaded helper so QLAYER_NO_NATIVE is read again. */
export function resetSparseBinding(): void {
  resetNativeBinding();
}

/**
 * The data runs of `file` inside [start, end), sorted and clipped to the range; everything
 * else in the range is a hole (reads as zeros). Past end of file there is no data. Null when
 * unknown: no native helper, no fd, or the file system does not support SEEK_DATA.
 */
export async function dataRanges(file: HostFile, start: number, end: number): Promise<ByteRange[] | null> {
  const b = loadBinding();
  const fd = file.fd;
  if (!b || fd === undefined || fd < 0) return null;
  const out: ByteRange[] = [];
  let pos = start;
  try {
    while (pos < end) {
      const data = b.seek(fd, pos, b.SEEK_DATA);
      if (data < 0 || data >= end) break;
      let hole = b.seek(fd, data, b.SEEK_HOLE);
      // No hole after data cannot happen (end of file is a hole); be safe anyway.
      if (hole < 0 || hole > end) hole = end;
      if (hole <= data) return null;
      out.push({ offset: data, length: hole - data });
      pos = hole;
    }
  } catch {
    // EINVAL (no SEEK_DATA on this file system), EBADF, ...: unknown, let the caller read.
    return null;
  }
  return out;
}
