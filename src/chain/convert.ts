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
 * The outputs are in convert-sinks.ts, the window reads and writes in window-io.ts.
 * Like qemu-img convert (whose output cache mode defaults to "unsafe"), the output is not
 * fsynced unless `sync` is set; callers that need it durable (the layers code) set it.
 */
import { stat } from 'node:fs/promises';
import type { FileSystemAccess, HostFile } from '../io/host-file.js';
import { nodeFileSystem, syncParentDirectory } from '../io/host-file.js';
import { allocateAligned } from '../io/aligned-buffer.js';
import { ChainError, Qcow2Error } from '../qcow2/errors.js';
import { assertNotBeingWritten, assertNotLocked } from '../io/in-use.js';
import { removeOnInterrupt } from '../io/interrupt.js';
import { RawSink, Qcow2Sink, type Sink } from './convert-sinks.js';
import { closeLayers, openLayers, type MapLayer } from './map-layer.js';
import { MapCursor } from './map-cursor.js';
import { readWindow, settleAll } from './window-io.js';

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

/** Windows being written while the next is read. */
const WRITE_DEPTH = 4;
/** Default window: large enough that per-window work is small, small enough to stay in cache. */
const DEFAULT_WINDOW = 2 * 1024 * 1024;

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
