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
import { HASH, dirHash, dxSearch, parseDxEntries } from './htree.js';
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
const HTREE_LOOKUPS_BEFORE_FULL_READ = 32;

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
  /** Hash lookups per directory before it is read whole and cached (tests raise it to force hashing). */
  htreeLookupLimit = HTREE_LOOKUPS_BEFORE_FULL_READ;
  /** Hash lookups done per directory inode. */
  private readonly htreeUses = new Map<number, number>();

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
          // htree index blocks (the root at block 0, and nodes that start with an empty entry
          // spanning the block) carry a dx_tail, not a dirent tail; stale bytes left from the
          // leaf they replaced can look like one, so only leaves are checked here (the hash
          // lookup checks index blocks).
          const indexBlock =
            (dir.flags & INODE_FLAGS.INDEX) !== 0 &&
            (run.logical + i === 0 || (block.readUInt32LE(0) === 0 && (block.readUInt16LE(4) === sb.blockSize || (sb.blockSize === 65536 && block.readUInt16LE(4) === 0))));
          if (sb.metadataCsum && !indexBlock) verifyDirBlock(block, dir.checksumSeed, `${where} block ${run.logical + i}`);
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

  /**
   * Look `key` up in an htree directory by its hash: the root, at most two index blocks and one
   * leaf (plus the next leaves while hash collisions continue). Returns null when the name is
   * not there, undefined when the index cannot be used (then the caller reads the whole
   * directory, which is always correct).
   */
  private async htreeLookup(dir: Inode, nameBytes: Buffer, path: string): Promise<RawDirEntry | null | undefined> {
    const sb = this.superblock;
    const bs = sb.blockSize;
    const runs = await this.blockRuns(dir);
    const dirBlocks = Math.ceil(dir.size / bs);
    const physical = (logical: number): number | undefined => {
      if (logical >= dirBlocks) return undefined;
      for (const run of runs) if (!run.unwritten && logical >= run.logical && logical < run.logical + run.count) return run.physical + logical - run.logical;
      return undefined;
    };
    const where = `directory ${path} (inode ${dir.number}) htree`;
    const rootBlock = physical(0);
    if (rootBlock === undefined) return undefined;
    const root = await this.reader.block(rootBlock, where);
    // dx_root: "." (12 bytes), ".." (rec_len = rest of block), then dx_root_info at 24.
    if (root.readUInt16LE(4) !== 12 || root.readUInt16LE(12 + 4) !== bs - 12 || root.readUInt32LE(24) !== 0 || root[24 + 5] !== 8) return undefined;
    let version = root[24 + 4]!;
    const levels = root[24 + 6]!;
    if (levels > (hasIncompat(sb, INCOMPAT.LARGEDIR) ? 2 : 1)) return undefined;
    if (version <= HASH.TEA && (sb.flags & 0x2) !== 0) version += 3; // EXT2_FLAGS_UNSIGNED_HASH
    if (version > HASH.TEA_UNSIGNED) return undefined;
    const { hash } = dirHash(nameBytes, version, sb.hashSeed);

    const seed = sb.metadataCsum ? dir.checksumSeed : undefined;
    let level = parseDxEntries(root, 24 + 8, where, seed);
    let index = dxSearch(level, hash);
    for (let depth = 0; depth < levels; depth += 1) {
      const nodeBlock = physical(level.blocks[index]!);
      if (nodeBlock === undefined) return undefined;
      const node = await this.reader.block(nodeBlock, where);
      if (node.readUInt32LE(0) !== 0 || node.readUInt16LE(4) !== bs) return undefined; // fake dirent of an index node
      level = parseDxEntries(node, 8, where, seed);
      index = dxSearch(level, hash);
    }
    const hasFileType = hasIncompat(sb, INCOMPAT.FILETYPE);
    const key = nameBytes.toString('latin1');
    for (;;) {
      const logical = level.blocks[index]!;
      const leafBlock = physical(logical);
      if (leafBlock === undefined) return undefined;
      const leaf = await this.reader.block(leafBlock, `${where} leaf ${logical}`);
      if (sb.metadataCsum) verifyDirBlock(leaf, dir.checksumSeed, `${where} leaf ${logical}`);
      const entries: RawDirEntry[] = [];
      parseDirEntries(leaf, hasFileType, sb.inodesCount, `${where} leaf ${logical}`, entries);
      const found = entries.find((e) => e.key === key);
      if (found) return found;
      // A set low bit on the next index hash means the same hash continues in the next leaf.
      const next = index + 1;
      if (next >= level.hashes.length) {
        return levels > 0 ? undefined : null; // continuation across index blocks: let the linear read decide
      }
      const nextHash = level.hashes[next]!;
      if ((nextHash & 1) === 0 || (nextHash & ~1) >>> 0 !== hash) return null;
      index = next;
    }
  }

  /** The directory entry `name` in `dir`, or undefined. */
  async findEntry(dir: Inode, name: string, path: string): Promise<RawDirEntry | undefined> {
    const nameBytes = Buffer.from(name, 'utf8');
    const key = nameBytes.toString('latin1');
    const cached = this.dirCache.get(dir.number);
    if (cached) return cached.byKey.get(key);
    if (dir.type !== 'dir') throw new Ext4Error('fs.not-a-directory', `${path} is not a directory`);
    this.refuseEncrypted(dir, path);
    const indexed = (dir.flags & INODE_FLAGS.INDEX) !== 0 && (dir.flags & INODE_FLAGS.INLINE_DATA) === 0 && name !== '.' && name !== '..';
    // Hash lookups read a few blocks; after many in one directory, reading it whole once is cheaper.
    const uses = (this.htreeUses.get(dir.number) ?? 0) + 1;
    this.htreeUses.set(dir.number, uses);
    if (this.htreeUses.size > 65536) this.htreeUses.clear();
    if (indexed && uses <= this.htreeLookupLimit) {
      const hit = await this.htreeLookup(dir, nameBytes, path);
      if (hit !== undefined) return hit ?? undefined;
    }
    return (await this.directory(dir, path)).byKey.get(key);
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
    // A trailing slash names a directory: follow a final symlink and insist on a directory.
    const mustBeDirectory = /[^/]\/+$/.test(path);
    const follow = mustBeDirectory || (options.follow ?? true);
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
      const entry = await this.findEntry(current, name, here);
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
    if (mustBeDirectory && current.type !== 'dir') throw new Ext4Error('fs.not-a-directory', `${path.replace(/\/+$/, '')} is not a directory`);
    return current;
  }

  async readdir(path: string): Promise<DirEntry[]> {
    const dir = await this.resolve(path);
    if (dir.type !== 'dir') throw new Ext4Error('fs.not-a-directory', `${path} is not a directory`);
    const parsed = await this.directory(dir, path);
    const entries = parsed.entries.map(({ name, inode, type }) => ({ name, inode, type }));
    if (!hasIncompat(this.superblock, INCOMPAT.FILETYPE)) {
      // Without the filetype feature, entries carry no type: take it from each inode (an
      // unreadable inode leaves 'unknown'; lookups of it report the problem).
      for (const entry of entries) entry.type = await this.inode(entry.inode).then((i) => i.type, () => 'unknown' as const);
    }
    return entries;
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
