/**
 * Seeding a new home disk with the base's /home: the tree is read offline from the base through
 * qlayer's own ext4 reader and written into a private host folder, which mke2fs -d then copies
 * into the home disk (home-disk.ts). Without it, the empty home disk the guest mounts over /home
 * hides the accounts' home folders the base was made with.
 *
 * What is copied: folders, regular files and symlinks, with their mode, owner, group and mtime
 * (whole seconds: the reader gives no nanoseconds). What is not, each named in the result:
 * devices, FIFOs and sockets (nothing in a home needs them, and mke2fs would copy a host FIFO
 * as one). Extended attributes and ACLs are not copied either. A hard-linked file is copied
 * once per name, as files of their own: the reader gives no cheap way to pair names to inodes
 * across the tree, and a home rarely holds hard links.
 *
 * The base is untrusted: a name the host would read as a path (".", "..", one holding "/") is
 * skipped, every host file is created exclusively (a second entry of the same name cannot make
 * a write follow a symlink out of the folder), and a folder met twice (a loop in a damaged
 * filesystem) is skipped.
 */
import { chmod, lchown, lutimes, mkdir, open, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import type { FileInfo, GuestFilesystem } from '../fs/index.js';
import { LayerError } from './errors.js';

/** Where the tree comes from in the base. */
export const HOME_ROOT = '/home';
const BLOCK = 4096;

export interface SkippedEntry {
  /** The path in the base, e.g. /home/alice/.pipe. */
  path: string;
  /** Why: its kind (fifo, socket, char, block, unknown) or what is wrong with it. */
  reason: string;
}

/** What a home disk was seeded with: counts of what was copied, and what was not. */
export interface HomeSeed {
  files: number;
  folders: number;
  symlinks: number;
  /** Sum of the regular files' sizes. */
  bytes: number;
  skipped: SkippedEntry[];
  /** Why nothing was copied although a base was given (its root filesystem could not be read). */
  notSeeded?: string;
}

interface TreeEntry {
  /** Relative to /home, "/"-separated. */
  path: string;
  info: FileInfo;
  /** For folders: the bytes their entries take (to size the folder's blocks). */
  entryBytes?: number;
}

/** The base's /home as read: /home's own metadata, and its entries, each folder before its contents. */
export interface HomeTree {
  root: FileInfo;
  /** The bytes /home's own entries take. */
  rootEntryBytes: number;
  entries: TreeEntry[];
  skipped: SkippedEntry[];
}

const guestPath = (relative: string): string => (relative === '' ? HOME_ROOT : `${HOME_ROOT}/${relative}`);

/**
 * Read the metadata of the base's /home tree (no file contents yet). Null when the base has no
 * /home folder, or an empty one: the home disk is then made empty, as before seeding existed.
 */
export async function readHomeTree(filesystem: GuestFilesystem): Promise<HomeTree | null> {
  let root: FileInfo;
  try {
    root = await filesystem.lookup(HOME_ROOT, { follow: false });
  } catch (error) {
    if ((error as { code?: string }).code === 'fs.not-found') return null;
    throw error;
  }
  if (root.type !== 'dir') return null;
  const entries: TreeEntry[] = [];
  const skipped: SkippedEntry[] = [];
  const seenFolders = new Set<number>([root.inode]);
  const pending: TreeEntry[] = [{ path: '', info: root }];
  const rootEntry = pending[0]!;
  // Depth first with an explicit stack: a deep tree must not exhaust the call stack.
  for (let folder = pending.pop(); folder; folder = pending.pop()) {
    let entryBytes = 24; // "." and ".."
    for (const entry of await filesystem.readdir(guestPath(folder.path))) {
      if (entry.name === '.' || entry.name === '..') continue;
      const path = folder.path === '' ? entry.name : `${folder.path}/${entry.name}`;
      if (entry.name.includes('/') || entry.name.includes('\0')) {
        skipped.push({ path: guestPath(path), reason: 'a name that is not a file name' });
        continue;
      }
      // The reader decodes names as UTF-8: a name in another encoding would not be found again.
      if (entry.name.includes('\uFFFD')) {
        skipped.push({ path: guestPath(path), reason: 'a name that is not UTF-8' });
        continue;
      }
      entryBytes += 8 + Math.ceil(Buffer.byteLength(entry.name) / 4) * 4;
      const info = await filesystem.lookup(guestPath(path), { follow: false });
      if (info.type === 'dir') {
        if (seenFolders.has(info.inode)) {
          skipped.push({ path: guestPath(path), reason: 'a folder met twice (a loop in a damaged filesystem)' });
          continue;
        }
        seenFolders.add(info.inode);
        const child = { path, info };
        entries.push(child);
        pending.push(child);
      } else if (info.type === 'file' || info.type === 'symlink') {
        entries.push({ path, info });
      } else {
        skipped.push({ path: guestPath(path), reason: info.type });
      }
    }
    folder.entryBytes = entryBytes;
  }
  if (entries.length === 0 && skipped.length === 0) return null;
  return { root, rootEntryBytes: rootEntry.entryBytes ?? 24, entries, skipped };
}

/** mke2fs's default journal size (blocks of 4 KiB) for a filesystem of `blocks` blocks. */
function journalBlocks(blocks: number): number {
  const table: [number, number][] = [
    [32768, 1024],
    [256 * 1024, 4096],
    [512 * 1024, 8192],
    [4096 * 1024, 16384],
    [8192 * 1024, 32768],
    [16384 * 1024, 65536],
    [32768 * 1024, 131072],
  ];
  return table.find(([below]) => blocks < below)?.[1] ?? 262144;
}

/**
 * Refuse (home.too-small) when the tree cannot fit a home disk of `size` bytes. An estimate
 * on the safe side of what mke2fs does with /etc/mke2fs.conf's defaults: the files' and
 * folders' blocks against what is left after the inode tables (one 256-byte inode per 4 KiB
 * below 512 MiB, per 16 KiB above), the journal and 2 MiB of group metadata. mke2fs running out
 * of room despite it is reported the same way (home-disk.ts).
 */
export function assertHomeFits(tree: HomeTree, size: number): void {
  let blocks = 0;
  let bytes = 0;
  for (const { info, entryBytes } of [{ info: tree.root, entryBytes: tree.rootEntryBytes }, ...tree.entries]) {
    if (info.type === 'file') {
      const data = Math.ceil(info.size / BLOCK);
      blocks += data + Math.ceil(data / 32768); // an extent maps at most 128 MiB
      bytes += info.size;
    } else if (info.type === 'dir') {
      blocks += Math.max(1, Math.ceil(((entryBytes ?? 0) * 1.25) / BLOCK)); // room for hash-tree slack
    } else if (info.type === 'symlink' && info.size >= 60) {
      blocks += 1; // a short target lives in the inode
    }
  }
  const inodeRatio = size < 512 * 1024 ** 2 ? 4096 : 16384;
  const inodes = Math.floor(size / inodeRatio);
  const overhead = inodes * 256 + journalBlocks(size / BLOCK) * BLOCK + 2 * 1024 ** 2;
  const room = size - overhead;
  const need = blocks * BLOCK;
  if (need > room || tree.entries.length + 16 > inodes) {
    throw new LayerError(
      'home.too-small',
      `the base's /home (${tree.entries.length} entries, ${mib(bytes)} in files) does not fit a home disk of ${mib(size)} (about ${mib(Math.max(0, room))} of it holds files); give a larger --home, at least ${mib(need + overhead + 16 * 1024 ** 2)}`,
    );
  }
}

const mib = (bytes: number): string => `${(bytes / 1024 ** 2).toFixed(bytes < 10 * 1024 ** 2 ? 1 : 0)} MiB`;

/** Ownership needs root: as anyone else, mke2fs -d would copy the wrong owners. */
async function own(path: string, info: FileInfo): Promise<void> {
  try {
    await lchown(path, info.uid, info.gid);
  } catch (error) {
    if ((error as { code?: string }).code !== 'EPERM') throw error;
    throw new LayerError('home.seed-needs-root', `seeding the home disk with the base's /home keeps its owners (uid ${info.uid}), which only root can give; run qlayer as root`);
  }
}

const allZero = (chunk: Buffer): boolean => chunk.every((byte) => byte === 0);

/** One regular file: zero chunks are left as holes (mke2fs -d keeps holes), then owner, mode, mtime. */
async function copyFile(filesystem: GuestFilesystem, from: string, to: string, info: FileInfo): Promise<void> {
  const handle = await open(to, 'wx', 0o600);
  try {
    let position = 0;
    for await (const chunk of filesystem.readFileChunks(from)) {
      if (!allZero(chunk)) await handle.write(chunk, 0, chunk.length, position);
      position += chunk.length;
    }
    if (position !== info.size) throw new LayerError('home.seed-failed', `${from}: read ${position} bytes of ${info.size}`);
    await handle.truncate(info.size);
    await own(to, info);
    await handle.chmod(info.mode & 0o7777); // after the owner: chown clears set-id bits
    await handle.utimes(info.mtime, info.mtime);
  } finally {
    await handle.close();
  }
}

/**
 * Write `tree` into `target` (an empty folder the caller made private): its contents become
 * the home disk's root. Folders get their mode and mtime last, deepest first, so that writing
 * their contents does not change the mtime.
 */
export async function writeHomeTree(filesystem: GuestFilesystem, tree: HomeTree, target: string): Promise<HomeSeed> {
  const seed: HomeSeed = { files: 0, folders: 0, symlinks: 0, bytes: 0, skipped: [...tree.skipped] };
  const folders: TreeEntry[] = [];
  for (const entry of tree.entries) {
    const to = join(target, ...entry.path.split('/'));
    const from = guestPath(entry.path);
    if (entry.info.type === 'dir') {
      await mkdir(to, { mode: 0o700 }); // fails if the name exists: nothing is written through it
      folders.push(entry);
      seed.folders += 1;
    } else if (entry.info.type === 'file') {
      await copyFile(filesystem, from, to, entry.info);
      seed.files += 1;
      seed.bytes += entry.info.size;
    } else {
      await symlink(await filesystem.readlink(from), to);
      await own(to, entry.info);
      await lutimes(to, entry.info.mtime, entry.info.mtime);
      seed.symlinks += 1;
    }
  }
  for (const folder of folders.reverse()) {
    const to = join(target, ...folder.path.split('/'));
    await own(to, folder.info);
    await chmod(to, folder.info.mode & 0o7777);
    await lutimes(to, folder.info.mtime, folder.info.mtime);
  }
  return seed;
}
