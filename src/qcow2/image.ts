/**
 * One qcow2 file, opened for reading or writing. Reads resolve guest offsets through L1/L2
 * (cached whole tables) and coalesce contiguous host ranges into single reads; unallocated
 * ranges go to the attached backing source. Writes allocate clusters with copy-on-write from
 * the backing chain, keep refcounts exact, and order durable writes so that a crash can only
 * leak clusters: refcount increments are written before anything points at a new cluster, and
 * refcount decrements only after the pointers to a cluster are gone (see flush()).
 *
 * This class coordinates: it opens and validates, takes the lock, owns the header and orders
 * the durable writes. The work is in its parts, split like QEMU's: cluster-map.ts (L1/L2,
 * qcow2-cluster.c), refcounts.ts (qcow2-refcount.c), snapshots.ts (qcow2-snapshot.c),
 * cache.ts (qcow2-cache.c), reads.ts and writes.ts (the data paths of qcow2.c).
 */
import type { ByteSource } from '../io/byte-source.js';
import { assertNotLocked } from '../io/in-use.js';
import { holdWriteLocks } from '../io/qemu-locks.js';
import { nodeFileSystem, type FileSystemAccess, type HostFile } from '../io/host-file.js';
import { NamedFilePolicy } from './named-files.js';
import { assertPlainFileName } from './referenced-names.js';
import { Qcow2Error } from './errors.js';
import {
  Autoclear,
  bitmapsExtensionOf,
  backingFormatOf,
  ExtensionType,
  externalDataFileOf,
  HEADER_PROBE_BYTES,
  Incompatible,
  KNOWN_AUTOCLEAR,
  MAX_L1_BYTES,
  parseHeader,
  serializeHeader,
  stringExtensionData,
  withExtension,
  type Qcow2Header,
} from './header.js';
import { geometry, type ClusterMapping, type Geometry } from './layout.js';
import { ClusterMap, type L1View, type MappedExtent } from './cluster-map.js';
import { ImageFile } from './image-file.js';
import { DataReader } from './reads.js';
import { RefcountTable } from './refcounts.js';
import { ReadWriteLock } from './rwlock.js';
import { readSnapshotL1, readSnapshotTable, type SnapshotInfo } from './snapshots.js';
import { DataWriter } from './writes.js';

export type { MappedExtent } from './cluster-map.js';

export interface OpenImageOptions {
  writable?: boolean;
  fs?: FileSystemAccess;
  /**
   * Resolves, confines and opens the external data file (named-files.ts). Without one, the
   * default policy of an image opened on its own: its data file must be in its folder tree.
   * There is deliberately no way to open a data file around the policy.
   */
  namedFiles?: NamedFilePolicy;
  /**
   * The image file, already opened by the caller's NamedFilePolicy (a backing file of a chain):
   * then it is not opened again by name, so the file checked is the file read.
   */
  opened?: HostFile;
  /** Bytes of L2 tables (and, separately, refcount blocks) kept in memory; default 32 MiB. */
  cacheBytes?: number;
}

export class Qcow2Image implements ByteSource {
  /** Source for reads of unallocated clusters (the backing chain); null reads zeros. */
  backing: ByteSource | null = null;

  private readonly g: Geometry;
  private readonly host: ImageFile;
  private readonly refcounts: RefcountTable;
  private readonly clusters: ClusterMap;
  private readonly reader: DataReader;
  private readonly writer: DataWriter;
  private headerDirty = false;
  private snapshotList: SnapshotInfo[] | null = null;
  private closed = false;
  /** Drops this image's QEMU locks from the process's list (closing the files drops the locks). */
  private releaseLocks: Array<() => void> = [];
  /** Reads share, mutations run alone (see rwlock.ts). */
  private readonly lock = new ReadWriteLock();

  private constructor(
    readonly path: string,
    private readonly file: HostFile,
    private readonly dataFile: HostFile | null,
    private hdr: Qcow2Header,
    readonly writable: boolean,
    l1: L1View,
    reftable: Uint8Array,
    fileLength: number,
    cacheBytes: number,
  ) {
    this.g = geometry(hdr.clusterBits, (hdr.incompatibleFeatures & Incompatible.extendedL2) !== 0n, hdr.refcountOrder);
    this.host = new ImageFile(path, file, dataFile, this.g, fileLength);
    const maxCachedTables = Math.max(2, Math.floor(cacheBytes / this.g.clusterSize));
    this.refcounts = new RefcountTable(
      this.host,
      {
        reftableOffset: () => this.hdr.refcountTableOffset,
        moveReftable: (offset, clusters) => {
          this.hdr = { ...this.hdr, refcountTableOffset: offset, refcountTableClusters: clusters };
          this.headerDirty = true;
        },
      },
      reftable,
      maxCachedTables,
    );
    this.clusters = new ClusterMap(this.host, this.refcounts, hdr.version, l1, maxCachedTables);
    this.reader = new DataReader(this.host, this.clusters, hdr.compressionType);
    this.writer = new DataWriter(this.host, { header: () => this.hdr, backing: () => this.backing }, this.clusters, this.refcounts, this.reader);
  }

  static async open(path: string, options: OpenImageOptions = {}): Promise<Qcow2Image> {
    const fs = options.fs ?? nodeFileSystem;
    const writable = options.writable ?? false;
    // QEMU locks every image it opens: never write under a running guest or tool.
    if (writable) {
      await assertNotLocked(path).catch(async (error: unknown) => {
        await options.opened?.close().catch(() => undefined);
        throw error;
      });
    }
    const policy = options.namedFiles ?? (await NamedFilePolicy.forImage(path, { fs }));
    const file = options.opened ?? (await policy.openTop(path, writable ? 'write' : 'read')).file;
    let dataFile: HostFile | null = null;
    const releaseLocks: Array<() => void> = [];
    try {
      // Hold the locks a QEMU writer holds, so that no guest or qemu-img opens what we rewrite.
      if (writable && file.fd !== undefined) releaseLocks.push(holdWriteLocks(file.fd, path));
      const fileLength = await file.length();
      const probe = new Uint8Array(Math.min(HEADER_PROBE_BYTES, fileLength));
      await file.read(probe, 0);
      if (probe.length < 72) throw new Qcow2Error('qcow2.bad-magic', `${path}: file is ${fileLength} bytes, too short for a qcow2 header`);
      const clusterBits = new DataView(probe.buffer).getUint32(20);
      let firstCluster = probe;
      if (clusterBits >= 9 && clusterBits <= 21 && probe.length < Math.min(2 ** clusterBits, fileLength)) {
        firstCluster = new Uint8Array(Math.min(2 ** clusterBits, fileLength));
        await file.read(firstCluster, 0);
      }
      let header: Qcow2Header;
      try {
        header = parseHeader(firstCluster, fileLength);
      } catch (error) {
        if (error instanceof Qcow2Error) error.message = `${path}: ${error.message}`;
        throw error;
      }
      const inc = header.incompatibleFeatures;
      if (writable) {
        if (inc & Incompatible.corrupt) throw new Qcow2Error('qcow2.corrupt-flag-set', `${path}: image is marked corrupt; refusing to write (run check --repair)`);
        if (inc & Incompatible.dirty) throw new Qcow2Error('qcow2.dirty', `${path}: image is dirty (lazy refcounts not written back); run check --repair before writing`);
        if ((header.autoclearFeatures & Autoclear.bitmaps) !== 0n && bitmapsExtensionOf(header)) {
          throw new Qcow2Error('qcow2.bitmaps-present', `${path}: image has persistent dirty bitmaps, which this engine does not update; remove them (qemu-img bitmap --remove) before writing`);
        }
      }
      if (inc & Incompatible.externalDataFile) {
        const name = externalDataFileOf(header);
        if (name === null) throw new Qcow2Error('qcow2.bad-header-extension', `${path}: external data file bit set but no data file name extension`);
        dataFile = (await policy.open(name, path, 'external data file', writable ? 'write' : 'read')).file;
        if (writable && dataFile.fd !== undefined) releaseLocks.push(holdWriteLocks(dataFile.fd, dataFile.path));
      }
      const g = geometry(header.clusterBits, (inc & Incompatible.extendedL2) !== 0n, header.refcountOrder);
      const l1Bytes = new Uint8Array(header.l1Size * 8);
      if (l1Bytes.length) await file.read(l1Bytes, header.l1TableOffset);
      const reftable = new Uint8Array(header.refcountTableClusters * g.clusterSize);
      await file.read(reftable, header.refcountTableOffset);
      const image = new Qcow2Image(
        path,
        file,
        dataFile,
        header,
        writable,
        { table: l1Bytes, view: new DataView(l1Bytes.buffer), size: header.size, entries: header.l1Size },
        reftable,
        fileLength,
        options.cacheBytes ?? 32 * 1024 * 1024,
      );
      image.releaseLocks = releaseLocks;
      if (writable) await image.prepareForWriting();
      return image;
    } catch (error) {
      for (const release of releaseLocks) release();
      await file.close().catch(() => undefined);
      await dataFile?.close().catch(() => undefined);
      throw error;
    }
  }

  /** A copy of the parsed header. */
  get header(): Qcow2Header {
    return { ...this.hdr, extensions: this.hdr.extensions.map((e) => ({ type: e.type, data: e.data.slice() })) };
  }
  get size(): number {
    return this.hdr.size;
  }
  get clusterSize(): number {
    return this.g.clusterSize;
  }
  get geometry(): Geometry {
    return this.g;
  }
  get backingFile(): string | null {
    return this.hdr.backingFile;
  }
  get backingFormat(): string | null {
    return backingFormatOf(this.hdr);
  }
  get externalDataFile(): string | null {
    return (this.hdr.incompatibleFeatures & Incompatible.externalDataFile) !== 0n ? externalDataFileOf(this.hdr) : null;
  }
  /** Length of the host file in bytes (as this image last knew it). */
  get hostLength(): number {
    return this.host.length;
  }

  /** Unknown autoclear bits mean extensions we would not keep consistent: clear them first. */
  private async prepareForWriting(): Promise<void> {
    const unknown = this.hdr.autoclearFeatures & ~KNOWN_AUTOCLEAR;
    if (unknown !== 0n) {
      this.hdr = { ...this.hdr, autoclearFeatures: this.hdr.autoclearFeatures & KNOWN_AUTOCLEAR };
      await this.writeHeader();
      await this.file.sync();
    }
  }

  private assertOpen(): void {
    if (this.closed) throw new Qcow2Error('qcow2.closed', `${this.path} is closed`);
  }

  private assertWritable(): void {
    this.assertOpen();
    if (!this.writable) throw new Qcow2Error('qcow2.read-only', `${this.path} is open read-only`);
  }


  // ---------------------------------------------------------------- mapping

  /** Reads may run past the end (zeros) but never start before 0 or at a non-integer. */
  private checkReadOffset(offset: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0) {
      throw new Qcow2Error('qcow2.out-of-range', `${this.path}: read offset ${offset} is not a byte offset`);
    }
  }

  /** The mapping of the (sub)cluster holding `guestOffset` in this image alone. */
  mappingOf(guestOffset: number): Promise<ClusterMapping> {
    return this.lock.read(() => this.mappingOfUnlocked(guestOffset));
  }

  private async mappingOfUnlocked(guestOffset: number): Promise<ClusterMapping> {
    this.assertOpen();
    this.host.checkGuestRange(guestOffset, 1, this.hdr.size);
    return this.clusters.mappingIn(this.clusters.active, guestOffset);
  }

  /**
   * Mappings for [offset, offset+length) as merged extents: adjacent (sub)clusters of the same
   * kind merge, and normal ones only when their host offsets are contiguous.
   */
  mapRange(offset: number, length: number): Promise<MappedExtent[]> {
    return this.lock.read(() => this.mapRangeUnlocked(offset, length));
  }

  private async mapRangeUnlocked(offset: number, length: number): Promise<MappedExtent[]> {
    this.assertOpen();
    this.host.checkGuestRange(offset, length, this.hdr.size);
    return this.clusters.mapIn(this.clusters.active, offset, length);
  }

  // ---------------------------------------------------------------- reads

  /** ByteSource: read the virtual disk (through `backing` for unallocated ranges). Past size reads zero. */
  readAt(into: Uint8Array, offset: number): Promise<void> {
    return this.lock.read(() => this.readUnlocked(this.clusters.active, this.hdr.size, into, offset, this.backing));
  }

  /** Read this layer alone: unallocated ranges read as zeros whatever the backing chain holds. */
  readLayerAt(into: Uint8Array, offset: number): Promise<void> {
    return this.lock.read(() => this.readUnlocked(this.clusters.active, this.hdr.size, into, offset, null));
  }

  /** Read a disk of `size` bytes mapped by `l1` (the active one or a snapshot's). */
  private async readUnlocked(l1: L1View, size: number, into: Uint8Array, offset: number, backing: ByteSource | null): Promise<void> {
    this.assertOpen();
    this.checkReadOffset(offset);
    const inside = Math.max(0, Math.min(into.length, size - offset));
    if (inside < into.length) into.fill(0, inside);
    if (inside > 0) await this.reader.readView(l1, into.subarray(0, inside), offset, backing);
  }

  // ---------------------------------------------------------------- snapshots

  snapshots(): Promise<SnapshotInfo[]> {
    return this.lock.read(() => this.snapshotsUnlocked());
  }

  private async snapshotsUnlocked(): Promise<SnapshotInfo[]> {
    this.assertOpen();
    if (!this.snapshotList) {
      this.snapshotList = await readSnapshotTable(this.file, this.hdr.snapshotsOffset, this.hdr.nbSnapshots, this.g.clusterSize, this.host.length);
    }
    return this.snapshotList;
  }

  /** The disk as it was when snapshot `idOrName` was taken (backing reads go to `backing`). */
  async snapshotView(idOrName: string): Promise<ByteSource> {
    const list = await this.snapshots();
    const l1 = await readSnapshotL1(this.file, this.path, list, idOrName, this.hdr.size, this.g.l2Coverage);
    return {
      size: l1.size,
      readAt: (into, offset) => this.lock.read(() => this.readUnlocked(l1, l1.size, into, offset, this.backing)),
    };
  }

  // ---------------------------------------------------------------- refcounts

  /** Refcount of host cluster `cluster` (0 when no refcount block covers it). */
  refcountOf(cluster: number): Promise<number> {
    this.assertOpen();
    return this.lock.read(() => this.refcounts.refcountAt(cluster));
  }

  // ---------------------------------------------------------------- writes

  private async writeHeader(): Promise<void> {
    const { bytes, header } = serializeHeader(this.hdr);
    this.hdr = header;
    // Only the bytes up to the end of the backing name matter; the rest of cluster 0 is unused.
    const used = Math.max(header.backingFileOffset + header.backingFileSize, header.headerLength + 8 + header.extensions.reduce((n, e) => n + 8 + Math.ceil(e.data.length / 8) * 8, 0));
    await this.file.write(bytes.subarray(0, Math.min(bytes.length, Math.ceil(used / 512) * 512)), 0);
  }

  /** Write `data` at guest offset `offset`. */
  write(data: Uint8Array, offset: number): Promise<void> {
    return this.lock.write(() => this.writeUnlocked(data, offset));
  }

  private async writeUnlocked(data: Uint8Array, offset: number): Promise<void> {
    this.assertWritable();
    this.host.checkGuestRange(offset, data.length, this.hdr.size);
    await this.writer.writeRange(offset, data.length, data);
  }

  /** Make [offset, offset+length) read as zeros, with the zero flag where the format allows. */
  writeZeroes(offset: number, length: number): Promise<void> {
    return this.lock.write(() => this.checkedZeroOrDiscard(offset, length, 'zero'));
  }

  /**
   * Discard [offset, offset+length): fully covered (sub)clusters release their host clusters
   * and read as zeros afterwards (zero flag when a backing file could show through, else
   * unallocated; a v2 image with a backing file gets real zeros). Partly covered ones keep
   * their data.
   */
  discard(offset: number, length: number): Promise<void> {
    return this.lock.write(() => this.checkedZeroOrDiscard(offset, length, 'discard'));
  }

  private async checkedZeroOrDiscard(offset: number, length: number, mode: 'zero' | 'discard'): Promise<void> {
    this.assertWritable();
    this.host.checkGuestRange(offset, length, this.hdr.size);
    await this.writer.zeroOrDiscard(offset, length, mode);
  }

  /**
   * Map each of these guest clusters, unallocated in this layer, to a new host cluster (refcount
   * 1, COPIED) without writing any data: the caller fills the host clusters itself (by cloning
   * file ranges into them, which no write through the engine could do), then flushes. Runs of
   * consecutive guest clusters get consecutive host clusters, so the caller's clones stay long.
   * Only plain images: no extended L2, no external data file.
   */
  allocateDataClusters(guestClusters: number[]): Promise<Array<{ guestCluster: number; hostOffset: number }>> {
    return this.lock.write(() => this.allocateDataClustersUnlocked(guestClusters));
  }

  private async allocateDataClustersUnlocked(guestClusters: number[]): Promise<Array<{ guestCluster: number; hostOffset: number }>> {
    this.assertWritable();
    return this.writer.mapForFilling(guestClusters);
  }

  /**
   * Make everything written so far durable, in crash-safe order:
   * 1. refcount blocks and table (new clusters counted before anything points at them), fsync;
   * 2. L2 tables, L1 table, header, fsync;
   * 3. only now drop the refcounts of clusters nothing points at any more, fsync.
   */
  flush(): Promise<void> {
    this.assertOpen();
    return this.lock.write(() => this.flushUnlocked());
  }

  private async flushUnlocked(): Promise<void> {
    if (!this.writable) return;
    // Data before the L2 entries that point at it.
    await this.dataFile?.sync();
    await this.refcounts.writeBack();
    await this.file.sync();
    await this.clusters.writeBack(this.hdr.l1TableOffset);
    if (this.headerDirty) {
      await this.file.sync();
      await this.writeHeader();
      this.headerDirty = false;
    }
    await this.file.sync();
    if (this.refcounts.hasPendingFrees) {
      const frees = this.refcounts.takePendingFrees();
      for (const cluster of frees) await this.refcounts.adjustRefcount(cluster, -1);
      await this.refcounts.writeBack();
      await this.file.sync();
      if (this.refcounts.hasPendingFrees) await this.flushUnlocked();
    }
  }

  // ---------------------------------------------------------------- recompose primitives

  /**
   * Point this image at another backing file (or none). The header and its extensions are
   * rewritten in place; the backing format extension is always written with a name. fsync.
   */
  setBackingFile(name: string | null, format: 'qcow2' | 'raw' | null): Promise<void> {
    return this.lock.write(() => this.setBackingFileUnlocked(name, format));
  }

  private async setBackingFileUnlocked(name: string | null, format: 'qcow2' | 'raw' | null): Promise<void> {
    this.assertWritable();
    if ((name === null) !== (format === null)) throw new Qcow2Error('qcow2.bad-argument', 'setBackingFile: name and format must both be given or both be null');
    // Only the syntax here: the name is stored, not opened (opening goes through NamedFilePolicy).
    if (name !== null) assertPlainFileName(name, 'backing file');
    const extensions = withExtension(this.hdr.extensions, ExtensionType.backingFormat, format === null ? null : stringExtensionData(format));
    this.hdr = { ...this.hdr, backingFile: name, extensions };
    await this.flushUnlocked();
    await this.writeHeader();
    await this.file.sync();
  }

  /**
   * Set the L2 entries of these guest clusters to 0, so reads fall through to the backing file
   * (never the zero flag). fsync. Returns the host offsets that are no longer referenced from
   * L2 but still refcounted; a crash after this only leaks them.
   */
  detachClusters(guestClusterIndexes: number[]): Promise<number[]> {
    return this.lock.write(() => this.detachClustersUnlocked(guestClusterIndexes));
  }

  private async detachClustersUnlocked(guestClusterIndexes: number[]): Promise<number[]> {
    this.assertWritable();
    if (this.dataFile && (this.hdr.autoclearFeatures & Autoclear.rawExternalData) !== 0n) {
      // A raw data file must read as the whole disk; a cluster falling through would break that.
      throw new Qcow2Error('qcow2.unsupported-feature', `${this.path}: cannot detach clusters of an image whose external data file is raw (data_file_raw)`);
    }
    await this.flushUnlocked();
    const released = await this.writer.detach(guestClusterIndexes);
    await this.flushUnlocked();
    return released;
  }

  /** Drop one reference from each of these host clusters (offsets from detachClusters). fsync. */
  releaseHostClusters(hostOffsets: number[]): Promise<void> {
    return this.lock.write(() => this.releaseHostClustersUnlocked(hostOffsets));
  }

  private async releaseHostClustersUnlocked(hostOffsets: number[]): Promise<void> {
    this.assertWritable();
    for (const offset of hostOffsets) {
      if (!Number.isSafeInteger(offset) || offset % this.g.clusterSize !== 0 || offset <= 0) {
        throw new Qcow2Error('qcow2.bad-argument', `releaseHostClusters: 0x${offset.toString(16)} is not a cluster offset`);
      }
      await this.refcounts.adjustRefcount(offset / this.g.clusterSize, -1);
    }
    await this.refcounts.writeBack();
    await this.file.sync();
  }

  /**
   * Grow the virtual size (never shrink), growing the L1 table when needed: the new L1 is
   * written to fresh clusters, then the header switches to it, then the old one is freed.
   */
  growVirtualSize(newSize: number): Promise<void> {
    return this.lock.write(() => this.growVirtualSizeUnlocked(newSize));
  }

  private async growVirtualSizeUnlocked(newSize: number): Promise<void> {
    this.assertWritable();
    if (!Number.isSafeInteger(newSize) || newSize < this.hdr.size) throw new Qcow2Error('qcow2.bad-argument', `growVirtualSize: ${newSize} is smaller than the current size ${this.hdr.size}`);
    if (newSize % 512 !== 0) throw new Qcow2Error('qcow2.bad-argument', `growVirtualSize: ${newSize} is not a multiple of 512`);
    const g = this.g;
    const needed = Math.ceil(newSize / g.l2Coverage);
    if (needed > this.clusters.active.entries) {
      if (needed * 8 > MAX_L1_BYTES) throw new Qcow2Error('qcow2.too-large', `${this.path}: L1 table for ${newSize} bytes exceeds ${MAX_L1_BYTES} bytes`);
      await this.flushUnlocked();
      await this.clusters.growL1(needed, newSize, this.hdr.l1TableOffset, async (offset) => {
        this.hdr = { ...this.hdr, l1TableOffset: offset, l1Size: needed, size: newSize };
        await this.writeHeader();
        await this.file.sync();
      });
      await this.flushUnlocked();
      return;
    }
    this.hdr = { ...this.hdr, size: newSize };
    this.clusters.replaceActive({ ...this.clusters.active, size: newSize });
    this.headerDirty = true;
    await this.flushUnlocked();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (this.writable) await this.lock.write(() => this.flushUnlocked());
    } finally {
      this.closed = true;
      for (const release of this.releaseLocks) release();
      await this.file.close();
      await this.dataFile?.close();
    }
  }
}
