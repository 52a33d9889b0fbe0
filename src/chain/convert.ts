/**
 * `convert`: copy the virtual disk of an image (a whole backing chain, flattened) into a new
 * raw or qcow2 file.
 *
 * Speed comes from three choices:
 * - the source is read by block status (map.ts): zero and unallocated ranges are never read,
 *   data ranges are read with large coalesced reads straight from the layer that holds them.
 *   The holes of a raw source (or raw backing file) are zero ranges too, found with
 *   lseek(SEEK_DATA/SEEK_HOLE) through the optional native helper (io/sparse.ts); without it
 *   a raw file is all data and its holes are read and zero-checked;
 * - a qcow2 output is written sequentially, not through a general image writer: header in
 *   cluster 0, then the non-zero data clusters back to back as they stream in, then the L2
 *   tables, the L1 table and the refcount structures laid out once at the end. Every cluster
 *   up to the end is used exactly once (refcount 1), except compressed clusters, which share
 *   host clusters and are counted per overlap;
 * - plain files are read with synchronous pread on the main thread (no thread-pool round trip
 *   per piece) into page-aligned 2 MiB windows (io/aligned-buffer.ts), while earlier windows are
 *   written by pwrite on libuv's thread pool, so reading and writing overlap on two cores; zero
 *   ranges are not even cleared in memory unless they share a cluster with data. Files
 *   without a descriptor (test wrappers, fault injection) go through the HostFile.
 * Like qemu-img convert (whose output cache mode defaults to "unsafe"), the output is not
 * fsynced unless `sync` is set; callers that need it durable (the layers code) set it.
 */
import { constants as zlibConstants, deflateRaw } from 'node:zlib';
import { promisify } from 'node:util';
import { write } from 'node:fs';
import { stat } from 'node:fs/promises';
import type { FileSystemAccess, HostFile } from '../io/host-file.js';
import { nodeFileSystem, preadFully, syncParentDirectory, withPath } from '../io/host-file.js';
import { allocateAligned } from '../io/aligned-buffer.js';
import { ChainError, Qcow2Error } from '../qcow2/errors.js';
import { assertNotBeingWritten, assertNotLocked } from '../io/in-use.js';
import { removeOnInterrupt } from '../io/interrupt.js';
import {
  ExtensionType,
  HEADER_V3_LENGTH,
  serializeHeader,
  standardFeatureNameTable,
  type Qcow2Header,
} from '../qcow2/header.js';
import { COPIED_HI, encodeCompressed, encodeEntry, geometry, setRefcount } from '../qcow2/layout.js';
import { closeLayers, openLayers, type MapLayer, type MapEntry } from './map.js';
import { MapCursor } from './map-cursor.js';

const deflateRawAsync = promisify(deflateRaw);

export interface ConvertOptions {
  fs?: FileSystemAccess;
  /** Source format (of the top image); default qcow2. */
  sourceFormat?: 'qcow2' | 'raw';
  /** Output format; default qcow2. */
  outputFormat?: 'qcow2' | 'raw';
  /** Output cluster size for qcow2 (default 64 KiB). */
  clusterSize?: number;
  /** Compress data clusters (deflate), like qemu-img convert -c. */
  compress?: boolean;
  /** Backing files must resolve inside these folders (when given). */
  allowedDirectories?: string[];
  /** Called with (bytes done, total bytes) as the copy progresses. */
  progress?: (done: number, total: number) => void;
  /** fsync the output (and its folder) before returning. */
  sync?: boolean;
  /**
   * Copy images a running QEMU writes anyway (qemu-img's -U, --force-share). Without it such a
   * source is refused: the copy could mix bytes from before and after the guest's writes.
   */
  forceShare?: boolean;
  /** Bytes processed per window (default 2 MiB: measured best of 1, 2 and 4 MiB on a half-holes 1 GiB input). */
  windowSize?: number;
  /**
   * qemu-img's -S: zero runs of this many bytes (a multiple of 512) are left out of the output,
   * as holes in a raw file and as unallocated clusters in a qcow2 one (a qcow2 cluster is left
   * out only when all of it is zero). Default 4 KiB, qemu-img's default; 0 writes everything,
   * zeros included, so the output is fully allocated.
   */
  sparseSize?: number;
}

/** qemu-img's default -S (4 KiB) and its upper bound (16 MiB). */
export const DEFAULT_SPARSE_SIZE = 4096;
export const MAX_SPARSE_SIZE = 16 * 1024 * 1024;

/** Refuse a -S value qemu-img refuses, before anything is opened or written. */
export function assertSparseSize(sparseSize: number): void {
  if (!Number.isSafeInteger(sparseSize) || sparseSize < 0 || sparseSize % 512 !== 0 || sparseSize > MAX_SPARSE_SIZE) {
    throw new Qcow2Error(
      'qcow2.bad-argument',
      `invalid sparse size ${sparseSize} (-S): valid sizes are multiples of 512 up to ${MAX_SPARSE_SIZE}; 0 disables sparse detection (fully allocates the output)`,
    );
  }
}

export interface ConvertResult {
  virtualSize: number;
  /** Guest bytes that held data and were written. */
  dataBytes: number;
  outputLength: number;
}

/** A consumer of the flattened disk, window by window. */
interface Sink {
  /**
   * `data` holds [offset, offset + data.length); `mayHaveData[i]` is false when unit i (a
   * cluster, or 64 KiB for raw output) is known to read as zeros without looking at it.
   */
  window(offset: number, data: Uint8Array, mayHaveData: boolean[]): Promise<void>;
  finish(): Promise<number>;
}

/**
 * Fill `into` with the virtual disk at [offset, offset + into.length) from the chain entries.
 * Zero ranges are only cleared inside units (of `unit` bytes) that `mayHaveData` marks: the
 * sinks skip the other units without looking at them.
 */
export async function readWindow(
  layers: MapLayer[],
  entries: MapEntry[],
  offset: number,
  into: Uint8Array,
  unit: number,
  mayHaveData: boolean[],
): Promise<void> {
  const reads: Promise<void>[] = [];
  for (const e of entries) {
    const target = into.subarray(e.start - offset, e.start - offset + e.length);
    if (!e.data) {
      const from = e.start - offset;
      const to = from + e.length;
      for (let u = Math.floor(from / unit); u * unit < to; u += 1) {
        if (mayHaveData[u]) into.fill(0, Math.max(from, u * unit), Math.min(to, (u + 1) * unit));
      }
      continue;
    }
    const layer = layers[e.depth]!;
    if (e.offset !== undefined) {
      if (readDirect(layer.dataFile, target, e.offset)) continue;
      // Pieces in parallel: the thread pool reads several at once (one big pread is serial).
      for (let at = 0; at < e.length; at += IO_PIECE) {
        reads.push(layer.dataFile.read(target.subarray(at, Math.min(e.length, at + IO_PIECE)), e.offset + at).then(() => undefined));
      }
    } else {
      reads.push(layer.readExtent({ start: e.start, length: e.length, kind: 'compressed', hostOffset: null }, target));
    }
  }
  await settleAll(reads);
}

const ZERO_CHUNK = Buffer.alloc(2 * 1024 * 1024);
/** Windows being written while the next is read. */
const WRITE_DEPTH = 4;
/** Size of the parallel pieces big reads and writes are split into. */
const IO_PIECE = 1024 * 1024;
/** Default window: large enough that per-window work is small, small enough to stay in cache. */
const DEFAULT_WINDOW = 2 * 1024 * 1024;

/**
 * Files with a descriptor are read with synchronous pread and written with callback pwrite on
 * it (a FileHandle promise per piece cost more than a page-cache copy). The event loop still
 * turns once per window. Files without an fd (test wrappers, fault injection) and positions
 * past 2^53 go through the HostFile.
 */
function directFd(file: HostFile, position: number, length: number): number | undefined {
  const fd = file.fd;
  if (fd === undefined || fd < 0 || position + length > Number.MAX_SAFE_INTEGER) return undefined;
  return fd;
}

/** Read all of `into` at `position` (zeros past end of file); false when not possible directly. */
function readDirect(file: HostFile, into: Uint8Array, position: number): boolean {
  const fd = directFd(file, position, into.length);
  if (fd === undefined) return false;
  let done: number;
  try {
    done = preadFully(fd, into, position);
  } catch (error) {
    throw withPath(error, file.path);
  }
  if (done < into.length) into.fill(0, done);
  return true;
}

/**
 * Write `data` at `position`. With a descriptor it is one pwrite on libuv's thread pool through
 * the callback API (no FileHandle promise per call): the kernel copies this window on a pool
 * thread while the main thread reads the next one, which is how qemu-img overlaps them too
 * (measured: the zeros-written convert went from 250 to 183 ms median against synchronous
 * writes). Without one, parallel pieces through the HostFile.
 */
function writeAt(out: HostFile, data: Uint8Array, position: number): Promise<void> {
  const fd = directFd(out, position, data.length);
  if (fd !== undefined) return new Promise<void>((resolve, reject) => writeAll(fd, data, position, resolve, (error) => reject(withPath(error, out.path))));
  const pieces: Promise<void>[] = [];
  for (let at = 0; at < data.length; at += IO_PIECE) {
    pieces.push(out.write(data.subarray(at, Math.min(data.length, at + IO_PIECE)), position + at));
  }
  return settleAll(pieces);
}

/**
 * Wait for every operation, then fail with the first error. Writes on a raw descriptor are not
 * tracked by a FileHandle, so none may still be running when the file is closed (its number
 * could be reused by the next open).
 */
async function settleAll(operations: Promise<void>[]): Promise<void> {
  const failed = (await Promise.allSettled(operations)).find((result) => result.status === 'rejected');
  if (failed) throw failed.reason;
}

function writeAll(fd: number, data: Uint8Array, position: number, resolve: () => void, reject: (error: Error) => void): void {
  write(fd, data, 0, data.length, position, (error, written) => {
    if (error) reject(error);
    else if (written < data.length) writeAll(fd, data.subarray(written), position + written, resolve, reject);
    else resolve();
  });
}

/** True when every byte is zero (memcmp against a zero page, in native code). */
export function isAllZero(bytes: Uint8Array): boolean {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let at = 0; at < buf.length; at += ZERO_CHUNK.length) {
    const n = Math.min(ZERO_CHUNK.length, buf.length - at);
    if (buf.compare(ZERO_CHUNK, 0, n, at, at + n) !== 0) return false;
  }
  return true;
}

class RawSink implements Sink {
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
class Qcow2Sink implements Sink {
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

/**
 * The output is opened with truncation, so it must not be a file the conversion reads (the
 * source, a backing file, an external data file: the same inode under any name), and not an
 * image some process holds QEMU's locks on. qemu-img refuses both through its own locks.
 */
async function assertSafeOutput(output: string, layers: MapLayer[]): Promise<void> {
  const target = await stat(output).catch(() => undefined);
  if (target === undefined) return;
  for (const [depth, layer] of layers.entries()) {
    for (const path of new Set([layer.path, layer.dataFile.path])) {
      const input = await stat(path).catch(() => undefined);
      if (input === undefined || input.dev !== target.dev || input.ino !== target.ino) continue;
      const role = depth === 0 && path === layer.path ? 'the source image' : `${path}, which the source's chain reads`;
      throw new ChainError('chain.output-is-input', `output ${output} is ${role}: converting would overwrite it while reading it`);
    }
  }
  await assertNotLocked(output);
}

/** Convert `source` (and its backing chain) into a new file at `output`. */
export async function convertImage(source: string, output: string, options: ConvertOptions = {}): Promise<ConvertResult> {
  const fs = options.fs ?? nodeFileSystem;
  const outputFormat = options.outputFormat ?? 'qcow2';
  const clusterSize = options.clusterSize ?? 65536;
  if (!Number.isInteger(Math.log2(clusterSize)) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024) {
    throw new Qcow2Error('qcow2.bad-argument', `cluster size ${clusterSize} must be a power of two between 512 and 2 MiB`);
  }
  if (options.compress && outputFormat !== 'qcow2') throw new Qcow2Error('qcow2.bad-argument', 'compression (-c) needs a qcow2 output');
  const sparseSize = options.sparseSize ?? DEFAULT_SPARSE_SIZE;
  assertSparseSize(sparseSize);
  // -S 0: every window is visited and every unit counts as data, so zeros are cleared in memory and written.
  const fullyAllocate = sparseSize === 0;
  const layers = await openLayers(source, { fs, format: options.sourceFormat ?? 'qcow2', allowedDirectories: options.allowedDirectories });
  let out: HostFile | null = null;
  let completed = false;
  let forgetOutput = (): void => {};
  try {
    if (!options.forceShare) {
      for (const layer of layers) for (const path of new Set([layer.path, layer.dataFile.path])) await assertNotBeingWritten(path);
    }
    await assertSafeOutput(output, layers);
    const size = layers[0]!.size;
    out = await fs.open(output, 'create');
    forgetOutput = removeOnInterrupt(output);
    // QEMU sees a qcow2 disk in whole 512-byte sectors: round up, as qemu-img convert does.
    // Size the output first: writes inside the file are cheaper than extending it each time.
    if (outputFormat === 'raw') await out.truncate(size);
    const sink: Sink =
      outputFormat === 'raw'
        ? new RawSink(out, size, sparseSize)
        : new Qcow2Sink(out, Math.ceil(size / 512) * 512, clusterSize, options.compress === true, fullyAllocate);
    const unit = outputFormat === 'qcow2' ? clusterSize : 65536;
    const windowSize = Math.max(unit, Math.floor((options.windowSize ?? DEFAULT_WINDOW) / unit) * unit);
    let dataBytes = 0;
    // The k-th window that holds data uses ring slot k % R. While window k is handed to the
    // sink, window k + 1 is already being read (read-ahead) and up to WRITE_DEPTH earlier windows
    // may still be written; before slot k + 1 is refilled, the write of window k + 1 - R must be
    // done. Windows without data are never visited: the cursor skips them in whole spans.
    const R = WRITE_DEPTH + 2;
    // One page-aligned block for all slots (see io/aligned-buffer.ts: unaligned reads cost 2x).
    const ringMemory = allocateAligned(R * windowSize);
    const ring = Array.from({ length: R }, (_, slot) => ringMemory.subarray(slot * windowSize, (slot + 1) * windowSize));
    const cursor = new MapCursor(layers, 0, size, windowSize);
    const pending: Array<{ sequence: number; write: Promise<void> }> = [];
    let readBytes = 0;
    type Prepared = { offset: number; buffer: Uint8Array; mayHaveData: boolean[] };
    /** Read the first window at or after `from` that holds data into `slot`; null at the end. */
    const prepare = async (from: number, slot: number): Promise<Prepared | null> => {
      const dataAt = fullyAllocate ? from : await cursor.nextData(from);
      if (dataAt >= size) return null;
      const offset = Math.floor(dataAt / windowSize) * windowSize;
      const length = Math.min(windowSize, size - offset);
      const entries = await cursor.window(offset, offset + length);
      const units = Math.ceil(length / unit);
      const mayHaveData = new Array<boolean>(units).fill(fullyAllocate);
      for (const e of entries) {
        if (!e.data) continue;
        for (let u = Math.floor((e.start - offset) / unit); u * unit < e.start - offset + e.length; u += 1) mayHaveData[u] = true;
      }
      const buffer = ring[slot]!.subarray(0, units * unit);
      buffer.fill(0, length);
      await readWindow(layers, entries, offset, buffer.subarray(0, length), unit, mayHaveData);
      for (const e of entries) if (e.data) readBytes += e.length;
      return { offset, buffer, mayHaveData };
    };
    let next: Promise<Prepared | null> | null = prepare(0, 0);
    // Marked handled: if the loop fails first, a read-ahead rejection must not go unhandled.
    next.catch(() => undefined);
    try {
      for (let sequence = 0; ; sequence += 1) {
        const current: Prepared | null = await next!;
        next = null;
        if (!current) break;
        // Reads are synchronous: let the event loop turn once per window.
        await new Promise<void>((resolve) => setImmediate(resolve));
        while (pending.length > 0 && pending[0]!.sequence <= sequence + 1 - R) await pending.shift()!.write;
        const done: number = current.offset + current.buffer.length;
        next = done < size ? prepare(done, (sequence + 1) % R) : Promise.resolve(null);
        next.catch(() => undefined);
        const write = sink.window(current.offset, current.buffer, current.mayHaveData).then(() => options.progress?.(Math.min(done, size), size));
        write.catch(() => undefined);
        pending.push({ sequence, write });
      }
    } catch (error) {
      // Let the writes already running finish before the output is closed.
      await Promise.allSettled([...pending.map((p) => p.write), next]);
      throw error;
    }
    await settleAll(pending.map((p) => p.write));
    dataBytes += readBytes;
    const outputLength = await sink.finish();
    if (options.sync) {
      await out.sync();
      await syncParentDirectory(fs, output);
    }
    options.progress?.(size, size);
    completed = true;
    return { virtualSize: size, dataBytes, outputLength };
  } finally {
    if (out) await out.close();
    // A half-written output is not an image (its header comes last): do not leave it behind.
    if (out && !completed) await fs.remove(output).catch(() => undefined);
    forgetOutput();
    await closeLayers(layers);
  }
}
