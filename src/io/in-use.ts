import { readFile, stat } from 'node:fs/promises';
import { QlayerError } from '../errors.js';

/**
 * Is some process holding a POSIX or OFD lock on this file? QEMU (and qemu-img) lock every
 * image they open (OFD locks on fixed bytes), so a lock means a guest or tool has it open and
 * qlayer must not rewrite it. Read from /proc/locks: no native code needed, and it sees the
 * locks of every process on the host. Returns the lock lines' kinds, empty when free.
 */
export async function locksOn(path: string): Promise<string[]> {
  const info = await stat(path);
  let table: string;
  try {
    table = await readFile('/proc/locks', 'utf8');
  } catch {
    return []; // not Linux, or no procfs: nothing to report
  }
  const major = Math.floor(info.dev / 256) & 0xfff;
  const minor = (info.dev & 0xff) | ((info.dev >> 12) & 0xfff00);
  const found: string[] = [];
  for (const line of table.split('\n')) {
    // "1: OFDLCK ADVISORY  READ  -1 fd:01:1234 100 100" (blocked waiters have "->")
    const fields = line.trim().split(/\s+/);
    const id = fields.find((f) => /^[0-9a-f]+:[0-9a-f]+:\d+$/.test(f));
    if (!id) continue;
    const [maj, min, ino] = id.split(':');
    if (Number.parseInt(maj!, 16) === major && Number.parseInt(min!, 16) === minor && ino === String(info.ino)) {
      found.push(`${fields[1]} ${fields[3]}`);
    }
  }
  return found;
}

/** Thrown when an image that is about to be written is open in another process. */
export class ImageInUseError extends QlayerError {
  constructor(path: string, locks: string[]) {
    super('image.in-use', `${path} is in use: another process (a running guest, qemu-img, qemu-nbd...) holds ${locks.length} lock(s) on it; stop it first`);
  }
}

/** Refuse to write an image that some process holds QEMU's locks on. */
export async function assertNotLocked(path: string): Promise<void> {
  const locks = await locksOn(path).catch(() => [] as string[]);
  if (locks.length > 0) throw new ImageInUseError(path, locks);
}
