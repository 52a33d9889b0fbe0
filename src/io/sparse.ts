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
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { HostFile } from './host-file.js';

interface SeekBinding {
  seek(fd: number, offset: number, whence: number): number;
  SEEK_DATA: number | null;
  SEEK_HOLE: number | null;
}

export interface ByteRange {
  offset: number;
  length: number;
}

let binding: SeekBinding | null | undefined;

/** The native helper, or null when it is missing, disabled, or cannot seek data/holes here. */
function loadBinding(): SeekBinding | null {
  if (binding !== undefined) return binding;
  binding = null;
  if (process.env.QLAYER_NO_NATIVE === '1') return binding;
  // From src/io (tests, tsx) or dist/src/io (the build): native/ sits at the package root.
  const here = dirname(fileURLToPath(import.meta.url));
  const require = createRequire(import.meta.url);
  for (const up of [join(here, '..', '..'), join(here, '..', '..', '..')]) {
    const path = join(up, 'native', 'build', 'Release', 'qlayer_seek.node');
    if (!existsSync(path)) continue;
    try {
      const loaded = require(path) as SeekBinding;
      if (typeof loaded.seek === 'function' && typeof loaded.SEEK_DATA === 'number' && typeof loaded.SEEK_HOLE === 'number') binding = loaded;
    } catch {
      // Built for another Node ABI or platform: fall back to reading.
    }
    break;
  }
  return binding;
}

/** True when dataRanges can answer at all (the helper is loaded); for tests and diagnostics. */
export function sparseSupported(): boolean {
  return loadBinding() !== null;
}

/** For tests: forget the loaded helper so QLAYER_NO_NATIVE is read again. */
export function resetSparseBinding(): void {
  binding = undefined;
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
      const data = b.seek(fd, pos, b.SEEK_DATA!);
      if (data < 0 || data >= end) break;
      let hole = b.seek(fd, data, b.SEEK_HOLE!);
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
