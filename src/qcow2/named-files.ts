/**
 * The one place where a file an image names (a backing file, an external data file) is turned
 * into an open host file. Images can come from untrusted owners, and a name is theirs to choose:
 * `/etc/shadow`, `../../home/x/.ssh/id_rsa`, a symlink planted next to the image, a FIFO that
 * blocks the reader, `/dev/zero`, `/proc/self/environ`. Every reader of images (the chain, map
 * and convert, info, commit, rebase, Qcow2Image itself for its data file) goes through a
 * NamedFilePolicy, so no new code path can open such a name without the checks:
 *
 * 1. syntax: a plain host path, no protocol or `json:` (referenced-names.ts);
 * 2. realpath, then confinement: the real path must be inside the folder tree of the image the
 *    user named, or inside a folder the user allowed explicitly (--allow, config `allow`);
 * 3. kind: a regular file, not on a pseudo file system (lstat before opening, so a FIFO is
 *    refused without ever blocking, and fstat of the descriptor after);
 * 4. open the real path with O_NOFOLLOW and O_NONBLOCK, so a swap after step 2 is refused.
 */
import { lstatSync, realpathSync, type Stats } from 'node:fs';
import { dirname, resolve, sep } from 'node:path';
import { nodeFileSystem, nonRegularKind, NotRegularFileError, pseudoFileSystemOf, type FileSystemAccess, type HostFile, type OpenMode } from '../io/host-file.js';
import { ChainError, Qcow2Error } from './errors.js';
import { resolveReferencedPath } from './referenced-names.js';

export type NamedFileRole = 'backing file' | 'external data file';

export interface NamedFilePolicyOptions {
  /** Folders (besides the image's own folder tree) whose files an image may name. */
  allowedDirectories?: readonly string[];
  fs?: FileSystemAccess;
}

/** A name an image holds, resolved and checked. */
export interface ResolvedName {
  /** The name resolved against the referring image's path as written (QEMU's rule). */
  path: string;
  /** The same after symlinks: the file that is actually read. */
  realPath: string;
}

/** True when `path` (already real) is `dir` or inside it. */
export function isInside(path: string, dir: string): boolean {
  return path === dir || path.startsWith(dir.endsWith(sep) ? dir : dir + sep);
}

/**
 * realpath(3) and lstat run synchronously here: they answer from the kernel's caches in
 * microseconds, while each asynchronous call is a thread-pool round trip (milliseconds on a busy
 * host), and opening an image resolves several names before its first read.
 */
function realpath(path: string): string {
  return realpathSync.native(path);
}

function realFolder(dir: string): string {
  // A folder that does not exist holds nothing: keep it (resolved) so messages can name it.
  try {
    return realpath(dir);
  } catch {
    return resolve(dir);
  }
}

export class NamedFilePolicy {
  private constructor(
    /** Real folders whose trees may hold named files; the image's own folder first. */
    readonly roots: readonly string[],
    readonly fs: FileSystemAccess,
  ) {}

  /**
   * The policy for everything below the image the user named at `imagePath`: its folder tree,
   * plus `allowedDirectories`.
   */
  static async forImage(imagePath: string, options: NamedFilePolicyOptions = {}): Promise<NamedFilePolicy> {
    const roots = [realFolder(dirname(resolve(imagePath)))];
    for (const dir of options.allowedDirectories ?? []) roots.push(realFolder(dir));
    return new NamedFilePolicy([...new Set(roots)], options.fs ?? nodeFileSystem);
  }

  /**
   * Open the file the user named (the top image): the user chose it, so it is not confined and
   * may be reached through symlinks, but it must still be a regular file (a FIFO would block).
   */
  async openTop(path: string, mode: OpenMode): Promise<{ realPath: string; file: HostFile }> {
    let realPath: string;
    try {
      realPath = realpath(path);
    } catch (cause) {
      throw new Qcow2Error('qcow2.not-found', `${path} does not exist or cannot be resolved`, { cause });
    }
    await this.assertRegular(realPath, () => `${path}`);
    // Opened by the name given: messages then name the file the way the user did.
    const file = await this.fs.open(path, mode, { regularOnly: true }).catch((error: unknown) => {
      throw this.reword(error, () => `${path}`);
    });
    return { realPath, file };
  }

  /** Resolve `name`, stored in the image at `referrer`, and check it (steps 1-3). */
  async resolve(name: string, referrer: string, role: NamedFileRole): Promise<ResolvedName> {
    const what = `${referrer}: ${role} "${name}"`;
    const path = resolveReferencedPath(name, referrer, `${referrer}: ${role}`);
    let realPath: string;
    try {
      realPath = realpath(path);
    } catch (cause) {
      if (role === 'external data file') throw new Qcow2Error('qcow2.not-found', `${what} (${path}) does not exist`, { cause });
      throw new ChainError('chain.backing-not-found', `${what} (${path}) does not exist or cannot be resolved`, { cause });
    }
    if (!this.roots.some((root) => isInside(realPath, root))) {
      const [own, ...extra] = this.roots;
      throw new ChainError(
        'chain.outside-allowed',
        `${what}${realPath === name ? '' : ` (real path ${realPath})`} is outside the image's folder ${own}${extra.length ? ` and the allowed folders ${extra.join(', ')}` : ''} (allow its folder with --allow DIR if you trust this image)`,
      );
    }
    await this.assertRegular(realPath, () => what);
    return { path, realPath };
  }

  /** Resolve, check and open `name` (all four steps). The file is opened, and named, by its real path. */
  async open(name: string, referrer: string, role: NamedFileRole, mode: OpenMode): Promise<ResolvedName & { file: HostFile }> {
    const resolved = await this.resolve(name, referrer, role);
    const file = await this.fs.open(resolved.realPath, mode, { regularOnly: true, noFollow: true }).catch((error: unknown) => {
      throw this.reword(error, () => `${referrer}: ${role} "${name}"`);
    });
    return { ...resolved, file };
  }

  /** Refuse FIFOs, devices, sockets, folders and pseudo-file-system files before any open. */
  private async assertRegular(realPath: string, what: () => string): Promise<void> {
    let stats: Stats | null;
    try {
      stats = lstatSync(realPath);
    } catch {
      stats = null;
    }
    const kind = stats === null ? null : nonRegularKind(stats);
    if (kind !== null) throw notRegular(what(), realPath, kind);
    const pseudo = await pseudoFileSystemOf(realPath);
    if (pseudo !== null) throw notRegular(what(), realPath, `a file on ${pseudo}`);
  }

  /** The open-time checks (fstat, O_NOFOLLOW's ELOOP) in the same words as the checks before. */
  private reword(error: unknown, what: () => string): unknown {
    if (error instanceof NotRegularFileError) return notRegular(what(), error.path, error.kind);
    const code = (error as NodeJS.ErrnoException | null)?.code;
    if (code === 'ELOOP') return notRegular(what(), (error as NodeJS.ErrnoException).path ?? '?', 'a symbolic link (replaced after it was checked)');
    return error;
  }
}

function notRegular(what: string, realPath: string, kind: string): ChainError {
  return new ChainError('chain.not-regular-file', `${what} is ${realPath}, which is ${kind}, not a regular file; only regular files are read as disks`);
}
