/**
 * A read-only ext2/3/4 filesystem over a ByteSource (one partition): path resolution with
 * symlinks kept inside the filesystem, directory listing, block maps and file contents.
 * Metadata reads go through the BlockReader's cache; parsed directories are cached too, so
 * locating thousands of files in one directory parses it once.
 */
import { constants as bufferConstants } from 'node:buffer';
import type { ByteSource } from '../../io/byte-source.js';
import { Ext4Error, corrupt } from '../errors.js';
import { BlockReader } from './block-reader.js';
import { mapBlocks, type BlockRun } from './block-map.js';
import { parseDirEntries, verifyDirBlock, type DirEntry, type RawDirEntry } from './directory.js';
import { INCOMPAT } from './features.js';
import { inlineDirectoryParts, readInlineData } from './inline-data.js';
import type { GroupDescriptor } from './group-descriptors.js';
import { INODE_FLAGS, ROOT_INODE, readInode, type Inode } from './inode.js';
import { SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, hasIncompat, parseSuperblock, type Superblock } from './superblock.js';

/** Linux's MAXSYMLINKS: more symlinks than this in one resolution is a loop. */
export const MAX_SYMLINKS = 40;
const PATH_MAX = 4096;
/** Directories bigger than this are refused rather than read into memory. */
const MAX_DIRECTORY_BYTES = 256 * 1024 * 1024;
const DIR_CACHE_ENTRIES = 64;
const INODE_CACHE_ENTRIES = 4096;

interface ParsedDirectory {
  entries: RawDirEntry[];
  byKey: Map<string, RawDirEntry>;
}

export interface ResolveOptions {
  /** Follow a symlink in the last component (default true, like stat(2)); false is lstat(2). */
  follow?: boolean;
}

export class Ext4Filesystem {
  readonly reader: BlockReader;
  private readonly dirCache = new Map<number, ParsedDirectory>();
  /** Parsed, verified inodes (immutable: the filesystem is read-only and offline). */
  private readonly inodeCache = new Map<number, Inode>();
  /** Group descriptors by group: at most s_groups entries of a few numbers each. */
  private readonly descriptors = new Map<number, GroupDescriptor>();

  private constructor(
    readonly superblock: Superblock,
    source: ByteSource,
  ) {
    this.reader = new BlockReader(source, superblock.blockSize, superblock.blocksCount);
  }

  static async open(source: ByteSource): Promise<Ext4Filesystem> {
    if (source.size < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE) {
      throw new Ext4Error('fs.not-ext', `the partition is only ${source.size} bytes, too small for an ext filesystem`);
    }
    const raw = Buffer.alloc(SUPERBLOCK_SIZE);
    await source.readAt(raw, SUPERBLOCK_OFFSET);
    const sb = parseSuperblock(raw, source.size);
    const fs = new Ext4Filesystem(sb, source);
    fs.reader.stats.bytesRead += SUPERBLOCK_SIZE;
    return fs;
  }

  get blockSize(): number {
    return this.superblock.blockSize;
  }

  async inode(number: number): Promise<Inode> {
    const cached = this.inodeCache.get(number);
    if (cached) return cached;
    const inode = await readInode(this.superblock, this.reader, number, this.descriptors);
    this.inodeCache.set(number, inode);
    if (this.inodeCache.size > INODE_CACHE_ENTRIES) {
      const oldest = this.inodeCache.keys().next().value;
      if (oldest !== undefined) this.inodeCache.delete(oldest);
    }
    return inode;
  }

  private refuseEncrypted(inode: Inode, path: string): void {
    if ((inode.flags & INODE_FLAGS.ENCRYPT) !== 0) {
      throw new Ext4Error('fs.encrypted', `${path} is encrypted (fscrypt); reading encrypted files is not supported`);
    }
  }

  /** Block runs of an inode (holes omitted, adjacent runs merged). */
  blockRuns(inode: Inode): Promise<BlockRun[]> {
    return mapBlocks(this.superblock, this.reader, inode);
  }

  /** Parsed entries of a directory inode, cached. */
  async directory(dir: Inode, path: string): Promise<ParsedDirectory> {
    const cached = this.dirCache.get(dir.number);
    if (cached) {
      this.dirCache.delete(dir.number);
      this.dirCache.set(dir.number, cached);
      return cached;
    }
    if (dir.type !== 'dir') throw new Ext4Error('fs.not-a-directory', `${path} is not a directory`);
    this.refuseEncrypted(dir, path);
    const sb = this.superblock;
    const hasFileType = hasIncompat(sb, INCOMPAT.FILETYPE);
    const entries: RawDirEntry[] = [];
    const where = `directory ${path} (inode ${dir.number})`;
    if ((dir.flags & INODE_FLAGS.INLINE_DATA) !== 0) {
      const { parent, areas } = inlineDirectoryParts(dir);
      if (parent < 1 || parent > sb.inodesCount) throw corrupt(`${where}: inline parent inode ${parent} is out of range`);
      entries.push({ name: '.', key: '.', inode: dir.number, type: 'dir' }, { name: '..', key: '..', inode: parent, type: 'dir' });
      for (const area of areas) parseDirEntries(area, hasFileType, sb.inodesCount, where, entries);
    } else {
      if (dir.size > MAX_DIRECTORY_BYTES) throw corrupt(`${where}: i_size ${dir.size} is beyond any real directory`);
      const runs = await this.blockRuns(dir);
      const limit = Math.ceil(dir.size / sb.blockSize);
      for (const run of runs) {
        if (run.unwritten) continue;
        for (let i = 0; i < run.count && run.logical + i < limit; i += 1) {
          const block = await this.reader.block(run.physical + i, `${where} block ${run.logical + i}`);
          if (sb.metadataCsum) verifyDirBlock(block, dir.checksumSeed, `${where} block ${run.logical + i}`);
          parseDirEntries(block, hasFileType, sb.inodesCount, `${where} block ${run.logical + i}`, entries);
        }
      }
    }
    const byKey = new Map<string, RawDirEntry>();
    for (const entry of entries) if (!byKey.has(entry.key)) byKey.set(entry.key, entry);
    const parsed = { entries, byKey };
    this.dirCache.set(dir.number, parsed);
    if (this.dirCache.size > DIR_CACHE_ENTRIES) {
      const oldest = this.dirCache.keys().next().value;
      if (oldest !== undefined) this.dirCache.delete(oldest);
    }
    return parsed;
  }

  /** The target text of a symlink inode. */
  async readLink(link: Inode, path: string): Promise<string> {
    this.refuseEncrypted(link, path);
    if (link.size === 0 || link.size > PATH_MAX) throw corrupt(`symlink ${path} has length ${link.size}`);
    let bytes: Buffer;
    if ((link.flags & INODE_FLAGS.INLINE_DATA) !== 0) {
      bytes = readInlineData(link);
    } else if (link.size < 60 && (link.flags & INODE_FLAGS.EXTENTS) === 0) {
      bytes = link.iBlock.subarray(0, link.size); // fast symlink: the target is in i_block
    } else {
      bytes = await this.readInodeData(link, 0, link.size);
    }
    return bytes.toString('utf8');
  }

  /**
   * Resolve a path to its inode. Paths are always relative to this filesystem's root: an
   * absolute symlink target restarts at the guest's root, never the host's.
   */
  async resolve(path: string, options: ResolveOptions = {}): Promise<Inode> {
    if (typeof path !== 'string' || path.includes('\0')) throw new Ext4Error('fs.invalid-path', `invalid path ${JSON.stringify(path)}`);
    const follow = options.follow ?? true;
    const root = await this.inode(ROOT_INODE);
    if (root.type !== 'dir') throw corrupt('the root inode is not a directory');
    let current = root;
    let parts = path.split('/').filter((p) => p.length > 0);
    let walked = '';
    let links = 0;
    while (parts.length > 0) {
      const name = parts.shift()!;
      if (name === '.') continue;
      const here = walked || '/';
      if (current.type !== 'dir') throw new Ext4Error('fs.not-a-directory', `${here} is not a directory`);
      const dir = await this.directory(current, here);
      const entry = dir.byKey.get(Buffer.from(name, 'utf8').toString('latin1'));
      const childPath = `${walked}/${name}`;
      if (!entry) throw new Ext4Error('fs.not-found', `${childPath} does not exist`);
      const child = await this.inode(entry.inode);
      if (child.links === 0 && child.mode === 0) throw corrupt(`${childPath} names inode ${entry.inode}, which is not in use`);
      if (child.type === 'symlink' && (parts.length > 0 || follow)) {
        links += 1;
        if (links > MAX_SYMLINKS) throw new Ext4Error('fs.symlink-loop', `too many levels of symbolic links resolving ${path} (more than ${MAX_SYMLINKS})`);
        const target = await this.readLink(child, childPath);
        if (target.startsWith('/')) {
          current = root;
          walked = '';
        }
        parts = [...target.split('/').filter((p) => p.length > 0), ...parts];
        continue;
      }
      current = child;
      walked = name === '..' ? walked.slice(0, Math.max(0, walked.lastIndexOf('/'))) : childPath;
    }
    return current;
  }

  async readdir(path: string): Promise<DirEntry[]> {
    const dir = await this.resolve(path);
    if (dir.type !== 'dir') throw new Ext4Error('fs.not-a-directory', `${path} is not a directory`);
    const parsed = await this.directory(dir, path);
    return parsed.entries.map(({ name, inode, type }) => ({ name, inode, type }));
  }

  /**
   * Bytes [offset, offset+length) of an inode's data, clipped to i_size by the caller; holes and
   * unwritten extents read as zeros, mapped runs are read with one request each.
   */
  async readInodeData(inode: Inode, offset: number, length: number, runs?: BlockRun[]): Promise<Buffer> {
    const out = Buffer.alloc(length);
    if (length === 0) return out;
    if ((inode.flags & INODE_FLAGS.INLINE_DATA) !== 0) {
      readInlineData(inode).copy(out, 0, offset, offset + length);
      return out;
    }
    const bs = this.blockSize;
    const end = offset + length;
    for (const run of runs ?? (await this.blockRuns(inode))) {
      if (run.unwritten) continue;
      const runStart = run.logical * bs;
      const runEnd = runStart + run.count * bs;
      const from = Math.max(runStart, offset);
      const to = Math.min(runEnd, end);
      if (from >= to) continue;
      const chunk = 8 * 1024 * 1024;
      for (let at = from; at < to; at += chunk) {
        const n = Math.min(chunk, to - at);
        await this.reader.readBytesAt(out.subarray(at - offset, at - offset + n), run.physical * bs + (at - runStart));
      }
    }
    return out;
  }

  /** A regular file's inode (following symlinks), refusing directories and special files. */
  async regularFile(path: string): Promise<Inode> {
    const inode = await this.resolve(path);
    if (inode.type === 'dir') throw new Ext4Error('fs.is-a-directory', `${path} is a directory`);
    if (inode.type !== 'file') throw new Ext4Error('fs.not-a-regular-file', `${path} is a ${inode.type}, not a regular file`);
    this.refuseEncrypted(inode, path);
    return inode;
  }

  async readFile(path: string): Promise<Buffer> {
    const inode = await this.regularFile(path);
    if (inode.size > bufferConstants.MAX_LENGTH) {
      throw new Ext4Error('fs.file-too-large', `${path} is ${inode.size} bytes, more than one buffer can hold; read it in chunks`);
    }
    return this.readInodeData(inode, 0, inode.size);
  }

  /** A file's contents in chunks, in order (for files of any size, e.g. `fs cat`). */
  async *readFileChunks(path: string, chunkSize = 4 * 1024 * 1024): AsyncGenerator<Buffer> {
    const inode = await this.regularFile(path);
    const runs = (inode.flags & INODE_FLAGS.INLINE_DATA) !== 0 ? [] : await this.blockRuns(inode);
    for (let at = 0; at < inode.size; at += chunkSize) {
      yield await this.readInodeData(inode, at, Math.min(chunkSize, inode.size - at), runs);
    }
  }
}
