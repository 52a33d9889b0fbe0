import { constants as fsConstants, readSync, statfsSync, type Stats } from 'node:fs';
import { open, rm, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { QlayerError } from '../errors.js';
import type { ByteSource } from './byte-source.js';

/**
 * A host file opened for positional I/O. Every byte the engine writes goes through this
 * interface, which is what lets tests replace it with a fault-injecting one and stop a
 * recompose after its Nth write or fsync.
 */
export interface HostFile {
  readonly path: string;
  readonly writable: boolean;
  /** The OS file descriptor, when there is one (lets src/io/sparse.ts ask where the holes are). */
  readonly fd?: number;
  /** Current length of the host file in bytes. */
  length(): Promise<number>;
  /** Read up to into.length bytes at `position`; bytes past end of file are zero-filled. Returns the bytes that existed. */
  read(into: Uint8Array, position: number): Promise<number>;
  /** Write all of `data` at `position`. */
  write(data: Uint8Array, position: number): Promise<void>;
  truncate(length: number): Promise<void>;
  /** fsync: the ordering points of crash safety. */
  sync(): Promise<void>;
  close(): Promise<void>;
}

export type OpenMode = 'read' | 'write' | 'create' | 'create-exclusive';

/**
 * How carefully to open a file. Files that an image names (backing and data files) come from
 * whoever wrote the image, so they are opened with `regularOnly`: O_NONBLOCK, because opening a
 * FIFO would otherwise block until some writer appears (a hang, not an error); an fstat of the
 * opened descriptor, because devices and /proc files lie about their size or never end; and,
 * with `noFollow`, O_NOFOLLOW, so that a name swapped for a symlink after it was checked is
 * refused instead of followed.
 */
export interface OpenOptions {
  regularOnly?: boolean;
  /** Refuse a symlink as the last component (the caller passes a path it already resolved). */
  noFollow?: boolean;
}

/** Opens host files and syncs directories; the seam where fault injection plugs in. */
export interface FileSystemAccess {
  open(path: string, mode: OpenMode, options?: OpenOptions): Promise<HostFile>;
  /** fsync a directory, so that a create or rename inside it is durable. */
  syncDirectory(path: string): Promise<void>;
  /** Delete a file (a missing one is not an error): cleanup of an output that failed half-way. */
  remove(path: string): Promise<void>;
}

class NodeHostFile implements HostFile {
  constructor(
    readonly path: string,
    readonly writable: boolean,
    private readonly handle: FileHandle,
  ) {}

  get fd(): number {
    return this.handle.fd;
  }

  async length(): Promise<number> {
    return (await this.handle.stat()).size;
  }

  async read(into: Uint8Array, position: number): Promise<number> {
    // Offsets past 2^53 only come from damaged tables and lie far past any end of file: they read
    // as zeros like every byte past the end (Node 24 rejects such positions, Node 20 did not).
    if (!Number.isSafeInteger(position + into.length)) {
      into.fill(0);
      return 0;
    }
    let done = 0;
    try {
      if (into.length <= SYNC_READ_LIMIT) {
        done = preadFully(this.handle.fd, into, position);
      } else {
        while (done < into.length) {
          const { bytesRead } = await this.handle.read(into, done, into.length - done, position + done);
          if (bytesRead === 0) break;
          done += bytesRead;
        }
      }
    } catch (error) {
      throw withPath(error, this.path);
    }
    if (done < into.length) into.fill(0, done);
    return done;
  }

  async write(data: Uint8Array, position: number): Promise<void> {
    let done = 0;
    try {
      while (done < data.length) {
        const { bytesWritten } = await this.handle.write(data, done, data.length - done, position + done);
        done += bytesWritten;
      }
    } catch (error) {
      throw withPath(error, this.path);
    }
  }

  async truncate(length: number): Promise<void> {
    await this.handle.truncate(length);
  }

  async sync(): Promise<void> {
    await this.handle.sync();
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

/**
 * Reads up to this size are a synchronous pread on the main thread. Metadata walks (ext4 lookups
 * through a qcow2 chain, L2 tables) issue tens of thousands of 1-64 KiB reads that the page cache
 * answers in a few microseconds, while a FileHandle.read costs a thread-pool round trip and a
 * promise each, several times the copy.
 */
const SYNC_READ_LIMIT = 256 * 1024;

/** Synchronous pread until `into` is full or end of file; returns the bytes read (the caller zero-fills the rest). */
export function preadFully(fd: number, into: Uint8Array, position: number): number {
  let done = 0;
  while (done < into.length) {
    const n = readSync(fd, into, done, into.length - done, position + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

/** Name the file in an OS error raised through a descriptor (Node leaves `path` unset there). */
export function withPath(error: unknown, path: string): unknown {
  if (error instanceof Error && typeof (error as NodeJS.ErrnoException).code === 'string' && (error as NodeJS.ErrnoException).path === undefined) {
    (error as NodeJS.ErrnoException).path = path;
  }
  return error;
}

const openFlags: Record<OpenMode, number> = {
  read: fsConstants.O_RDONLY,
  write: fsConstants.O_RDWR,
  create: fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_TRUNC,
  'create-exclusive': fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_EXCL,
};

/** A file qlayer refuses to read as (part of) a disk: not a regular file, or on a pseudo file system. */
export class NotRegularFileError extends QlayerError {
  constructor(
    readonly path: string,
    /** What it is instead, e.g. "a FIFO", "a character device", "a file on proc". */
    readonly kind: string,
  ) {
    super('chain.not-regular-file', `${path} is ${kind}, not a regular file`);
  }
}

/** What a non-regular file is, in words; null for a regular file. */
export function nonRegularKind(stats: Stats): string | null {
  if (stats.isFile()) return null;
  if (stats.isFIFO()) return 'a FIFO';
  if (stats.isCharacterDevice()) return 'a character device';
  if (stats.isBlockDevice()) return 'a block device';
  if (stats.isSocket()) return 'a socket';
  if (stats.isDirectory()) return 'a directory';
  if (stats.isSymbolicLink()) return 'a symbolic link';
  return 'not a plain file';
}

/**
 * Kernel pseudo file systems, by statfs f_type (linux/magic.h). Their files are "regular" but
 * report size 0 or 4096 whatever they hold and are generated on read (/proc/self/environ,
 * /sys/.../config): never a disk image.
 */
const PSEUDO_FILE_SYSTEMS = new Map<number, string>([
  [0x9fa0, 'proc'],
  [0x62656572, 'sysfs'],
  [0x64626720, 'debugfs'],
  [0x74726163, 'tracefs'],
  [0x73636673, 'securityfs'],
  [0x27e0eb, 'cgroup'],
  [0x63677270, 'cgroup2'],
  [0x1cd1, 'devpts'],
  [0x6e736673, 'nsfs'],
  [0xcafe4a11, 'bpf'],
  [0x62656570, 'configfs'],
  [0xde5e81e4, 'efivarfs'],
  [0x6165676c, 'pstore'],
]);

/** The pseudo file system `path` lives on (e.g. "proc"), or null for an ordinary one. */
export async function pseudoFileSystemOf(path: string): Promise<string | null> {
  // statfs answers from the kernel's memory in microseconds: a synchronous call costs less than
  // the thread-pool round trip of the asynchronous one (each is milliseconds on a busy host).
  let info;
  try {
    info = statfsSync(path);
  } catch {
    return null;
  }
  // f_type is signed on some architectures: compare as unsigned 32-bit.
  return PSEUDO_FILE_SYSTEMS.get(Number(info.type) >>> 0) ?? null;
}

/** The real file system. */
export const nodeFileSystem: FileSystemAccess = {
  async open(path, mode, options = {}) {
    const careful = options.regularOnly === true;
    const flags = openFlags[mode] | (careful ? fsConstants.O_NONBLOCK : 0) | (options.noFollow ? fsConstants.O_NOFOLLOW : 0);
    const handle = await open(path, flags, 0o644);
    if (careful) {
      try {
        const kind = nonRegularKind(await handle.stat());
        if (kind !== null) throw new NotRegularFileError(path, kind);
        const pseudo = await pseudoFileSystemOf(path);
        if (pseudo !== null) throw new NotRegularFileError(path, `a file on ${pseudo}`);
      } catch (error) {
        await handle.close();
        throw error;
      }
    }
    return new NodeHostFile(path, mode !== 'read', handle);
  },
  async syncDirectory(path) {
    const handle = await open(path, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  },
  async remove(path) {
    await rm(path, { force: true });
  },
};

/** fsync the folder that holds `filePath`. */
export function syncParentDirectory(fs: FileSystemAccess, filePath: string): Promise<void> {
  return fs.syncDirectory(dirname(filePath));
}

/** A host file read as a ByteSource (a raw disk image). */
export async function rawFileSource(file: HostFile): Promise<ByteSource> {
  const size = await file.length();
  return {
    size,
    async readAt(into, offset) {
      await file.read(into, offset);
    },
  };
}
