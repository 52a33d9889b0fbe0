import { closeSync, constants as fsConstants, openSync } from 'node:fs';
import { readdir, readFile, stat } from 'node:fs/promises';
import { QlayerError } from '../errors.js';
import { nativeBinding } from './native.js';
import { ownLockDescriptor } from './qemu-locks.js';
import { processCommandLine } from './process.js';

/**
 * Is some process holding a POSIX or OFD lock on this file? QEMU (and qemu-img) lock every
 * image they open (OFD locks on fixed bytes), so a lock means a guest or tool has it open and
 * qlayer must not rewrite it. Read from /proc/locks: no native code needed, and it sees the
 * locks of every process on the host. Returns the lock lines' kinds, empty when free.
 */
export async function locksOn(path: string): Promise<string[]> {
  return (await lockEntries(path)).map((lock) => `${lock.kind} ${lock.mode}`);
}

/** One line of /proc/locks about a file. */
export interface LockEntry {
  /** POSIX, FLOCK or OFDLCK. */
  kind: string;
  /** READ or WRITE. */
  mode: string;
  /** The holder for POSIX and FLOCK locks; -1 for OFD locks (owned by an open file, not a process). */
  pid: number;
  /** Locked byte range, inclusive; `end` is Infinity for "to EOF". */
  start: number;
  end: number;
}

/** The lock lines of /proc/locks that are about `path`'s inode (granted ones, not waiters). */
export async function lockEntries(path: string): Promise<LockEntry[]> {
  const info = await stat(path);
  let table: string;
  try {
    table = await readFile('/proc/locks', 'utf8');
  } catch {
    return []; // not Linux, or no procfs: nothing to report
  }
  const major = Math.floor(info.dev / 256) & 0xfff;
  const minor = (info.dev & 0xff) | ((info.dev >> 12) & 0xfff00);
  const found: LockEntry[] = [];
  for (const line of table.split('\n')) {
    // "1: OFDLCK ADVISORY  READ  -1 fd:01:1234 100 100" (blocked waiters have "->")
    if (line.includes('->')) continue;
    const fields = line.trim().split(/\s+/);
    const at = fields.findIndex((f) => /^[0-9a-f]+:[0-9a-f]+:\d+$/.test(f));
    if (at < 0) continue;
    const [maj, min, ino] = fields[at]!.split(':');
    if (Number.parseInt(maj!, 16) === major && Number.parseInt(min!, 16) === minor && ino === String(info.ino)) {
      const end = fields[at + 2];
      found.push({ kind: fields[1]!, mode: fields[3]!, pid: Number(fields[at - 1]), start: Number(fields[at + 1]), end: end === 'EOF' ? Infinity : Number(end) });
    }
  }
  return found;
}

/**
 * One lock another open file holds on bytes [start, start + length) of `path` (length 0: to the
 * end), asked the way QEMU asks (fcntl F_OFD_GETLK, native/locks.c); undefined when the native
 * helper is missing, the file cannot be opened or its file system cannot answer, so that the
 * caller reads /proc/locks instead. That read is exact too but slow: the first one in a process
 * waits for an RCU grace period in the kernel, 5-30 ms, which `image info` would pay on every
 * run. The descriptor is
 * opened without following FIFOs' writers (O_NONBLOCK) and closed at once; qlayer holds no POSIX
 * locks that the close could drop (its QEMU locks are OFD locks, on another descriptor).
 */
function heldLock(path: string, start: number, length: number): LockEntry | null | undefined {
  const lockTest = nativeBinding()?.lockTest;
  if (lockTest === undefined) return undefined;
  // While this process writes the image it holds QEMU's locks itself (qemu-locks.ts): ask through
  // that descriptor, which does not see its own locks, only other processes'.
  const own = ownLockDescriptor(path);
  let opened: number | undefined;
  try {
    const fd = own ?? (opened = openSync(path, fsConstants.O_RDONLY | fsConstants.O_NONBLOCK));
    const lock = lockTest(fd, start, length);
    if (lock === null) return null;
    return { kind: lock.pid === -1 ? 'OFDLCK' : 'POSIX', mode: lock.type, pid: lock.pid, start: lock.start, end: lock.length === 0 ? Infinity : lock.start + lock.length - 1 };
  } catch {
    return undefined; // unreadable or gone, or a file system that cannot answer: /proc/locks decides
  } finally {
    if (opened !== undefined) closeSync(opened);
  }
}

/**
 * QEMU's image locking (block/file-posix.c): an open image holds a lock on byte 100 + b for each
 * permission bit b it uses, and on byte 200 + b for each it does not let others share. Bit 1 is
 * WRITE: a lock covering byte 101 means some QEMU (a running guest, qemu-img, qemu-nbd) has the
 * image open for writing. A guest reading a shared base holds 100 but not 101.
 */
const QEMU_WRITE_PERMISSION_BYTE = 101;

/** Locks that say a QEMU process has this image open for writing (empty when none). */
export async function writerLocks(path: string): Promise<LockEntry[]> {
  const held = heldLock(path, QEMU_WRITE_PERMISSION_BYTE, 1);
  if (held !== undefined) return held === null ? [] : [held];
  const locks = await lockEntries(path).catch(() => [] as LockEntry[]);
  return locks.filter((lock) => lock.start <= QEMU_WRITE_PERMISSION_BYTE && QEMU_WRITE_PERMISSION_BYTE <= lock.end);
}

/**
 * The processes that have `path` open, as "pid (command line)", for error messages. OFD locks
 * name no pid, so the open files of every process are looked at: only those this user may
 * read (a guest run by libvirt as another user is not found; the message then says less).
 */
export async function openedBy(path: string): Promise<string[]> {
  const target = await stat(path).catch(() => null);
  if (target === null) return [];
  const found: string[] = [];
  for (const pid of await readdir('/proc').catch(() => [] as string[])) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
    for (const fd of fds) {
      const open = await stat(`/proc/${pid}/fd/${fd}`).catch(() => null);
      if (open !== null && open.dev === target.dev && open.ino === target.ino) {
        found.push(`pid ${pid} (${processCommandLine(Number(pid)) ?? 'command line unreadable'})`);
        break;
      }
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
  const held = heldLock(path, 0, 0);
  const locks = held === undefined ? await locksOn(path).catch(() => [] as string[]) : held === null ? [] : [`${held.kind} ${held.mode}`];
  if (locks.length > 0) throw new ImageInUseError(path, locks);
}

/** Thrown when an image a convert would read is being written by a running QEMU. */
export class ImageBeingWrittenError extends QlayerError {
  constructor(path: string, holders: string[]) {
    super(
      'image.being-written',
      `${path} is open for writing in another process${holders.length ? ` (${holders.join(', ')})` : ' (a running guest, qemu-img, qemu-nbd...)'}: ` +
        'a copy taken now may be inconsistent. Stop it first, or pass -U (--force-share) to copy it anyway, as with qemu-img',
    );
  }
}

/** Refuse to read an image a QEMU writes, unless the caller accepts a possibly torn copy. */
export async function assertNotBeingWritten(path: string): Promise<void> {
  if ((await writerLocks(path)).length > 0) throw new ImageBeingWrittenError(path, await openedBy(path));
}

/**
 * The warning info, map and check print for an image a QEMU writes (they still run: what they
 * show may be a moment's state). qemu-img 7.2 refuses these without -U instead.
 */
export async function beingWrittenWarning(path: string): Promise<string | null> {
  if ((await writerLocks(path)).length === 0) return null;
  const holders = await openedBy(path);
  return (
    `warning: ${path} is open for writing in another process${holders.length ? ` (${holders.join(', ')})` : ''}; ` +
    'what follows may not match the image a moment later (-U / --force-share silences this)'
  );
}
