/**
 * The optional native helper (native/, built by `npm install`): the few system calls Node's fs
 * does not expose. Loaded once; null when it was not built, was built for another Node ABI, or
 * QLAYER_NO_NATIVE=1. Every caller has a plain-Node fallback.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface NativeBinding {
  /** lseek(2); -1 for ENXIO; throws with the errno name as code otherwise. */
  seek?: (fd: number, offset: number, whence: number) => number;
  SEEK_DATA?: number | null;
  SEEK_HOLE?: number | null;
  /** ioctl(FICLONERANGE): null when cloned, else the errno name. */
  clone?: (srcFd: number, srcOffset: number, length: number, dstFd: number, dstOffset: number) => string | null;
  /** fcntl(F_OFD_GETLK) for a write lock: one lock another open file holds in the range, or null (native/locks.c). */
  lockTest?: (fd: number, start: number, length: number) => { type: 'READ' | 'WRITE'; pid: number; start: number; length: number } | null;
  /** fcntl(F_OFD_SETLK) for a shared lock on fd's open file: null when held, else the errno name (native/locks.c). */
  lockShared?: (fd: number, start: number, length: number) => string | null;
}

let binding: NativeBinding | null | undefined;

export function nativeBinding(): NativeBinding | null {
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
      binding = require(path) as NativeBinding;
    } catch {
      // Built for another Node ABI or platform: every caller falls back.
    }
    break;
  }
  return binding;
}

/** For tests: forget the loaded helper so QLAYER_NO_NATIVE is read again. */
export function resetNativeBinding(): void {
  binding = undefined;
}
