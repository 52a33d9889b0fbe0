/**
 * The two outputs of convert, fed the flattened disk window by window: RawSink writes runs of
 * non-zero blocks into a sparse raw file; Qcow2Sink writes a fresh qcow2 sequentially (header in
 * cluster 0, the non-zero data clusters back to back as they stream in, then the L2 tables, the L1
 * table and the refcount structures laid out once at the end). Every cluster up to the end is used
 * exactly once (refcount 1), except compressed clusters, which share host clusters and are counted
 * per overlap.
 */
import { constants as zlibConstants, deflateRaw } from 'node:zlib';
import { promisify } from 'node:util';
import type { HostFile } from '../io/host-file.js';
import {
  ExtensionType,
  HEADER_V3_LENGTH,
  serializeHeader,
  standardFeatureNameTable,
  type Qcow2Header,
} from '../qcow2/header.js';
import { COPIED_HI, encodeCompressed, encodeEntry, geometry, setRefcount } from '../qcow2/layout.js';
import { isAllZero, settleAll, writeAt } from './window-io.js';

const deflateRawAsync = promisify(deflateRaw);

/** A consumer of the flattened disk, window by window. */
export interface Sink {
  /**
   * `data` holds [offset, offset + data.length); `mayHaveData[i]` is false when unit i (a
   * cluster, or 64 KiB for raw output) is known to read as zeros without looking at it.
   */
  window(offset: number, data: Uint8Array, mayHaveData: boolean[]): Promise<void>;
  finish(): Promise<number>;
}

export class RawSink implements Sink {
  constructor(
    private readonly out: HostFile,
    private readonly size: number,
    /** Zero blocks of this size become holes; 0 writes every byte (see ConvertOptions.sparseSize). */
    private readonly sparseSize: number,
  ) {}

  async window(offset: number, data: Uint8Array, mayHaveData: boolean[]): Promise<void> {
    if (this.sparseSize === 0) {
      await writeAt(this.out, data.subarray(0, Math.min(data.length, this.size - offset)), offset);
      return;
    }
    // Write runs of non-zero blocks of sparseSize (aligned to the window, which starts on a
    // multiple of 64 KiB); zero blocks stay holes in the fresh file. Units the map marked as
    // zero are never looked at: their bytes in the buffer are stale.
    const chunk = data.length / mayHaveData.length;
    const end = data.length;
    let runStart = -1;
    const writes: Promise<void>[] = [];
    for (let blockStart = 0; blockStart < end; blockStart += this.sparseSize) {
      const blockEnd = Math.min(end, blockStart + this.sparseSize);
      const firstUnit = Math.floor(blockStart / chunk);
      const lastUnit = Math.floor((blockEnd - 1) / chunk);
      let nonZero = false;
      for (let u = firstUnit; u <= lastUnit && !nonZero; u += 1) {
        if (mayHaveData[u]) nonZero = !isAllZero(data.subarray(Math.max(blockStart, u * chunk), Math.min(blockEnd, (u + 1) * chunk)));
      }
      if (nonZero) {
        // A block larger than a unit may take in units known to be zero: clear their stale bytes.
        for (let u = firstUnit; u <= lastUnit; u += 1) if (!mayHaveData[u]) data.fill(0, Math.max(blockStart, u * chunk), Math.min(blockEnd, (u + 1) * chunk));
        if (runStart < 0) runStart = blockStart;
      } else if (runStart >= 0) {
        writes.push(writeAt(this.out, data.subarray(runStart, blockStart), offset + runStart));
        runStart = -1;
      }
    }
    if (runStart >= 0) writes.push(writeAt(this.out, data.subarray(runStart, end), offset + runStart));
    await settleAll(writes);
  }

  async finish(): Promise<number> {
    await this.out.truncate(this.size);
    return this.size;
  }
}

/** Sequential qcow2 writer for a fresh file (see the module comment). */
export class Qcow2Sink implements Sink {
  private readonly clusterSize: number;
  private readonly clusterBits: number;
  private readonly l2Entries: number;
  private readonly l1Size: number;
  /** L2 tables being built, by L1 index. */
  private readonly l2Tables = new Map<number, Uint8Array>();
  /** Next free byte in the file (data area). */
  private next: number;
  /** Extra references for host clusters shared by compressed clusters: cluster -> count. */
  private readonly compressedRefs = new Map<number, number>();
  private compressTail: Promise<void> = Promise.resolve();
  dataBytes = 0;

  constructor(
    private readonly out: HostFile,
    private readonly size: number,
    clusterSize: number,
    private readonly compress: boolean,
    /** -S 0: every cluster is written, zeros included (a fully allocated image). */
    private readonly keepZeros: boolean,
  ) {
    this.clusterSize = clusterSize;
    this.clusterBits = Math.log2(clusterSize);
    this.l2Entries = clusterSize / 8;
    this.l1Size = Math.max(1, Math.ceil(size / (this.l2Entries * clusterSize)));
    this.next = clusterSize;
  }

  private setL2(guestCluster: number, hi: number, lo: number): void {
    const l1Index = Math.floor(guestCluster / this.l2Entries);
    let table = this.l2Tables.get(l1Index);
    if (!table) {
      table = new Uint8Array(this.clusterSize);
      this.l2Tables.set(l1Index, table);
    }
    const view = new DataView(table.buffer);
    const at = (guestCluster % this.l2Entries) * 8;
    view.setUint32(at, hi >>> 0);
    view.setUint32(at + 4, lo >>> 0);
  }

  private setNormal(guestCluster: number, hostOffset: number): void {
    const tmp = new DataView(new ArrayBuffer(8));
    encodeEntry(tmp, 0, hostOffset, COPIED_HI, 0);
    this.setL2(guestCluster, tmp.getUint32(0), tmp.getUint32(4));
  }

  private alignNext(): void {
    this.next = Math.ceil(this.next / this.clusterSize) * this.clusterSize;
  }

  async window(offset: number, data: Uint8Array, mayHaveData: boolean[]): Promise<void> {
    const cs = this.clusterSize;
    const firstCluster = offset / cs;
    if (this.compress) {
      // Compression is asynchronous: windows must claim file space in order, one at a time.
      const run = this.compressTail.then(() => this.compressedWindow(firstCluster, data, mayHaveData));
      this.compressTail = run.catch(() => undefined);
      await run;
      return;
    }
    // Keep non-zero clusters; write them back to back in as few writes as possible.
    const keep: number[] = [];
    for (let i = 0; i < mayHaveData.length; i += 1) {
      if (this.keepZeros || (mayHaveData[i] && !isAllZero(data.subarray(i * cs, (i + 1) * cs)))) keep.push(i);
    }
    if (keep.length === 0) return;
    this.alignNext();
    const start = this.next;
    const writes: Promise<void>[] = [];
    let runFrom = 0;
    for (let k = 0; k < keep.length; k += 1) {
      this.setNormal(firstCluster + keep[k]!, start + k * cs);
      const endsRun = k + 1 === keep.length || keep[k + 1] !== keep[k]! + 1;
      if (endsRun) {
        // keep[runFrom..k] are adjacent in the source window and land adjacent in the file.
        const src = data.subarray(keep[runFrom]! * cs, (keep[k]! + 1) * cs);
        writes.push(writeAt(this.out, src, start + runFrom * cs));
        runFrom = k + 1;
      }
    }
    this.next = start + keep.length * cs;
    this.dataBytes += keep.length * cs;
    await settleAll(writes);
  }

  private async compressedWindow(firstCluster: number, data: Uint8Array, mayHaveData: boolean[]): Promise<void> {
    const cs = this.clusterSize;
    const jobs: Array<Promise<{ index: number; bytes: Uint8Array }>> = [];
    for (let i = 0; i < mayHaveData.length; i += 1) {
      const cluster = data.subarray(i * cs, (i + 1) * cs);
      if (!this.keepZeros && (!mayHaveData[i] || isAllZero(cluster))) continue;
      // Window bits 12, raw deflate: what qcow2 readers (QEMU included) expect.
      jobs.push(deflateRawAsync(cluster, { windowBits: 12, level: zlibConstants.Z_DEFAULT_COMPRESSION }).then((bytes) => ({ index: i, bytes })));
    }
    const results = await Promise.all(jobs);
    const parts: Uint8Array[] = [];
    const partsStart = this.next;
    for (const { index, bytes } of results) {
      const guestCluster = firstCluster + index;
      this.dataBytes += cs;
      if (bytes.length >= cs - 512) {
        // Does not compress: store it as a normal, aligned cluster.
        const pad = Math.ceil(this.next / cs) * cs - this.next;
        if (pad > 0) parts.push(new Uint8Array(pad));
        this.next += pad;
        this.setNormal(guestCluster, this.next);
        parts.push(data.subarray(index * cs, (index + 1) * cs));
        this.next += cs;
        continue;
      }
      const { hi, lo } = encodeCompressed(this.next, bytes.length, this.clusterBits);
      this.setL2(guestCluster, hi, lo);
      const first = Math.floor(this.next / cs);
      const last = Math.floor((this.next + bytes.length - 1) / cs);
      for (let c = first; c <= last; c += 1) this.compressedRefs.set(c, (this.compressedRefs.get(c) ?? 0) + 1);
      parts.push(bytes);
      this.next += bytes.length;
    }
    if (parts.length > 0) await this.out.write(Buffer.concat(parts), partsStart);
  }

  async finish(): Promise<number> {
    const cs = this.clusterSize;
    const g = geometry(this.clusterBits, false, 4);
    // A compressed cluster's descriptor covers whole 512-byte sectors: make them exist.
    this.next = Math.ceil(this.next / 512) * 512;
    this.alignNext();
    const dataEnd = this.next / cs;
    const l2Indexes = [...this.l2Tables.keys()].sort((a, b) => a - b);
    const l2Start = dataEnd;
    const l1Start = l2Start + l2Indexes.length;
    const l1Clusters = Math.ceil((this.l1Size * 8) / cs);
    const rbStart = l1Start + l1Clusters;
    // Refcount blocks and table follow; their own clusters need refcounts too.
    let blocks = 0;
    let tableClusters = 0;
    for (;;) {
      const total = rbStart + blocks + tableClusters;
      const needBlocks = Math.ceil(total / g.refcountBlockEntries);
      const needTable = Math.ceil((needBlocks * 8) / cs);
      if (needBlocks === blocks && needTable === tableClusters) break;
      blocks = needBlocks;
      tableClusters = needTable;
    }
    const total = rbStart + blocks + tableClusters;
    const rtStart = rbStart + blocks;

    const l2Area = new Uint8Array(l2Indexes.length * cs);
    const l1 = new Uint8Array(l1Clusters * cs);
    const l1View = new DataView(l1.buffer);
    l2Indexes.forEach((index, k) => {
      l2Area.set(this.l2Tables.get(index)!, k * cs);
      encodeEntry(l1View, index * 8, (l2Start + k) * cs, COPIED_HI, 0);
    });

    // Refcounts: 1 for every cluster, except data-area clusters that only hold compressed
    // clusters (their count is the number of compressed clusters overlapping them).
    const rb = new Uint8Array(blocks * cs);
    const rbView = new DataView(rb.buffer);
    for (let c = 0; c < total; c += 1) {
      let count = 1;
      if (this.compress && c >= 1 && c < dataEnd) count = this.compressedRefs.get(c) ?? 1;
      setRefcount(rb, rbView, c, 4, count);
    }
    // Normal clusters in a compressed image: compressedRefs has no entry, count stays 1.
    // Padding-only clusters cannot occur: padding precedes a normal cluster in the same run.
    const rt = new Uint8Array(tableClusters * cs);
    const rtView = new DataView(rt.buffer);
    for (let b = 0; b < blocks; b += 1) encodeEntry(rtView, b * 8, (rbStart + b) * cs, 0, 0);

    const header: Qcow2Header = {
      version: 3,
      backingFileOffset: 0,
      backingFileSize: 0,
      clusterBits: this.clusterBits,
      size: this.size,
      cryptMethod: 0,
      l1Size: this.l1Size,
      l1TableOffset: l1Start * cs,
      refcountTableOffset: rtStart * cs,
      refcountTableClusters: tableClusters,
      nbSnapshots: 0,
      snapshotsOffset: 0,
      incompatibleFeatures: 0n,
      compatibleFeatures: 0n,
      autoclearFeatures: 0n,
      refcountOrder: 4,
      headerLength: HEADER_V3_LENGTH,
      compressionType: 0,
      extensions: [{ type: ExtensionType.featureNameTable, data: standardFeatureNameTable() }],
      backingFile: null,
    };
    const metadata = new Uint8Array((total - l2Start) * cs);
    metadata.set(l2Area, 0);
    metadata.set(l1, (l1Start - l2Start) * cs);
    metadata.set(rb, (rbStart - l2Start) * cs);
    metadata.set(rt, (rtStart - l2Start) * cs);
    await this.out.write(metadata, l2Start * cs);
    // The header last: until it is written the file is not a valid image.
    await this.out.write(serializeHeader(header).bytes, 0);
    return total * cs;
  }
}
