/**
 * Reading a guest's filesystem from its virtual disk (any ByteSource: a raw file, a qcow2
 * chain, a window). Reads only, with one exception that a recompose needs:
 * markPlaceholdersWritten, which flips located placeholders' unwritten extents to written.
 *
 *   const fs = await openGuestFilesystem(disk);            // the only Linux partition
 *   const where = await fs.extents('/opt/app/lib.so');      // byte ranges on the virtual disk
 */
import { windowOf, type ByteSource, type WritableByteSource } from '../io/byte-source.js';
import { Ext4Error } from './errors.js';
import type { BlockRun } from './ext4/block-map.js';
import type { DirEntry } from './ext4/directory.js';
import { markInodeExtentsWritten } from './ext4/extent-flip.js';
import { Ext4Filesystem } from './ext4/filesystem.js';
import { RO_COMPAT } from './ext4/features.js';
import { INODE_FLAGS, type FileType, type Inode } from './ext4/inode.js';
import type { ReadStats } from './ext4/block-reader.js';
import { hasRoCompat, type Superblock } from './ext4/superblock.js';
import { volumeSource, volumeToDisk } from './lvm/mapping.js';
import { choosePartition, readVolumes, type Partition, type PartitionSelector } from './partitions.js';
import { identifyNonExt } from './probe.js';

export { Ext4Error } from './errors.js';
export type { Ext4ErrorCode } from './errors.js';
export { readPartitions, readVolumes, choosePartition, parsePartitionSelector, type Partition, type PartitionSelector } from './partitions.js';
export type { DirEntry } from './ext4/directory.js';
export type { FileType } from './ext4/inode.js';

export interface OpenGuestFilesystemOptions {
  /**
   * Partition index (1-based, as Linux numbers them; 0 = whole disk) or an LVM logical volume
   * as "VG/LV". Default: see choosePartition.
   */
  partition?: PartitionSelector;
  /**
   * Open even when the journal needs recovery. What is read may then be older than what the
   * guest last wrote (the newest metadata may sit only in the journal). Default false: refuse.
   */
  allowNeedsRecovery?: boolean;
}

export interface FileInfo {
  inode: number;
  type: FileType;
  size: number;
  /** Full i_mode (type and permission bits). */
  mode: number;
  uid: number;
  gid: number;
  links: number;
  /** Seconds since the epoch. */
  mtime: number;
  /** The data lives inside the inode (inline_data or a fast symlink): no blocks. */
  inline: boolean;
}

/** One contiguous piece of a file on the virtual disk. All values are bytes. */
export interface FileExtent {
  /** Offset in the file (a multiple of the block size). */
  fileOffset: number;
  /** Offset on the virtual disk (the partition's offset is included). */
  diskOffset: number;
  /** Whole blocks: the last extent may reach past i_size up to its block's end. */
  length: number;
  /** Allocated but unwritten (e.g. fallocate): reads as zeros whatever the disk holds. */
  unwritten: boolean;
}

export interface FileStat extends FileInfo {
  extents: FileExtent[];
}

export interface GuestFilesystem {
  readonly partition: Partition;
  readonly blockSize: number;
  readonly needsRecovery: boolean;
  readonly superblock: Superblock;
  /**
   * Metadata of `path`. Symlinks in the middle of the path are followed; a symlink in the last
   * component is NOT followed unless `{ follow: true }` (lstat semantics, like debugfs `stat`):
   * a placeholder the guest replaced with a symlink must show up as a symlink, not as its target.
   */
  lookup(path: string, options?: { follow?: boolean }): Promise<FileInfo>;
  /** Data extents of `path` (last component not followed, like lookup). */
  extents(path: string, options?: { follow?: boolean }): Promise<FileExtent[]>;
  stat(path: string, options?: { follow?: boolean }): Promise<FileStat>;
  /** Contents of a regular file; symlinks are followed (like cat). */
  readFile(path: string): Promise<Buffer>;
  readFileChunks(path: string, chunkSize?: number): AsyncGenerator<Buffer>;
  readlink(path: string): Promise<string>;
  /** Entries of a directory in on-disk order, "." and ".." included; symlinks are followed. */
  readdir(path: string): Promise<DirEntry[]>;
  /** What has been read from the disk so far (to prove lookups stay cheap). */
  readonly readStats: ReadStats;
}

function infoOf(inode: Inode): FileInfo {
  const fastSymlink = inode.type === 'symlink' && inode.size < 60 && (inode.flags & INODE_FLAGS.EXTENTS) === 0;
  return {
    inode: inode.number,
    type: inode.type,
    size: inode.size,
    mode: inode.mode,
    uid: inode.uid,
    gid: inode.gid,
    links: inode.links,
    mtime: inode.mtime,
    inline: (inode.flags & INODE_FLAGS.INLINE_DATA) !== 0 || fastSymlink,
  };
}

/**
 * Block runs as byte extents on the virtual disk. `partition` is a partition's offset, or the
 * partition itself; on an LVM logical volume a run that crosses from one of the LV's pieces to
 * the next becomes one extent per piece, since the pieces need not be adjacent on the disk.
 */
export function runsToExtents(runs: BlockRun[], blockSize: number, partition: number | Partition): FileExtent[] {
  const pieces = typeof partition === 'number' ? undefined : partition.lvm?.pieces;
  const offset = typeof partition === 'number' ? partition : partition.offset;
  if (!pieces) {
    return runs.map((run) => ({
      fileOffset: run.logical * blockSize,
      diskOffset: offset + run.physical * blockSize,
      length: run.count * blockSize,
      unwritten: run.unwritten,
    }));
  }
  return runs.flatMap((run) =>
    volumeToDisk(pieces, run.physical * blockSize, run.count * blockSize).map((range) => ({
      fileOffset: run.logical * blockSize + (range.offset - run.physical * blockSize),
      diskOffset: range.diskOffset,
      length: range.length,
      unwritten: run.unwritten,
    })),
  );
}

/** The bytes of a partition or LV as a source of their own. */
function partitionSource(disk: ByteSource, partition: Partition): ByteSource {
  if (partition.lvm) {
    if (!partition.lvm.pieces) throw new Ext4Error('fs.lvm-unsupported', partition.lvm.refused ?? `LV ${partition.name} cannot be read`);
    return volumeSource(disk, partition.lvm.pieces, partition.length);
  }
  return partition.offset === 0 && partition.length === disk.size ? disk : windowOf(disk, partition.offset, partition.length);
}

class GuestExt4 implements GuestFilesystem {
  constructor(
    readonly partition: Partition,
    private readonly fs: Ext4Filesystem,
  ) {}

  get blockSize(): number {
    return this.fs.blockSize;
  }
  get needsRecovery(): boolean {
    return this.fs.superblock.needsRecovery;
  }
  get superblock(): Superblock {
    return this.fs.superblock;
  }
  get readStats(): ReadStats {
    return this.fs.reader.stats;
  }

  async lookup(path: string, options: { follow?: boolean } = {}): Promise<FileInfo> {
    return infoOf(await this.fs.resolve(path, { follow: options.follow ?? false }));
  }

  private async extentsOf(inode: Inode): Promise<FileExtent[]> {
    return runsToExtents(await this.fs.blockRuns(inode), this.fs.blockSize, this.partition);
  }

  async extents(path: string, options: { follow?: boolean } = {}): Promise<FileExtent[]> {
    const inode = await this.fs.resolve(path, { follow: options.follow ?? false });
    if ((inode.flags & INODE_FLAGS.ENCRYPT) !== 0) {
      throw new Ext4Error('fs.encrypted', `${path} is encrypted (fscrypt); its blocks hold ciphertext`);
    }
    return this.extentsOf(inode);
  }

  async stat(path: string, options: { follow?: boolean } = {}): Promise<FileStat> {
    const inode = await this.fs.resolve(path, { follow: options.follow ?? false });
    return { ...infoOf(inode), extents: await this.extentsOf(inode) };
  }

  readFile(path: string): Promise<Buffer> {
    return this.fs.readFile(path);
  }

  readFileChunks(path: string, chunkSize?: number): AsyncGenerator<Buffer> {
    return this.fs.readFileChunks(path, chunkSize);
  }

  async readlink(path: string): Promise<string> {
    const inode = await this.fs.resolve(path, { follow: false });
    if (inode.type !== 'symlink') throw new Ext4Error('fs.not-a-symlink', `${path} is not a symbolic link`);
    return this.fs.readLink(inode, path);
  }

  readdir(path: string): Promise<DirEntry[]> {
    return this.fs.readdir(path);
  }
}

/** The partition and the ext filesystem on it, with the journal checked. */
async function openExt4(disk: ByteSource, options: OpenGuestFilesystemOptions): Promise<{ partition: Partition; fs: Ext4Filesystem }> {
  const { volumes, lvm } = await readVolumes(disk);
  const partition = await choosePartition(disk, volumes, options.partition, lvm);
  const source = partitionSource(disk, partition);
  let fs: Ext4Filesystem;
  try {
    fs = await Ext4Filesystem.open(source);
  } catch (error) {
    if (error instanceof Ext4Error && error.code === 'fs.not-ext') {
      const what = await identifyNonExt(source);
      const where = partition.scheme === 'lvm' ? `LV ${partition.name}` : partition.scheme === 'none' ? 'the disk' : `partition ${partition.index}`;
      const hint = what === 'an LVM physical volume' ? '; pick one of its logical volumes with --partition VG/LV (`qlayer fs partitions` lists them)' : '';
      throw new Ext4Error('fs.not-ext', `${where} holds ${what}, not an ext2/3/4 filesystem (only ext2/3/4 can be read)${hint}`);
    }
    throw error;
  }
  if (fs.superblock.needsRecovery && !options.allowNeedsRecovery) {
    throw new Ext4Error(
      'fs.needs-recovery',
      'the filesystem journal needs recovery: the guest did not shut down cleanly; boot it and shut it down, or run e2fsck',
    );
  }
  if (hasRoCompat(fs.superblock, RO_COMPAT.ORPHAN_PRESENT) && !options.allowNeedsRecovery) {
    // orphan_file (e2fsprogs >= 1.47.1 default): files deleted or truncated while open are still
    // listed, so blocks the guest let go of are not free yet. Like a journal to replay.
    throw new Ext4Error(
      'fs.orphans-pending',
      'the filesystem\'s orphan file is not empty: the guest did not shut down cleanly; boot it and shut it down, or run e2fsck',
    );
  }
  return { partition, fs };
}

export async function openGuestFilesystem(disk: ByteSource, options: OpenGuestFilesystemOptions = {}): Promise<GuestFilesystem> {
  const { partition, fs } = await openExt4(disk, options);
  return new GuestExt4(partition, fs);
}

/** A located placeholder: its path and the extents locate found (virtual-disk bytes). */
export interface PlaceholderLayout {
  path: string;
  extents: Array<{ fileOffset: number; diskOffset: number; length: number }>;
}

export interface MarkWrittenReport {
  /** Files that had at least one extent flipped. */
  filesChanged: number;
  extentsFlipped: number;
  extentsAlreadyWritten: number;
  /** Inodes and extent blocks written back. */
  metadataWrites: number;
}

/** Extents as merged [diskOffset, length] runs in file order, to compare layouts whatever the flags. */
function mergedRuns(extents: Array<{ fileOffset: number; diskOffset: number; length: number }>): string {
  const runs: Array<{ fileOffset: number; diskOffset: number; length: number }> = [];
  for (const e of [...extents].sort((a, b) => a.fileOffset - b.fileOffset)) {
    const last = runs[runs.length - 1];
    if (last && last.fileOffset + last.length === e.fileOffset && last.diskOffset + last.length === e.diskOffset) last.length += e.length;
    else runs.push({ ...e });
  }
  return runs.map((r) => `${r.fileOffset}:${r.diskOffset}+${r.length}`).join(',');
}

/**
 * Flip the unwritten extents of these placeholders to written, in the guest filesystem on
 * `disk` (the user delta of a stopped desktop). Each file must still have exactly the extents
 * locate recorded (written or not): anything else means the disk changed under the plan, and
 * nothing of that file is written. Writes go only to the inodes and extent blocks concerned.
 * Safe to rerun: written extents are left as they are.
 */
export async function markPlaceholdersWritten(
  disk: WritableByteSource,
  files: PlaceholderLayout[],
  options: Pick<OpenGuestFilesystemOptions, 'partition'> = {},
): Promise<MarkWrittenReport> {
  const { partition, fs } = await openExt4(disk, options);
  if (hasRoCompat(fs.superblock, RO_COMPAT.READONLY)) {
    throw new Ext4Error('fs.not-writable', 'the guest filesystem carries the read-only feature flag; its placeholders cannot be marked written');
  }
  const report: MarkWrittenReport = { filesChanged: 0, extentsFlipped: 0, extentsAlreadyWritten: 0, metadataWrites: 0 };
  const write = async (data: Buffer, fsOffset: number): Promise<void> => {
    if (!partition.lvm?.pieces) return disk.writeAt(data, partition.offset + fsOffset);
    for (const range of volumeToDisk(partition.lvm.pieces, fsOffset, data.length)) {
      await disk.writeAt(data.subarray(range.offset - fsOffset, range.offset - fsOffset + range.length), range.diskOffset);
    }
  };
  for (const file of files) {
    const inode = await fs.resolve(file.path, { follow: false });
    if (inode.type !== 'file') throw new Ext4Error('fs.layout-changed', `${file.path} is no longer a regular file (${inode.type})`);
    // mapBlocks validates the whole tree (checksums, loops, bounds) before anything is written.
    const now = runsToExtents(await fs.blockRuns(inode), fs.blockSize, partition);
    if (mergedRuns(now) !== mergedRuns(file.extents)) {
      throw new Ext4Error('fs.layout-changed', `${file.path} no longer has the blocks it had when it was located; the guest disk changed under the recompose`);
    }
    const count = await markInodeExtentsWritten(fs.superblock, fs.reader, inode, write);
    if (count.flipped > 0) report.filesChanged += 1;
    report.extentsFlipped += count.flipped;
    report.extentsAlreadyWritten += count.alreadyWritten;
    report.metadataWrites += count.blocksWritten;
  }
  return report;
}
