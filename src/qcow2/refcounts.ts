/**
 * Refcounts (QEMU's qcow2-refcount.c): the refcount table and its blocks, host cluster
 * allocation, and the frees deferred until nothing durable points at a cluster any more.
 * Changes stay in memory until writeBack(); the image decides when (see Qcow2Image.flush).
 */
import { Qcow2Error } from './errors.js';
import type { ImageFile } from './image-file.js';
import { TableCache } from './cache.js';
import { encodeEntry, getRefcount, maxRefcount, setRefcount } from './layout.js';

const TWO32 = 0x1_0000_0000;

/** The header fields that say where the refcount table is. */
export interface ReftableLocation {
  /** Where the header says the refcount table is now. */
  reftableOffset(): number;
  /** The table moved: the header must say so (it is written at the next flush). */
  moveReftable(offset: number, clusters: number): void;
}

export class RefcountTable {
  private reftable: Uint8Array;
  private reftableView: DataView;
  private reftableDirty = false;
  private readonly blocks: TableCache;
  /** Cluster index one past the last cluster in use or reserved. */
  private allocEnd: number;
  /** First cluster index worth scanning for a free cluster. */
  private freeHint = 0;
  /** Host clusters whose refcount drops once the pointers to them are durable (flush). */
  private pendingFrees: number[] = [];

  constructor(
    private readonly host: ImageFile,
    private readonly location: ReftableLocation,
    reftable: Uint8Array,
    maxCachedBlocks: number,
  ) {
    this.reftable = reftable;
    this.reftableView = new DataView(reftable.buffer, reftable.byteOffset, reftable.byteLength);
    this.allocEnd = Math.ceil(host.length / host.g.clusterSize);
    this.blocks = new TableCache(host, maxCachedBlocks, () => this.limit());
  }

  /** Bytes of the host file in use or reserved (clusters reserved at the end may be unwritten). */
  limit(): number {
    return Math.max(this.host.length, this.allocEnd * this.host.g.clusterSize);
  }

  private refcountLocation(cluster: number): { tableIndex: number; blockIndex: number } {
    const e = this.host.g.refcountBlockEntries;
    return { tableIndex: Math.floor(cluster / e), blockIndex: cluster % e };
  }

  private reftableEntry(index: number): number {
    if (index * 8 >= this.reftable.length) return 0;
    const hi = this.reftableView.getUint32(index * 8);
    const lo = this.reftableView.getUint32(index * 8 + 4);
    if (lo & 0x1ff) throw new Qcow2Error('qcow2.corrupt', `${this.host.path}: refcount table entry ${index} has reserved bits set`);
    return hi * TWO32 + lo;
  }

  /** Refcount of host cluster `cluster` (0 when no refcount block covers it). */
  async refcountAt(cluster: number): Promise<number> {
    const { tableIndex, blockIndex } = this.refcountLocation(cluster);
    const blockOffset = this.reftableEntry(tableIndex);
    if (blockOffset === 0) return 0;
    const block = await this.blocks.load(blockOffset, `refcount block ${tableIndex}`);
    return getRefcount(block, new DataView(block.buffer), blockIndex, this.host.g.refcountOrder);
  }

  async adjustRefcount(cluster: number, delta: number): Promise<void> {
    const { path, g } = this.host;
    const { tableIndex, blockIndex } = this.refcountLocation(cluster);
    let blockOffset = this.reftableEntry(tableIndex);
    if (blockOffset === 0) {
      if (delta < 0) throw new Qcow2Error('qcow2.corrupt', `${path}: freeing host cluster ${cluster}, which has no refcount block`);
      await this.createRefblock(tableIndex);
      blockOffset = this.reftableEntry(tableIndex);
    }
    const block = await this.blocks.load(blockOffset, `refcount block ${tableIndex}`);
    const view = new DataView(block.buffer);
    const current = getRefcount(block, view, blockIndex, g.refcountOrder);
    const next = current + delta;
    if (next < 0) throw new Qcow2Error('qcow2.corrupt', `${path}: refcount of host cluster ${cluster} would drop below 0`);
    if (next > maxRefcount(g.refcountOrder)) throw new Qcow2Error('qcow2.corrupt', `${path}: refcount of host cluster ${cluster} would overflow ${g.refcountBits} bits`);
    setRefcount(block, view, blockIndex, g.refcountOrder, next);
    this.blocks.markDirty(blockOffset);
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
    const offset = cluster * this.host.g.clusterSize;
    this.blocks.add(offset, new Uint8Array(this.host.g.clusterSize));
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
    const g = this.host.g;
    const entriesPerCluster = g.clusterSize / 8;
    const oldClusters = this.reftable.length / g.clusterSize;
    let clusters = Math.max(Math.ceil(minEntries / entriesPerCluster), Math.ceil(oldClusters * 1.5), oldClusters + 1);
    // Enough coverage for the table itself, the blocks describing it and the file so far.
    while (clusters * entriesPerCluster * g.refcountBlockEntries < this.allocEnd + clusters * 2 + 8) clusters++;
    if (clusters * g.clusterSize > 8 * 1024 * 1024) throw new Qcow2Error('qcow2.too-large', `${this.host.path}: refcount table would exceed 8 MiB`);
    const oldOffset = this.location.reftableOffset();
    const table = new Uint8Array(clusters * g.clusterSize);
    table.set(this.reftable);
    this.reftable = table;
    this.reftableView = new DataView(table.buffer);
    const first = this.allocEnd;
    this.allocEnd += clusters;
    this.location.moveReftable(first * g.clusterSize, clusters);
    this.reftableDirty = true;
    for (let i = 0; i < clusters; i++) await this.adjustRefcount(first + i, 1);
    for (let i = 0; i < oldClusters; i++) this.pendingFrees.push(oldOffset / g.clusterSize + i);
  }

  /**
   * Allocate `count` contiguous host clusters (refcount 1). Holes freed earlier are reused
   * first-fit; otherwise the file grows.
   */
  async allocateClusters(count: number): Promise<number> {
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

  /** Drop one reference from host cluster `cluster` once the pointers to it are durable (flush). */
  freeLater(cluster: number): void {
    this.pendingFrees.push(cluster);
  }

  /** The deferred frees so far, handed over (the list starts empty again). */
  takePendingFrees(): number[] {
    const frees = this.pendingFrees;
    this.pendingFrees = [];
    return frees;
  }

  get hasPendingFrees(): boolean {
    return this.pendingFrees.length > 0;
  }

  /** Write the dirty refcount blocks, then the table, and make the file cover every reserved cluster. */
  async writeBack(): Promise<void> {
    const { file, g } = this.host;
    await this.blocks.writeBack((offset) => this.host.grow(offset + g.clusterSize));
    if (this.reftableDirty) {
      await file.write(this.reftable, this.location.reftableOffset());
      this.host.grow(this.location.reftableOffset() + this.reftable.length);
      this.reftableDirty = false;
    }
    // Clusters reserved at the end but not written yet still belong inside the file.
    const end = this.allocEnd * g.clusterSize;
    if (this.host.length < end) {
      await file.truncate(end);
      this.host.length = end;
    }
  }
}
