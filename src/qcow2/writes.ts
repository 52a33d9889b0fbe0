/**
 * The write path: guest writes with copy-on-write from the backing chain, zeroing and
 * discarding, clusters mapped for filling by the caller, and clusters detached for recompose.
 * Everything here changes tables in memory and writes guest data; the image flushes the
 * tables in crash-safe order (see Qcow2Image.flush). Callers hold the image's write lock.
 */
import type { ByteSource } from '../io/byte-source.js';
import { Qcow2Error } from './errors.js';
import { Autoclear, type Qcow2Header } from './header.js';
import type { ImageFile } from './image-file.js';
import type { ClusterMap } from './cluster-map.js';
import type { DataReader } from './reads.js';
import type { RefcountTable } from './refcounts.js';
import { COPIED_HI, COMPRESSED_HI, decodeCompressed, entryOffset, readL2Entry, writeL2Entry, type RawL2Entry } from './layout.js';

const TWO32 = 0x1_0000_0000;

/** What the write path reads from its image, as it is at the time of each call. */
export interface WriteTarget {
  /** The image's current header. */
  header(): Qcow2Header;
  /** Source of the old content of unallocated clusters (copy-on-write). */
  backing(): ByteSource | null;
}

export class DataWriter {
  constructor(
    private readonly host: ImageFile,
    private readonly image: WriteTarget,
    private readonly clusters: ClusterMap,
    private readonly refcounts: RefcountTable,
    private readonly reader: DataReader,
  ) {}

  /** The host clusters a mapping owns (none for guest clusters in an external data file). */
  private clustersOwnedBy(raw: RawL2Entry): number[] {
    const g = this.host.g;
    if (raw.hi & COMPRESSED_HI) {
      const d = decodeCompressed(raw.hi, raw.lo, g.clusterBits);
      const first = Math.floor(d.hostOffset / g.clusterSize);
      const last = Math.floor((d.hostOffset + d.size - 1) / g.clusterSize);
      const owned: number[] = [];
      for (let c = first; c <= last; c++) owned.push(c);
      return owned;
    }
    const offset = entryOffset(raw.hi, raw.lo);
    return offset !== 0 && !this.host.dataFile ? [offset / g.clusterSize] : [];
  }

  /** Free the host clusters a mapping owns, once its pointer is durably gone (deferred). */
  private releaseMappingLater(raw: RawL2Entry): void {
    for (const cluster of this.clustersOwnedBy(raw)) this.refcounts.freeLater(cluster);
  }

  /**
   * Zero or discard [offset, offset+length), inside the virtual disk: see Qcow2Image.writeZeroes
   * and Qcow2Image.discard.
   */
  async zeroOrDiscard(offset: number, length: number, mode: 'zero' | 'discard'): Promise<void> {
    const g = this.host.g;
    const unit = g.subclusterSize;
    const end = offset + length;
    const alignedStart = Math.ceil(offset / unit) * unit;
    const alignedEnd = Math.floor(end / unit) * unit;
    const hasBacking = this.image.header().backingFile !== null;
    const canFlag = this.image.header().version >= 3;
    if (this.host.dataFile && (this.image.header().autoclearFeatures & Autoclear.rawExternalData) !== 0n) {
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
      const { l2Offset } = this.clusters.l1Entry(this.clusters.active, l1Index);
      const useFlag = canFlag && (hasBacking || mode === 'zero');
      if (l2Offset === 0 && !useFlag) {
        pos = stop;
        continue;
      }
      const { offset: tableOffset, view } = await this.clusters.writableL2(l1Index);
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
      this.clusters.markDirty(tableOffset);
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
  async writeRange(offset: number, length: number, data: Uint8Array | null, special?: { zeroRange: [number, number] }): Promise<void> {
    const g = this.host.g;
    const end = offset + length;
    let pending: { host: number; chunks: Uint8Array[]; length: number } | null = null;
    // Guest data goes to the external data file when there is one.
    const target = this.host.dataFile ?? this.host.file;
    const flushPending = async () => {
      if (!pending) return;
      const buffer = pending.chunks.length === 1 ? pending.chunks[0]! : Buffer.concat(pending.chunks);
      await target.write(buffer, pending.host);
      if (!this.host.dataFile) this.host.grow(pending.host + buffer.length);
      pending = null;
    };
    for (let pos = offset; pos < end; ) {
      const cluster = Math.floor(pos / g.clusterSize);
      const clusterStart = cluster * g.clusterSize;
      const stop = Math.min(end, clusterStart + g.clusterSize);
      const l1Index = Math.floor(cluster / g.l2Entries);
      const { offset: l2Offset, view } = await this.clusters.writableL2(l1Index);
      const index = cluster % g.l2Entries;
      const raw = readL2Entry(view, index, g);
      // Span of subclusters to (re)write.
      const firstSub = Math.floor((pos - clusterStart) / g.subclusterSize);
      const lastSub = Math.floor((stop - 1 - clusterStart) / g.subclusterSize);
      const spanStart = clusterStart + firstSub * g.subclusterSize;
      const spanEnd = clusterStart + (lastSub + 1) * g.subclusterSize;

      let host = entryOffset(raw.hi, raw.lo);
      const compressed = (raw.hi & COMPRESSED_HI) !== 0;
      let owned = !compressed && host !== 0 && !this.host.dataFile;
      if (owned) {
        // Never write in place on the word of an entry alone: the cluster must be inside the
        // file, past the header, and referenced exactly once (COPIED may be stale or forged).
        if (host < g.clusterSize || host + g.clusterSize > this.refcounts.limit()) {
          throw new Qcow2Error('qcow2.corrupt', `${this.host.path}: L2 entry for guest cluster ${cluster} points at 0x${host.toString(16)}, outside the file`);
        }
        const refs = await this.refcounts.refcountAt(host / g.clusterSize);
        if (refs === 0) throw new Qcow2Error('qcow2.corrupt', `${this.host.path}: data cluster 0x${host.toString(16)} is in use but has refcount 0`);
        if (refs !== 1) owned = false;
      }
      let newEntry: RawL2Entry;
      // Old content of the span, needed where the write does not cover it.
      const span = new Uint8Array(spanEnd - spanStart);
      const needsOld = spanStart < pos || spanEnd > stop || special !== undefined;
      if (needsOld) await this.reader.readView(this.clusters.active, span, spanStart, this.image.backing());
      if (special) span.fill(0, special.zeroRange[0] - spanStart, special.zeroRange[1] - spanStart);
      else if (data) span.set(data.subarray(pos - offset, stop - offset), pos - spanStart);
      else span.fill(0, pos - spanStart, stop - spanStart);

      if (this.host.dataFile || owned) {
        if (this.host.dataFile) {
          // External data file: guest cluster N lives at host offset N (offset 0 is valid with
          // COPIED), nothing is refcounted, and a cluster is "allocated" by pointing at it.
          if (compressed) throw new Qcow2Error('qcow2.corrupt', `${this.host.path}: compressed cluster in an image with an external data file`);
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
        host = (await this.refcounts.allocateClusters(1)) * g.clusterSize;
        let alloc = 0;
        let zero = raw.zeroBits;
        if (g.extendedL2) {
          // A cluster shared with other allocated subclusters carries them over; a compressed
          // cluster has no subclusters, so the whole of it becomes allocated. Either way the new
          // cluster is first written whole: its current content with the span laid over it.
          if (compressed || raw.allocBits !== 0) {
            const whole = new Uint8Array(g.clusterSize);
            await this.reader.readView(this.clusters.active, whole, clusterStart, this.image.backing());
            whole.set(span, spanStart - clusterStart);
            await flushPending();
            await this.host.file.write(whole, host);
            this.host.grow(host + g.clusterSize);
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
      this.clusters.markDirty(l2Offset);
      pos = stop;
    }
    await flushPending();
  }

  /** See Qcow2Image.allocateDataClusters. */
  async mapForFilling(guestClusters: number[]): Promise<Array<{ guestCluster: number; hostOffset: number }>> {
    const g = this.host.g;
    if (g.extendedL2 || this.host.dataFile) {
      throw new Qcow2Error('qcow2.unsupported-feature', `${this.host.path}: mapping clusters for direct filling needs an image without extended L2 or an external data file`);
    }
    const sorted = [...new Set(guestClusters)].sort((a, b) => a - b);
    const result: Array<{ guestCluster: number; hostOffset: number }> = [];
    for (let i = 0; i < sorted.length; ) {
      let run = 1;
      while (i + run < sorted.length && sorted[i + run] === sorted[i]! + run) run += 1;
      const firstHost = await this.refcounts.allocateClusters(run);
      for (let k = 0; k < run; k++) {
        const cluster = sorted[i + k]!;
        this.host.checkGuestRange(cluster * g.clusterSize, g.clusterSize, this.image.header().size);
        const l1Index = Math.floor(cluster / g.l2Entries);
        const { offset: l2Offset, view } = await this.clusters.writableL2(l1Index);
        const index = cluster % g.l2Entries;
        const raw = readL2Entry(view, index, g);
        if (entryOffset(raw.hi, raw.lo) !== 0 || (raw.hi & COMPRESSED_HI) !== 0) {
          throw new Qcow2Error('qcow2.bad-argument', `${this.host.path}: guest cluster ${cluster} is allocated already; only unallocated clusters can be mapped for filling`);
        }
        const host = (firstHost + k) * g.clusterSize;
        writeL2Entry(view, index, g, { hi: (Math.floor(host / TWO32) | COPIED_HI) >>> 0, lo: host >>> 0, zeroBits: 0, allocBits: 0 });
        this.clusters.markDirty(l2Offset);
        this.host.grow(host + g.clusterSize);
        result.push({ guestCluster: cluster, hostOffset: host });
      }
      i += run;
    }
    return result;
  }

  /**
   * Set the L2 entries of these guest clusters to 0 (see Qcow2Image.detachClusters). Returns
   * the host offsets they pointed at, which keep their refcounts: the caller frees them.
   */
  async detach(guestClusterIndexes: number[]): Promise<number[]> {
    const g = this.host.g;
    const released: number[] = [];
    for (const cluster of guestClusterIndexes) {
      if (!Number.isSafeInteger(cluster) || cluster < 0 || cluster * g.clusterSize >= this.image.header().size) {
        throw new Qcow2Error('qcow2.out-of-range', `${this.host.path}: guest cluster ${cluster} is outside the virtual disk`);
      }
      const l1Index = Math.floor(cluster / g.l2Entries);
      const { l2Offset } = this.clusters.l1Entry(this.clusters.active, l1Index);
      if (l2Offset === 0) continue;
      const { view } = await this.clusters.writableL2(l1Index);
      const index = cluster % g.l2Entries;
      const raw = readL2Entry(view, index, g);
      if (raw.hi === 0 && raw.lo === 0 && raw.zeroBits === 0 && raw.allocBits === 0) continue;
      for (const c of this.clustersOwnedBy(raw)) released.push(c * g.clusterSize);
      writeL2Entry(view, index, g, { hi: 0, lo: 0, zeroBits: 0, allocBits: 0 });
      this.clusters.markDirty(l2Offset);
    }
    return released;
  }
}
