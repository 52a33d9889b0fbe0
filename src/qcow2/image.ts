/**
 * One qcow2 file, opened for reading or writing. Reads resolve guest offsets through L1/L2
 * (cached whole tables) and coalesce contiguous host ranges into single reads; unallocated
 * ranges go to the attached backing source. Writes allocate clusters with copy-on-write from
 * the backing chain, keep refcounts exact, and order durable writes so that a crash can only
 * leak clusters: refcount increments are written before anything points at a new cluster, and
 * refcount decrements only after the pointers to a cluster are gone (see flush()).
 */
import type { ByteSource } from '../io/byte-source.js';
import { assertNotLocked } from '../io/in-use.js';
import { nodeFileSystem, type FileSystemAccess, type HostFile } from '../io/host-file.js';
import { resolveReferencedPath } from './referenced-names.js';
import { decompressCluster } from './compression.js';
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
import {
  COPIED_HI,
  COMPRESSED_HI,
  decodeCompressed,
  decodeL2,
  encodeEntry,
  entryOffset,
  geometry,
  getRefcount,
  L1_RESERVED_HI,
  L1_RESERVED_LO,
  maxRefcount,
  readL2Entry,
  setRefcount,
  writeL2Entry,
  type ClusterMapping,
  type Geometry,
  type RawL2Entry,
} from './layout.js';
import { ReadWriteLock } from './rwlock.js';
import { readSnapshotTable, type SnapshotInfo } from './snapshots.js';

export interface OpenImageOptions {
  writable?: boolean;
  fs?: FileSystemAccess;
  /**
   * Called with the external data file's name (as stored) and its resolved path before it is
   * opened; the chain uses it to confine data files. Return the path to open, or throw.
   */
  resolveDataFile?: (name: string, resolvedPath: string) => Promise<string>;
  /** Bytes of L2 tables (and, separately, refcount blocks) kept in memory; default 32 MiB. */
  cacheBytes?: number;
}

/** A run of guest bytes with one mapping kind (host offsets contiguous for normal runs). */
export interface MappedExtent {
  guestOffset: number;
  length: number;
  mapping: ClusterMapping;
}

/** An L1 table and the virtual size it maps: the active one or a snapshot's. */
interface L1View {
  table: Uint8Array;
  view: DataView;
  size: number;
  entries: number;
}

const TWO32 = 0x1_0000_0000;
/** Extent reads in flight at once within one readAt. */
const READ_PARALLELISM = 8;

export class Qcow2Image implements ByteSource {
  /** Source for reads of unallocated clusters (the backing chain); null reads zeros. */
  backing: ByteSource | null = null;

  private readonly g: Geometry;
  private l1: L1View;
  private reftable: Uint8Array;
  private reftableView: DataView;
  private readonly l2Cache = new Map<number, Uint8Array>();
  private readonly dirtyL2 = new Set<number>();
  private readonly refblockCache = new Map<number, Uint8Array>();
  private readonly dirtyRefblocks = new Set<number>();
  private readonly maxCachedTables: number;
  private fileLength: number;
  /** Cluster index one past the last cluster in use or reserved. */
  private allocEnd: number;
  /** First cluster index worth scanning for a free cluster. */
  private freeHint = 0;
  private l1Dirty = false;
  private reftableDirty = false;
  private headerDirty = false;
  /** Host clusters whose refcount drops once the pointers to them are durable (flush). */
  private pendingFrees: number[] = [];
  private snapshotList: SnapshotInfo[] | null = null;
  private closed = false;
  private lastDecompressed: { hostOffset: number; data: Uint8Array } | null = null;
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
    this.l1 = l1;
    this.reftable = reftable;
    this.reftableView = new DataView(reftable.buffer, reftable.byteOffset, reftable.byteLength);
    this.fileLength = fileLength;
    this.allocEnd = Math.ceil(fileLength / this.g.clusterSize);
    this.maxCachedTables = Math.max(2, Math.floor(cacheBytes / this.g.clusterSize));
  }

  static async open(path: string, options: OpenImageOptions = {}): Promise<Qcow2Image> {
    const fs = options.fs ?? nodeFileSystem;
    const writable = options.writable ?? false;
    // QEMU locks every image it opens: never write under a running guest or tool.
    if (writable) await assertNotLocked(path);
    const file = await fs.open(path, writable ? 'write' : 'read').catch((error: unknown) => {
      throw notFound(error, `${path} does not exist`);
    });
    let dataFile: HostFile | null = null;
    try {
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
        let resolved = resolveReferencedPath(name, path, 'external data file');
        if (options.resolveDataFile) resolved = await options.resolveDataFile(name, resolved);
        dataFile = await fs.open(resolved, writable ? 'write' : 'read').catch((error: unknown) => {
          throw notFound(error, `${path}: external data file ${resolved} does not exist`);
        });
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
      if (writable) await image.prepareForWriting();
      return image;
    } catch (error) {
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
    return this.fileLength;
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

  // ---------------------------------------------------------------- tables

  private checkTableOffset(offset: number, what: string): void {
    if (offset % this.g.clusterSize !== 0) throw new Qcow2Error('qcow2.corrupt', `${this.path}: ${what} offset 0x${offset.toString(16)} is not cluster-aligned`);
    if (offset < this.g.clusterSize) throw new Qcow2Error('qcow2.corrupt', `${this.path}: ${what} offset 0x${offset.toString(16)} overlaps the header`);
    if (offset + this.g.clusterSize > Math.max(this.fileLength, this.allocEnd * this.g.clusterSize)) {
      throw new Qcow2Error('qcow2.offset-past-eof', `${this.path}: ${what} at 0x${offset.toString(16)} is past the end of the file`);
    }
  }

  private async loadTable(cache: Map<number, Uint8Array>, dirty: Set<number>, offset: number, what: string): Promise<Uint8Array> {
    const hit = cache.get(offset);
    if (hit) {
      cache.delete(offset);
      cache.set(offset, hit);
      return hit;
    }
    this.checkTableOffset(offset, what);
    const table = new Uint8Array(this.g.clusterSize);
    await this.file.read(table, offset);
    if (cache.size >= this.maxCachedTables) {
      for (const key of cache.keys()) {
        if (cache.size < this.maxCachedTables) break;
        if (!dirty.has(key)) cache.delete(key);
      }
    }
    cache.set(offset, table);
    return table;
  }

  private l1Entry(l1: L1View, index: number): { l2Offset: number; copied: boolean } {
    const hi = l1.view.getUint32(index * 8);
    const lo = l1.view.getUint32(index * 8 + 4);
    if (lo & L1_RESERVED_LO || hi & L1_RESERVED_HI) {
      throw new Qcow2Error('qcow2.corrupt', `${this.path}: L1 entry ${index} has reserved bits set`);
    }
    return { l2Offset: entryOffset(hi, lo), copied: (hi & COPIED_HI) !== 0 };
  }

  private async l2TableFor(l1: L1View, l1Index: number): Promise<Uint8Array | null> {
    if (l1Index >= l1.entries) return null;
    const { l2Offset } = this.l1Entry(l1, l1Index);
    if (l2Offset === 0) return null;
    return this.loadTable(this.l2Cache, this.dirtyL2, l2Offset, `L2 table (L1 entry ${l1Index})`);
  }

  // ---------------------------------------------------------------- mapping

  /** Reads may run past the end (zeros) but never start before 0 or at a non-integer. */
  private checkReadOffset(offset: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0) {
      throw new Qcow2Error('qcow2.out-of-range', `${this.path}: read offset ${offset} is not a byte offset`);
    }
  }

  private checkGuestRange(offset: number, length: number, size: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
      throw new Qcow2Error('qcow2.out-of-range', `${this.path}: range ${offset}+${length} is outside the virtual disk (${size} bytes)`);
    }
  }

  /** The mapping of the (sub)cluster holding `guestOffset` in this image alone. */
  mappingOf(guestOffset: number): Promise<ClusterMapping> {
    return this.lock.read(() => this.mappingOfUnlocked(guestOffset));
  }

  private async mappingOfUnlocked(guestOffset: number): Promise<ClusterMapping> {
    this.assertOpen();
    this.checkGuestRange(guestOffset, 1, this.hdr.size);
    return this.mappingIn(this.l1, guestOffset);
  }

  private async mappingIn(l1: L1View, guestOffset: number): Promise<ClusterMapping> {
    const g = this.g;
    const l1Index = Math.floor(guestOffset / g.l2Coverage);
    const table = await this.l2TableFor(l1, l1Index);
    if (!table) return { kind: 'unallocated' };
    const cluster = Math.floor(guestOffset / g.clusterSize);
    const l2Index = cluster % g.l2Entries;
    const sub = Math.floor((guestOffset % g.clusterSize) / g.subclusterSize);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const mapping = decodeL2(readL2Entry(view, l2Index, g), sub, g, this.hdr.version, this.dataFile !== null);
    return mapping;
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
    this.checkGuestRange(offset, length, this.hdr.size);
    return this.mapIn(this.l1, offset, length);
  }

  private async mapIn(l1: L1View, offset: number, length: number): Promise<MappedExtent[]> {
    const g = this.g;
    const extents: MappedExtent[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const l1Index = Math.floor(pos / g.l2Coverage);
      const table = await this.l2TableFor(l1, l1Index);
      const tableEnd = Math.min(end, (l1Index + 1) * g.l2Coverage);
      if (!table) {
        push(extents, pos, tableEnd - pos, { kind: 'unallocated' });
        pos = tableEnd;
        continue;
      }
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      while (pos < tableEnd) {
        const cluster = Math.floor(pos / g.clusterSize);
        const inCluster = pos - cluster * g.clusterSize;
        const sub = Math.floor(inCluster / g.subclusterSize);
        const stepEnd = Math.min(tableEnd, cluster * g.clusterSize + (sub + 1) * g.subclusterSize);
        const mapping = decodeL2(readL2Entry(view, cluster % g.l2Entries, g), sub, g, this.hdr.version, this.dataFile !== null);
        let exact: ClusterMapping = mapping;
        if (mapping.kind === 'normal') exact = { kind: 'normal', hostOffset: mapping.hostOffset + inCluster };
        else if (mapping.kind === 'zero' && mapping.hostOffset !== null) exact = { kind: 'zero', hostOffset: mapping.hostOffset + inCluster };
        push(extents, pos, stepEnd - pos, exact);
        pos = stepEnd;
      }
    }
    return extents;
  }

  // ---------------------------------------------------------------- reads

  /** ByteSource: read the virtual disk (through `backing` for unallocated ranges). Past size reads zero. */
  readAt(into: Uint8Array, offset: number): Promise<void> {
    return this.lock.read(() => this.readUnlocked(into, offset, this.backing));
  }

  /** Read this layer alone: unallocated ranges read as zeros whatever the backing chain holds. */
  readLayerAt(into: Uint8Array, offset: number): Promise<void> {
    return this.lock.read(() => this.readUnlocked(into, offset, null));
  }

  private async readUnlocked(into: Uint8Array, offset: number, backing: ByteSource | null): Promise<void> {
    this.assertOpen();
    this.checkReadOffset(offset);
    const inside = Math.max(0, Math.min(into.length, this.hdr.size - offset));
    if (inside < into.length) into.fill(0, inside);
    if (inside > 0) await this.readView(this.l1, into.subarray(0, inside), offset, backing);
  }

  private async readView(l1: L1View, into: Uint8Array, offset: number, backing: ByteSource | null): Promise<void> {
    // Walk in bounded windows so a huge read does not build a huge extent list.
    const window = Math.max(this.g.l2Coverage, 64 * 1024 * 1024);
    for (let done = 0; done < into.length; ) {
      const n = Math.min(window, into.length - done);
      const extents = await this.mapIn(l1, offset + done, n);
      // Fragmented ranges become many small reads: keep a few in flight (the thread pool runs
      // them in parallel) instead of one at a time. Zero fills need no I/O and run inline.
      let next = 0;
      const worker = async () => {
        while (next < extents.length) {
          const extent = extents[next++]!;
          const start = extent.guestOffset - offset;
          await this.readExtent(extent, into.subarray(start, start + extent.length), backing);
        }
      };
      if (extents.length === 1) await worker();
      else await Promise.all(Array.from({ length: Math.min(READ_PARALLELISM, extents.length) }, worker));
      done += n;
    }
  }

  private async readExtent(extent: MappedExtent, target: Uint8Array, backing: ByteSource | null): Promise<void> {
    const m = extent.mapping;
    switch (m.kind) {
      case 'unallocated':
        if (backing) await backing.readAt(target, extent.guestOffset);
        else target.fill(0);
        return;
      case 'zero':
        target.fill(0);
        return;
      case 'normal': {
        // Like QEMU, bytes past the end of the host file read as zeros (HostFile.read fills).
        await (this.dataFile ?? this.file).read(target, m.hostOffset);
        return;
      }
      case 'compressed': {
        // Compressed extents never merge, so this is within one cluster.
        const data = await this.decompressedCluster(m.hostOffset, m.size);
        const within = extent.guestOffset % this.g.clusterSize;
        target.set(data.subarray(within, within + target.length));
        return;
      }
    }
  }

  private async decompressedCluster(hostOffset: number, size: number): Promise<Uint8Array> {
    if (this.lastDecompressed?.hostOffset === hostOffset) return this.lastDecompressed.data;
    if (hostOffset >= this.fileLength) {
      throw new Qcow2Error('qcow2.offset-past-eof', `${this.path}: compressed cluster at 0x${hostOffset.toString(16)} is past the end of the file`);
    }
    const stored = new Uint8Array(Math.min(size, this.fileLength - hostOffset));
    await this.file.read(stored, hostOffset);
    const data = decompressCluster(stored, this.g.clusterSize, this.hdr.compressionType);
    this.lastDecompressed = { hostOffset, data };
    return data;
  }

  // ---------------------------------------------------------------- snapshots

  snapshots(): Promise<SnapshotInfo[]> {
    return this.lock.read(() => this.snapshotsUnlocked());
  }

  private async snapshotsUnlocked(): Promise<SnapshotInfo[]> {
    this.assertOpen();
    if (!this.snapshotList) {
      this.snapshotList = await readSnapshotTable(this.file, this.hdr.snapshotsOffset, this.hdr.nbSnapshots, this.g.clusterSize, this.fileLength);
    }
    return this.snapshotList;
  }

  /** The disk as it was when snapshot `idOrName` was taken (backing reads go to `backing`). */
  async snapshotView(idOrName: string): Promise<ByteSource> {
    const list = await this.snapshots();
    const snap = list.find((s) => s.id === idOrName) ?? list.find((s) => s.name === idOrName);
    if (!snap) throw new Qcow2Error('qcow2.no-such-snapshot', `${this.path}: no snapshot with id or name "${idOrName}"`);
    const size = snap.diskSize ?? this.hdr.size;
    const needed = Math.ceil(size / this.g.l2Coverage);
    if (snap.l1Size < needed) throw new Qcow2Error('qcow2.corrupt', `${this.path}: snapshot ${snap.id} L1 table (${snap.l1Size}) is too small for its disk size ${size}`);
    const table = new Uint8Array(snap.l1Size * 8);
    await this.file.read(table, snap.l1TableOffset);
    const l1: L1View = { table, view: new DataView(table.buffer), size, entries: snap.l1Size };
    return {
      size,
      readAt: (into, offset) => this.lock.read(async () => {
        this.assertOpen();
        this.checkReadOffset(offset);
        const inside = Math.max(0, Math.min(into.length, size - offset));
        if (inside < into.length) into.fill(0, inside);
        if (inside > 0) await this.readView(l1, into.subarray(0, inside), offset, this.backing);
      }),
    };
  }

  // ---------------------------------------------------------------- refcounts

  private refcountLocation(cluster: number): { tableIndex: number; blockIndex: number } {
    const e = this.g.refcountBlockEntries;
    return { tableIndex: Math.floor(cluster / e), blockIndex: cluster % e };
  }

  private reftableEntry(index: number): number {
    if (index * 8 >= this.reftable.length) return 0;
    const hi = this.reftableView.getUint32(index * 8);
    const lo = this.reftableView.getUint32(index * 8 + 4);
    if (lo & 0x1ff) throw new Qcow2Error('qcow2.corrupt', `${this.path}: refcount table entry ${index} has reserved bits set`);
    return hi * TWO32 + lo;
  }

  /** Refcount of host cluster `cluster` (0 when no refcount block covers it). */
  refcountOf(cluster: number): Promise<number> {
    this.assertOpen();
    return this.lock.read(() => this.refcountAt(cluster));
  }

  private async refcountAt(cluster: number): Promise<number> {
    const { tableIndex, blockIndex } = this.refcountLocation(cluster);
    const blockOffset = this.reftableEntry(tableIndex);
    if (blockOffset === 0) return 0;
    const block = await this.loadTable(this.refblockCache, this.dirtyRefblocks, blockOffset, `refcount block ${tableIndex}`);
    return getRefcount(block, new DataView(block.buffer), blockIndex, this.g.refcountOrder);
  }

  private async adjustRefcount(cluster: number, delta: number): Promise<void> {
    const { tableIndex, blockIndex } = this.refcountLocation(cluster);
    let blockOffset = this.reftableEntry(tableIndex);
    if (blockOffset === 0) {
      if (delta < 0) throw new Qcow2Error('qcow2.corrupt', `${this.path}: freeing host cluster ${cluster}, which has no refcount block`);
      await this.createRefblock(tableIndex);
      blockOffset = this.reftableEntry(tableIndex);
    }
    const block = await this.loadTable(this.refblockCache, this.dirtyRefblocks, blockOffset, `refcount block ${tableIndex}`);
    const view = new DataView(block.buffer);
    const current = getRefcount(block, view, blockIndex, this.g.refcountOrder);
    const next = current + delta;
    if (next < 0) throw new Qcow2Error('qcow2.corrupt', `${this.path}: refcount of host cluster ${cluster} would drop below 0`);
    if (next > maxRefcount(this.g.refcountOrder)) throw new Qcow2Error('qcow2.corrupt', `${this.path}: refcount of host cluster ${cluster} would overflow ${this.g.refcountBits} bits`);
    setRefcount(block, view, blockIndex, this.g.refcountOrder, next);
    this.dirtyRefblocks.add(blockOffset);
    if (next === 0 && cluster < this.freeHint) this.freeHint = cluster;
  }

  /**
   * A new refcount block for table slot `tableIndex`, placed at the end of the file. When that
   * cluster falls in the block's own range the block describes itself; otherwise its refcount
   * lives in another block (created the same way, which terminates because each step moves
   * the end forward by one cluster).
   */
  private async createRefblock(tableIndex: number): Promise<void> {
    if ((tableIndex + 1) * 8 > this.reftable.length) {
      await this.growReftable(tableIndex + 1);
      // Growing may already have created this very block (for the new table's clusters).
      if (this.reftableEntry(tableIndex) !== 0) return;
    }
    const cluster = this.allocEnd++;
    const offset = cluster * this.g.clusterSize;
    const block = new Uint8Array(this.g.clusterSize);
    this.refblockCache.set(offset, block);
    this.dirtyRefblocks.add(offset);
    encodeEntry(this.reftableView, tableIndex * 8, offset, 0, 0);
    this.reftableDirty = true;
    await this.adjustRefcount(cluster, 1);
  }

  /**
   * Move the refcount table to a bigger place at the end of the file. The new table's own
   * clusters (and any refcount blocks they need) are counted in it; the old table is freed
   * only after the header points at the new one (flush).
   */
  private async growReftable(minEntries: number): Promise<void> {
    const g = this.g;
    const entriesPerCluster = g.clusterSize / 8;
    const oldClusters = this.reftable.length / g.clusterSize;
    let clusters = Math.max(Math.ceil(minEntries / entriesPerCluster), Math.ceil(oldClusters * 1.5), oldClusters + 1);
    // Enough coverage for the table itself, the blocks describing it and the file so far.
    while (clusters * entriesPerCluster * g.refcountBlockEntries < this.allocEnd + clusters * 2 + 8) clusters++;
    if (clusters * g.clusterSize > 8 * 1024 * 1024) throw new Qcow2Error('qcow2.too-large', `${this.path}: refcount table would exceed 8 MiB`);
    const oldOffset = this.hdr.refcountTableOffset;
    const table = new Uint8Array(clusters * g.clusterSize);
    table.set(this.reftable);
    this.reftable = table;
    this.reftableView = new DataView(table.buffer);
    const first = this.allocEnd;
    this.allocEnd += clusters;
    this.hdr = { ...this.hdr, refcountTableOffset: first * g.clusterSize, refcountTableClusters: clusters };
    this.headerDirty = true;
    this.reftableDirty = true;
    for (let i = 0; i < clusters; i++) await this.adjustRefcount(first + i, 1);
    for (let i = 0; i < oldClusters; i++) this.pendingFrees.push(oldOffset / g.clusterSize + i);
  }

  /**
   * Allocate `count` contiguous host clusters (refcount 1). Holes freed earlier are reused
   * first-fit; otherwise the file grows.
   */
  private async allocateClusters(count: number): Promise<number> {
    let start = -1;
    if (count === 1) {
      for (let c = Math.max(this.freeHint, 1); c < this.allocEnd; c++) {
        if ((await this.refcountAt(c)) === 0) {
          start = c;
          break;
        }
      }
      this.freeHint = start >= 0 ? start + 1 : this.allocEnd;
    }
    if (start < 0) {
      start = this.allocEnd;
      this.allocEnd += count;
    }
    for (let i = 0; i < count; i++) await this.adjustRefcount(start + i, 1);
    return start;
  }

  // ---------------------------------------------------------------- writes

  private async writeHeader(): Promise<void> {
    const { bytes, header } = serializeHeader(this.hdr);
    this.hdr = header;
    // Only the bytes up to the end of the backing name matter; the rest of cluster 0 is unused.
    const used = Math.max(header.backingFileOffset + header.backingFileSize, header.headerLength + 8 + header.extensions.reduce((n, e) => n + 8 + Math.ceil(e.data.length / 8) * 8, 0));
    await this.file.write(bytes.subarray(0, Math.min(bytes.length, Math.ceil(used / 512) * 512)), 0);
  }

  /** L2 table (in the cache, writable) for guest cluster `cluster`, allocating it if absent. */
  private async writableL2(l1Index: number): Promise<Uint8Array> {
    if (l1Index >= this.l1.entries) throw new Qcow2Error('qcow2.out-of-range', `${this.path}: L1 index ${l1Index} is beyond the L1 table`);
    const { l2Offset, copied } = this.l1Entry(this.l1, l1Index);
    if (l2Offset !== 0) {
      const table = await this.loadTable(this.l2Cache, this.dirtyL2, l2Offset, `L2 table (L1 entry ${l1Index})`);
      // The refcount decides, not the COPIED bit alone (it may be stale or forged).
      const refs = await this.refcountAt(l2Offset / this.g.clusterSize);
      if (refs === 0) throw new Qcow2Error('qcow2.corrupt', `${this.path}: L2 table at 0x${l2Offset.toString(16)} has refcount 0`);
      if (refs > 1) return this.copyOnWriteL2(l1Index, l2Offset, table);
      if (!copied) {
        encodeEntry(this.l1.view, l1Index * 8, l2Offset, COPIED_HI, 0);
        this.l1Dirty = true;
      }
      // Dirty from now on: the caller changes it after further awaits, and a clean table could
      // be evicted meanwhile, taking the change with it.
      this.dirtyL2.add(l2Offset);
      return table;
    }
    const cluster = await this.allocateClusters(1);
    const offset = cluster * this.g.clusterSize;
    const table = new Uint8Array(this.g.clusterSize);
    this.l2Cache.set(offset, table);
    this.dirtyL2.add(offset);
    encodeEntry(this.l1.view, l1Index * 8, offset, COPIED_HI, 0);
    this.l1Dirty = true;
    return table;
  }

  /**
   * An L2 table shared with an internal snapshot is copied before it changes. The data
   * clusters keep their refcounts: QEMU counts one reference per (L1, L2 entry) path, and the
   * old table still serves the snapshot while the copy serves the active L1. Entries in the
   * copy keep COPIED clear, so writes to them copy the data cluster too.
   */
  private async copyOnWriteL2(l1Index: number, oldOffset: number, oldTable: Uint8Array): Promise<Uint8Array> {
    const cluster = await this.allocateClusters(1);
    const offset = cluster * this.g.clusterSize;
    const table = oldTable.slice();
    this.l2Cache.set(offset, table);
    this.dirtyL2.add(offset);
    encodeEntry(this.l1.view, l1Index * 8, offset, COPIED_HI, 0);
    this.l1Dirty = true;
    this.pendingFrees.push(oldOffset / this.g.clusterSize);
    return table;
  }

  /** Free the host clusters a mapping owns, once its pointer is durably gone (deferred). */
  private releaseMappingLater(raw: RawL2Entry): void {
    if (raw.hi & COMPRESSED_HI) {
      const d = decodeCompressed(raw.hi, raw.lo, this.g.clusterBits);
      const first = Math.floor(d.hostOffset / this.g.clusterSize);
      const last = Math.floor((d.hostOffset + d.size - 1) / this.g.clusterSize);
      for (let c = first; c <= last; c++) this.pendingFrees.push(c);
      return;
    }
    const offset = entryOffset(raw.hi, raw.lo);
    if (offset !== 0 && !this.dataFile) this.pendingFrees.push(offset / this.g.clusterSize);
  }

  /** Write `data` at guest offset `offset`. */
  write(data: Uint8Array, offset: number): Promise<void> {
    return this.lock.write(() => this.writeUnlocked(data, offset));
  }

  private async writeUnlocked(data: Uint8Array, offset: number): Promise<void> {
    this.assertWritable();
    this.checkGuestRange(offset, data.length, this.hdr.size);
    await this.writeRange(offset, data.length, data);
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
    this.checkGuestRange(offset, length, this.hdr.size);
    await this.zeroOrDiscard(offset, length, mode);
  }

  private async zeroOrDiscard(offset: number, length: number, mode: 'zero' | 'discard'): Promise<void> {
    const g = this.g;
    const unit = g.subclusterSize;
    const end = offset + length;
    const alignedStart = Math.ceil(offset / unit) * unit;
    const alignedEnd = Math.floor(end / unit) * unit;
    const hasBacking = this.hdr.backingFile !== null;
    const canFlag = this.hdr.version >= 3;
    if (this.dataFile && (this.hdr.autoclearFeatures & Autoclear.rawExternalData) !== 0n) {
      // The data file must stay a raw image of the disk: zeros are written, not flagged.
      if (mode === 'zero') await this.writeRange(offset, length, null);
      else if (alignedEnd > alignedStart) await this.writeRange(alignedStart, alignedEnd - alignedStart, null);
      return;
    }
    // Partial units at the edges: real zeros for 'zero', untouched for 'discard'.
    if (alignedEnd <= alignedStart) {
      if (mode === 'zero' && length > 0) await this.writeRange(offset, length, null);
      return;
    }
    if (mode === 'zero') {
      if (offset < alignedStart) await this.writeRange(offset, alignedStart - offset, null);
      if (alignedEnd < end) await this.writeRange(alignedEnd, end - alignedEnd, null);
    }
    if (!canFlag && hasBacking) {
      // v2 has no zero flag: only real zeros hide the backing file.
      await this.writeRange(alignedStart, alignedEnd - alignedStart, null);
      return;
    }
    for (let pos = alignedStart; pos < alignedEnd; ) {
      const cluster = Math.floor(pos / g.clusterSize);
      const clusterStart = cluster * g.clusterSize;
      const stop = Math.min(alignedEnd, clusterStart + g.clusterSize);
      const l1Index = Math.floor(cluster / g.l2Entries);
      const { l2Offset } = this.l1Entry(this.l1, l1Index);
      const useFlag = canFlag && (hasBacking || mode === 'zero');
      if (l2Offset === 0 && !useFlag) {
        pos = stop;
        continue;
      }
      const table = await this.writableL2(l1Index);
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      const index = cluster % g.l2Entries;
      const raw = readL2Entry(view, index, g);
      const first = (pos - clusterStart) / unit;
      const last = (stop - clusterStart) / unit; // exclusive
      if (!g.extendedL2) {
        // Whole cluster covered (unit == cluster).
        if (raw.hi & COMPRESSED_HI || entryOffset(raw.hi, raw.lo) !== 0) this.releaseMappingLater(raw);
        writeL2Entry(view, index, g, { hi: 0, lo: useFlag ? 1 : 0, zeroBits: 0, allocBits: 0 });
      } else {
        let mask = 0;
        for (let s = first; s < last; s++) mask |= 1 << s;
        mask >>>= 0;
        if (raw.hi & COMPRESSED_HI) {
          // Decompress the rest into a normal cluster first, then zero the covered part.
          await this.writeRange(clusterStart, g.clusterSize, null, { zeroRange: [pos, stop] });
          continue;
        }
        const alloc = (raw.allocBits & ~mask) >>> 0;
        const zero = useFlag ? (raw.zeroBits | mask) >>> 0 : (raw.zeroBits & ~mask) >>> 0;
        let hi = raw.hi;
        let lo = raw.lo;
        if (alloc === 0 && entryOffset(hi, lo) !== 0) {
          this.releaseMappingLater(raw);
          hi = 0;
          lo = 0;
        }
        writeL2Entry(view, index, g, { hi, lo: lo & ~1, zeroBits: zero, allocBits: alloc });
      }
      this.dirtyL2.add(entryOffset(this.l1.view.getUint32(l1Index * 8), this.l1.view.getUint32(l1Index * 8 + 4)));
      pos = stop;
    }
  }

  /**
   * The write engine: for each touched cluster, make the touched subcluster span writable
   * (reuse an owned allocation or allocate a new cluster), fill partial edges from the old
   * content (copy-on-write from this image, its backing chain or zeros), then write the data.
   * Data writes to contiguous host ranges are coalesced into one write.
   * `data` null writes zeros. `zeroRange` (internal) rewrites a whole cluster keeping the
   * old content except the given range, which becomes zeros.
   */
  private async writeRange(offset: number, length: number, data: Uint8Array | null, special?: { zeroRange: [number, number] }): Promise<void> {
    const g = this.g;
    const end = offset + length;
    let pending: { host: number; chunks: Uint8Array[]; length: number } | null = null;
    // Guest data goes to the external data file when there is one.
    const target = this.dataFile ?? this.file;
    const flushPending = async () => {
      if (!pending) return;
      const buffer = pending.chunks.length === 1 ? pending.chunks[0]! : Buffer.concat(pending.chunks);
      await target.write(buffer, pending.host);
      if (!this.dataFile) this.fileLength = Math.max(this.fileLength, pending.host + buffer.length);
      pending = null;
    };
    for (let pos = offset; pos < end; ) {
      const cluster = Math.floor(pos / g.clusterSize);
      const clusterStart = cluster * g.clusterSize;
      const stop = Math.min(end, clusterStart + g.clusterSize);
      const l1Index = Math.floor(cluster / g.l2Entries);
      const table = await this.writableL2(l1Index);
      const l2Offset = entryOffset(this.l1.view.getUint32(l1Index * 8), this.l1.view.getUint32(l1Index * 8 + 4));
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      const index = cluster % g.l2Entries;
      const raw = readL2Entry(view, index, g);
      // Span of subclusters to (re)write.
      const firstSub = Math.floor((pos - clusterStart) / g.subclusterSize);
      const lastSub = Math.floor((stop - 1 - clusterStart) / g.subclusterSize);
      const spanStart = clusterStart + firstSub * g.subclusterSize;
      const spanEnd = clusterStart + (lastSub + 1) * g.subclusterSize;

      let host = entryOffset(raw.hi, raw.lo);
      const compressed = (raw.hi & COMPRESSED_HI) !== 0;
      let owned = !compressed && host !== 0 && !this.dataFile;
      if (owned) {
        // Never write in place on the word of an entry alone: the cluster must be inside the
        // file, past the header, and referenced exactly once (COPIED may be stale or forged).
        if (host < g.clusterSize || host + g.clusterSize > Math.max(this.fileLength, this.allocEnd * g.clusterSize)) {
          throw new Qcow2Error('qcow2.corrupt', `${this.path}: L2 entry for guest cluster ${cluster} points at 0x${host.toString(16)}, outside the file`);
        }
        const refs = await this.refcountAt(host / g.clusterSize);
        if (refs === 0) throw new Qcow2Error('qcow2.corrupt', `${this.path}: data cluster 0x${host.toString(16)} is in use but has refcount 0`);
        if (refs !== 1) owned = false;
      }
      let newEntry: RawL2Entry;
      // Old content of the span, needed where the write does not cover it.
      const span = new Uint8Array(spanEnd - spanStart);
      const needsOld = spanStart < pos || spanEnd > stop || special !== undefined;
      if (needsOld) await this.readView(this.l1, span, spanStart, this.backing);
      if (special) span.fill(0, special.zeroRange[0] - spanStart, special.zeroRange[1] - spanStart);
      else if (data) span.set(data.subarray(pos - offset, stop - offset), pos - spanStart);
      else span.fill(0, pos - spanStart, stop - spanStart);

      if (this.dataFile || owned) {
        if (this.dataFile) {
          // External data file: guest cluster N lives at host offset N (offset 0 is valid with
          // COPIED), nothing is refcounted, and a cluster is "allocated" by pointing at it.
          if (compressed) throw new Qcow2Error('qcow2.corrupt', `${this.path}: compressed cluster in an image with an external data file`);
          if (host === 0 && (raw.hi & COPIED_HI) === 0) host = clusterStart;
        }
        // Written in place: the written subclusters become allocated and stop reading as zero.
        let alloc = raw.allocBits;
        let zero = raw.zeroBits;
        if (g.extendedL2) {
          for (let s = firstSub; s <= lastSub; s++) alloc |= 1 << s;
          for (let s = firstSub; s <= lastSub; s++) zero &= ~(1 << s);
        }
        newEntry = { hi: (Math.floor(host / TWO32) | COPIED_HI) >>> 0, lo: host >>> 0, zeroBits: zero >>> 0, allocBits: alloc >>> 0 };
      } else {
        if (compressed || host !== 0) this.releaseMappingLater(raw);
        host = (await this.allocateClusters(1)) * g.clusterSize;
        let alloc = 0;
        let zero = raw.zeroBits;
        if (g.extendedL2) {
          // A cluster shared with other allocated subclusters carries them over; a compressed
          // cluster has no subclusters, so the whole of it becomes allocated. Either way the new
          // cluster is first written whole: its current content with the span laid over it.
          if (compressed || raw.allocBits !== 0) {
            const whole = new Uint8Array(g.clusterSize);
            await this.readView(this.l1, whole, clusterStart, this.backing);
            whole.set(span, spanStart - clusterStart);
            await flushPending();
            await this.file.write(whole, host);
            this.fileLength = Math.max(this.fileLength, host + g.clusterSize);
            alloc = compressed ? 0xffffffff : raw.allocBits;
            if (compressed) zero = 0;
          }
          for (let s = firstSub; s <= lastSub; s++) alloc |= 1 << s;
          for (let s = firstSub; s <= lastSub; s++) zero &= ~(1 << s);
        }
        newEntry = { hi: (Math.floor(host / TWO32) | COPIED_HI) >>> 0, lo: host >>> 0, zeroBits: zero >>> 0, allocBits: alloc >>> 0 };
        if (!g.extendedL2 && (spanStart !== clusterStart || spanEnd !== clusterStart + g.clusterSize)) {
          throw new Error('internal: standard L2 span must be the whole cluster');
        }
      }
      const hostSpan = host + (spanStart - clusterStart);
      const p = pending as { host: number; chunks: Uint8Array[]; length: number } | null;
      if (p && p.host + p.length === hostSpan) {
        p.chunks.push(span);
        p.length += span.length;
      } else {
        await flushPending();
        pending = { host: hostSpan, chunks: [span], length: span.length };
      }
      if ((pending as { length: number }).length >= 8 * 1024 * 1024) await flushPending();
      writeL2Entry(view, index, g, newEntry);
      this.dirtyL2.add(l2Offset);
      pos = stop;
    }
    await flushPending();
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
    const g = this.g;
    if (g.extendedL2 || this.dataFile) {
      throw new Qcow2Error('qcow2.unsupported-feature', `${this.path}: mapping clusters for direct filling needs an image without extended L2 or an external data file`);
    }
    const sorted = [...new Set(guestClusters)].sort((a, b) => a - b);
    const result: Array<{ guestCluster: number; hostOffset: number }> = [];
    for (let i = 0; i < sorted.length; ) {
      let run = 1;
      while (i + run < sorted.length && sorted[i + run] === sorted[i]! + run) run += 1;
      const firstHost = await this.allocateClusters(run);
      for (let k = 0; k < run; k++) {
        const cluster = sorted[i + k]!;
        this.checkGuestRange(cluster * g.clusterSize, g.clusterSize, this.hdr.size);
        const l1Index = Math.floor(cluster / g.l2Entries);
        const table = await this.writableL2(l1Index);
        const l2Offset = entryOffset(this.l1.view.getUint32(l1Index * 8), this.l1.view.getUint32(l1Index * 8 + 4));
        const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
        const index = cluster % g.l2Entries;
        const raw = readL2Entry(view, index, g);
        if (entryOffset(raw.hi, raw.lo) !== 0 || (raw.hi & COMPRESSED_HI) !== 0) {
          throw new Qcow2Error('qcow2.bad-argument', `${this.path}: guest cluster ${cluster} is allocated already; only unallocated clusters can be mapped for filling`);
        }
        const host = (firstHost + k) * g.clusterSize;
        writeL2Entry(view, index, g, { hi: (Math.floor(host / TWO32) | COPIED_HI) >>> 0, lo: host >>> 0, zeroBits: 0, allocBits: 0 });
        this.dirtyL2.add(l2Offset);
        this.fileLength = Math.max(this.fileLength, host + g.clusterSize);
        result.push({ guestCluster: cluster, hostOffset: host });
      }
      i += run;
    }
    return result;
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
    await this.writeRefcounts();
    await this.file.sync();
    for (const offset of [...this.dirtyL2].sort((a, b) => a - b)) {
      const table = this.l2Cache.get(offset);
      if (table) await this.file.write(table, offset);
    }
    this.dirtyL2.clear();
    if (this.l1Dirty) {
      await this.file.write(this.l1.table, this.hdr.l1TableOffset);
      this.l1Dirty = false;
    }
    if (this.headerDirty) {
      await this.file.sync();
      await this.writeHeader();
      this.headerDirty = false;
    }
    await this.file.sync();
    if (this.pendingFrees.length) {
      const frees = this.pendingFrees;
      this.pendingFrees = [];
      for (const cluster of frees) await this.adjustRefcount(cluster, -1);
      await this.writeRefcounts();
      await this.file.sync();
      if (this.pendingFrees.length) await this.flushUnlocked();
    }
  }

  private async writeRefcounts(): Promise<void> {
    for (const offset of [...this.dirtyRefblocks].sort((a, b) => a - b)) {
      const block = this.refblockCache.get(offset);
      if (block) await this.file.write(block, offset);
      this.fileLength = Math.max(this.fileLength, offset + this.g.clusterSize);
    }
    this.dirtyRefblocks.clear();
    if (this.reftableDirty) {
      await this.file.write(this.reftable, this.hdr.refcountTableOffset);
      this.fileLength = Math.max(this.fileLength, this.hdr.refcountTableOffset + this.reftable.length);
      this.reftableDirty = false;
    }
    // Clusters reserved at the end but not written yet still belong inside the file.
    const end = this.allocEnd * this.g.clusterSize;
    if (this.fileLength < end) {
      await this.file.truncate(end);
      this.fileLength = end;
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
    if (name !== null) resolveReferencedPath(name, this.path, 'backing file');
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
    const g = this.g;
    const released: number[] = [];
    for (const cluster of guestClusterIndexes) {
      if (!Number.isSafeInteger(cluster) || cluster < 0 || cluster * g.clusterSize >= this.hdr.size) {
        throw new Qcow2Error('qcow2.out-of-range', `${this.path}: guest cluster ${cluster} is outside the virtual disk`);
      }
      const l1Index = Math.floor(cluster / g.l2Entries);
      const { l2Offset } = this.l1Entry(this.l1, l1Index);
      if (l2Offset === 0) continue;
      const table = await this.writableL2(l1Index);
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      const index = cluster % g.l2Entries;
      const raw = readL2Entry(view, index, g);
      if (raw.hi === 0 && raw.lo === 0 && raw.zeroBits === 0 && raw.allocBits === 0) continue;
      const before = this.pendingFrees.length;
      this.releaseMappingLater(raw);
      for (const c of this.pendingFrees.splice(before)) released.push(c * g.clusterSize);
      writeL2Entry(view, index, g, { hi: 0, lo: 0, zeroBits: 0, allocBits: 0 });
      this.dirtyL2.add(l2Offset);
    }
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
      await this.adjustRefcount(offset / this.g.clusterSize, -1);
    }
    await this.writeRefcounts();
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
    if (needed > this.l1.entries) {
      if (needed * 8 > MAX_L1_BYTES) throw new Qcow2Error('qcow2.too-large', `${this.path}: L1 table for ${newSize} bytes exceeds ${MAX_L1_BYTES} bytes`);
      await this.flushUnlocked();
      const clusters = Math.ceil((needed * 8) / g.clusterSize);
      const entries = needed;
      const start = await this.allocateClusters(clusters);
      const table = new Uint8Array(clusters * g.clusterSize);
      table.set(this.l1.table);
      const oldOffset = this.hdr.l1TableOffset;
      const oldClusters = Math.ceil(this.l1.table.length / g.clusterSize);
      await this.writeRefcounts();
      await this.file.write(table, start * g.clusterSize);
      this.fileLength = Math.max(this.fileLength, (start + clusters) * g.clusterSize);
      await this.file.sync();
      this.l1 = { table: table.subarray(0, entries * 8), view: new DataView(table.buffer, 0, entries * 8), size: newSize, entries };
      this.hdr = { ...this.hdr, l1TableOffset: start * g.clusterSize, l1Size: entries, size: newSize };
      await this.writeHeader();
      await this.file.sync();
      if (oldClusters > 0 && oldOffset !== 0) for (let i = 0; i < oldClusters; i++) this.pendingFrees.push(oldOffset / g.clusterSize + i);
      await this.flushUnlocked();
      return;
    }
    this.hdr = { ...this.hdr, size: newSize };
    this.l1 = { ...this.l1, size: newSize };
    this.headerDirty = true;
    await this.flushUnlocked();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (this.writable) await this.lock.write(() => this.flushUnlocked());
    } finally {
      this.closed = true;
      await this.file.close();
      await this.dataFile?.close();
    }
  }
}

/** ENOENT as a typed error (other I/O errors stay as they are). */
function notFound(error: unknown, message: string): unknown {
  if ((error as NodeJS.ErrnoException).code === 'ENOENT') return new Qcow2Error('qcow2.not-found', message, { cause: error });
  return error;
}

function sameMapping(a: ClusterMapping, b: ClusterMapping, aLength: number): boolean {
  if (a.kind !== b.kind) return false;
  switch (a.kind) {
    case 'unallocated':
      return true;
    case 'zero': {
      const bo = (b as { hostOffset: number | null }).hostOffset;
      if (a.hostOffset === null || bo === null) return a.hostOffset === bo;
      return a.hostOffset + aLength === bo;
    }
    case 'normal':
      return a.hostOffset + aLength === (b as { hostOffset: number }).hostOffset;
    case 'compressed':
      return false;
  }
}

function push(extents: MappedExtent[], guestOffset: number, length: number, mapping: ClusterMapping): void {
  const last = extents[extents.length - 1];
  if (last && last.guestOffset + last.length === guestOffset && sameMapping(last.mapping, mapping, last.length)) {
    last.length += length;
    return;
  }
  extents.push({ guestOffset, length, mapping });
}
