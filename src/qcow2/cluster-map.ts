/**
 * Cluster mapping (QEMU's qcow2-cluster.c): the active L1 table and the cached L2 tables,
 * lookups of guest offsets in them (the active L1 or a snapshot's), and L2 tables made
 * writable for the write path (allocated when absent, copied when a snapshot shares them).
 */
import { Qcow2Error } from './errors.js';
import type { ImageFile } from './image-file.js';
import { TableCache } from './cache.js';
import type { RefcountTable } from './refcounts.js';
import {
  COPIED_HI,
  decodeL2,
  encodeEntry,
  entryOffset,
  L1_RESERVED_HI,
  L1_RESERVED_LO,
  readL2Entry,
  type ClusterMapping,
} from './layout.js';

/** A run of guest bytes with one mapping kind (host offsets contiguous for normal runs). */
export interface MappedExtent {
  guestOffset: number;
  length: number;
  mapping: ClusterMapping;
}

/** An L1 table and the virtual size it maps: the active one or a snapshot's. */
export interface L1View {
  table: Uint8Array;
  view: DataView;
  size: number;
  entries: number;
}

/** An L2 table of the active L1 that may be changed: where it is, and a view of its bytes. */
export interface WritableL2 {
  offset: number;
  view: DataView;
}

export class ClusterMap {
  private l1: L1View;
  private l1Dirty = false;
  private readonly l2Tables: TableCache;

  constructor(
    private readonly host: ImageFile,
    private readonly refcounts: RefcountTable,
    /** The image's qcow2 version (2 has no zero flag). */
    private readonly version: number,
    l1: L1View,
    maxCachedTables: number,
  ) {
    this.l1 = l1;
    this.l2Tables = new TableCache(host, maxCachedTables, () => refcounts.limit());
  }

  /** The active L1 table. */
  get active(): L1View {
    return this.l1;
  }

  /** Switch to another active L1 table (one already durable where the header will point). */
  replaceActive(l1: L1View): void {
    this.l1 = l1;
  }

  /**
   * Grow the active L1 table to `entries` entries (for a disk of `size` bytes): the new L1 is
   * written to fresh clusters, then `switchHeader` points the header at it (durably), and only
   * then is the old one at `oldOffset` freed (deferred to the next flush).
   */
  async growL1(entries: number, size: number, oldOffset: number, switchHeader: (offset: number) => Promise<void>): Promise<void> {
    const { file, g } = this.host;
    const clusters = Math.ceil((entries * 8) / g.clusterSize);
    const start = await this.refcounts.allocateClusters(clusters);
    const table = new Uint8Array(clusters * g.clusterSize);
    table.set(this.l1.table);
    const oldClusters = Math.ceil(this.l1.table.length / g.clusterSize);
    await this.refcounts.writeBack();
    await file.write(table, start * g.clusterSize);
    this.host.grow((start + clusters) * g.clusterSize);
    await file.sync();
    this.l1 = { table: table.subarray(0, entries * 8), view: new DataView(table.buffer, 0, entries * 8), size, entries };
    await switchHeader(start * g.clusterSize);
    if (oldClusters > 0 && oldOffset !== 0) for (let i = 0; i < oldClusters; i++) this.refcounts.freeLater(oldOffset / g.clusterSize + i);
  }

  l1Entry(l1: L1View, index: number): { l2Offset: number; copied: boolean } {
    const hi = l1.view.getUint32(index * 8);
    const lo = l1.view.getUint32(index * 8 + 4);
    if (lo & L1_RESERVED_LO || hi & L1_RESERVED_HI) {
      throw new Qcow2Error('qcow2.corrupt', `${this.host.path}: L1 entry ${index} has reserved bits set`);
    }
    return { l2Offset: entryOffset(hi, lo), copied: (hi & COPIED_HI) !== 0 };
  }

  private async l2TableFor(l1: L1View, l1Index: number): Promise<Uint8Array | null> {
    if (l1Index >= l1.entries) return null;
    const { l2Offset } = this.l1Entry(l1, l1Index);
    if (l2Offset === 0) return null;
    return this.l2Tables.load(l2Offset, `L2 table (L1 entry ${l1Index})`);
  }

  /** The mapping of the (sub)cluster holding `guestOffset` under `l1`. */
  async mappingIn(l1: L1View, guestOffset: number): Promise<ClusterMapping> {
    const g = this.host.g;
    const l1Index = Math.floor(guestOffset / g.l2Coverage);
    const table = await this.l2TableFor(l1, l1Index);
    if (!table) return { kind: 'unallocated' };
    const cluster = Math.floor(guestOffset / g.clusterSize);
    const l2Index = cluster % g.l2Entries;
    const sub = Math.floor((guestOffset % g.clusterSize) / g.subclusterSize);
    const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
    const mapping = decodeL2(readL2Entry(view, l2Index, g), sub, g, this.version, this.host.dataFile !== null);
    return mapping;
  }

  /**
   * Mappings for [offset, offset+length) under `l1` as merged extents: adjacent (sub)clusters
   * of the same kind merge, and normal ones only when their host offsets are contiguous.
   */
  async mapIn(l1: L1View, offset: number, length: number): Promise<MappedExtent[]> {
    const g = this.host.g;
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
        const mapping = decodeL2(readL2Entry(view, cluster % g.l2Entries, g), sub, g, this.version, this.host.dataFile !== null);
        let exact: ClusterMapping = mapping;
        if (mapping.kind === 'normal') exact = { kind: 'normal', hostOffset: mapping.hostOffset + inCluster };
        else if (mapping.kind === 'zero' && mapping.hostOffset !== null) exact = { kind: 'zero', hostOffset: mapping.hostOffset + inCluster };
        push(extents, pos, stepEnd - pos, exact);
        pos = stepEnd;
      }
    }
    return extents;
  }

  /**
   * L2 table (in the cache, writable, marked dirty) for L1 entry `l1Index` of the active L1,
   * allocating it if absent.
   */
  async writableL2(l1Index: number): Promise<WritableL2> {
    const { path, g } = this.host;
    if (l1Index >= this.l1.entries) throw new Qcow2Error('qcow2.out-of-range', `${path}: L1 index ${l1Index} is beyond the L1 table`);
    const { l2Offset, copied } = this.l1Entry(this.l1, l1Index);
    if (l2Offset !== 0) {
      const table = await this.l2Tables.load(l2Offset, `L2 table (L1 entry ${l1Index})`);
      // The refcount decides, not the COPIED bit alone (it may be stale or forged).
      const refs = await this.refcounts.refcountAt(l2Offset / g.clusterSize);
      if (refs === 0) throw new Qcow2Error('qcow2.corrupt', `${path}: L2 table at 0x${l2Offset.toString(16)} has refcount 0`);
      if (refs > 1) return this.copyOnWriteL2(l1Index, l2Offset, table);
      if (!copied) {
        encodeEntry(this.l1.view, l1Index * 8, l2Offset, COPIED_HI, 0);
        this.l1Dirty = true;
      }
      // Dirty from now on: the caller changes it after further awaits, and a clean table could
      // be evicted meanwhile, taking the change with it.
      this.l2Tables.markDirty(l2Offset);
      return writable(l2Offset, table);
    }
    const cluster = await this.refcounts.allocateClusters(1);
    const offset = cluster * g.clusterSize;
    const table = new Uint8Array(g.clusterSize);
    this.l2Tables.add(offset, table);
    encodeEntry(this.l1.view, l1Index * 8, offset, COPIED_HI, 0);
    this.l1Dirty = true;
    return writable(offset, table);
  }

  /**
   * An L2 table shared with an internal snapshot is copied before it changes. The data
   * clusters keep their refcounts: QEMU counts one reference per (L1, L2 entry) path, and the
   * old table still serves the snapshot while the copy serves the active L1. Entries in the
   * copy keep COPIED clear, so writes to them copy the data cluster too.
   */
  private async copyOnWriteL2(l1Index: number, oldOffset: number, oldTable: Uint8Array): Promise<WritableL2> {
    const g = this.host.g;
    const cluster = await this.refcounts.allocateClusters(1);
    const offset = cluster * g.clusterSize;
    const table = oldTable.slice();
    this.l2Tables.add(offset, table);
    encodeEntry(this.l1.view, l1Index * 8, offset, COPIED_HI, 0);
    this.l1Dirty = true;
    this.refcounts.freeLater(oldOffset / g.clusterSize);
    return writable(offset, table);
  }

  /** The L2 table at `l2Offset` changed: it goes to the file at the next writeBack. */
  markDirty(l2Offset: number): void {
    this.l2Tables.markDirty(l2Offset);
  }

  /** Write the dirty L2 tables (in offset order), then the active L1 at `l1TableOffset` if it changed. */
  async writeBack(l1TableOffset: number): Promise<void> {
    await this.l2Tables.writeBack();
    if (this.l1Dirty) {
      await this.host.file.write(this.l1.table, l1TableOffset);
      this.l1Dirty = false;
    }
  }
}

function writable(offset: number, table: Uint8Array): WritableL2 {
  return { offset, view: new DataView(table.buffer, table.byteOffset, table.byteLength) };
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
