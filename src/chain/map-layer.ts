/**
 * One image of a backing chain as block status sees it (MapLayer): its L1/L2 tables walked a
 * whole table at a time into extents of data, zeros, unallocated or compressed clusters, and the
 * reads of those extents (compressed clusters inflated on the thread pool). openLayers opens an
 * image and its whole chain, top first, confined by the image's named-file policy. Read-only,
 * except the top layer that commit and rebase open for writing.
 */
import { promisify } from 'node:util';
import { constants as zlibConstants, inflateRaw } from 'node:zlib';
import type { FileSystemAccess, HostFile } from '../io/host-file.js';
import { nodeFileSystem } from '../io/host-file.js';
import { dataRanges } from '../io/sparse.js';
import { decompressCluster } from '../qcow2/compression.js';
import { ChainError, Qcow2Error } from '../qcow2/errors.js';
import {
  CompressionType,
  backingFormatOf,
  externalDataFileOf,
  HEADER_PROBE_BYTES,
  Incompatible,
  parseHeader,
  type Qcow2Header,
} from '../qcow2/header.js';
import { decodeCompressed, entryOffset, geometry, type Geometry, COMPRESSED_HI, COPIED_HI, ZERO_LO } from '../qcow2/layout.js';
import { NamedFilePolicy } from '../qcow2/named-files.js';

/** What one layer says about a guest range, before looking at the layers below. */
export type ExtentKind = 'data' | 'zero' | 'unallocated' | 'compressed';

export interface LayerExtent {
  start: number;
  length: number;
  kind: ExtentKind;
  /** Host offset of `start` in the layer's data file, when there is one (data, preallocated zero). */
  hostOffset: number | null;
}

/** One image of a chain, opened read-only (or for writing by commit/rebase). */
export class MapLayer {
  private l2Cache = new Map<number, Uint8Array>();
  private l1: DataView | null = null;

  private constructor(
    readonly path: string,
    readonly format: 'qcow2' | 'raw',
    readonly file: HostFile,
    readonly size: number,
    readonly header: Qcow2Header | null,
    readonly geometry: Geometry | null,
    /** Where guest data lives: the image itself or its external data file. */
    readonly dataFile: HostFile,
    /** Raw files: the real file length (size is rounded up to whole sectors). */
    private readonly rawLength = size,
  ) {}

  /**
   * Open the layer at `path`: `opened` is its file when the policy already opened it (a backing
   * file); without it `path` is the image the user named. The external data file is opened by
   * `policy` (default: confined to the image's folder tree).
   */
  static async open(
    path: string,
    format: 'qcow2' | 'raw',
    fs: FileSystemAccess,
    writable = false,
    policy?: NamedFilePolicy,
    opened?: HostFile,
  ): Promise<MapLayer> {
    const namedFiles = policy ?? (await NamedFilePolicy.forImage(path, { fs }));
    const file = opened ?? (await namedFiles.openTop(path, writable ? 'write' : 'read')).file;
    try {
      const length = await file.length();
      // QEMU sees a raw file in whole sectors: the last partial sector reads as zeros.
      if (format === 'raw') return new MapLayer(path, format, file, Math.ceil(length / 512) * 512, null, null, file, length);
      const probe = new Uint8Array(Math.min(length, HEADER_PROBE_BYTES));
      await file.read(probe, 0);
      const bits = probe.length >= 24 ? new DataView(probe.buffer).getUint32(20) : 16;
      const first = new Uint8Array(Math.min(length, 2 ** Math.min(Math.max(bits, 9), 21)));
      await file.read(first, 0);
      let header: Qcow2Header;
      try {
        header = parseHeader(first, length);
      } catch (error) {
        if (error instanceof Qcow2Error) {
          const hint = error.code === 'qcow2.bad-magic' ? ' (for a raw file, say so: -f raw / format raw)' : '';
          throw new Qcow2Error(error.code, `${path}: ${error.message}${hint}`, { cause: error });
        }
        throw error;
      }
      const extendedL2 = (header.incompatibleFeatures & Incompatible.extendedL2) !== 0n;
      const g = geometry(header.clusterBits, extendedL2, header.refcountOrder);
      let dataFile = file;
      if (header.incompatibleFeatures & Incompatible.externalDataFile) {
        const name = externalDataFileOf(header);
        if (name === null) throw new Qcow2Error('qcow2.bad-header-extension', `${path}: external data file bit set but no data file name extension`);
        dataFile = (await namedFiles.open(name, path, 'external data file', writable ? 'write' : 'read')).file;
      }
      return new MapLayer(path, format, file, header.size, header, g, dataFile);
    } catch (error) {
      await file.close();
      throw error;
    }
  }

  get clusterSize(): number {
    return this.geometry?.clusterSize ?? 65536;
  }

  get externalData(): boolean {
    return this.header !== null && (this.header.incompatibleFeatures & Incompatible.externalDataFile) !== 0n;
  }

  async close(): Promise<void> {
    if (this.dataFile !== this.file) await this.dataFile.close();
    await this.file.close();
  }

  /** Forget cached tables (after someone rewrote them). */
  invalidate(): void {
    this.l1 = null;
    this.l2Cache.clear();
  }

  private async l1Table(): Promise<DataView> {
    if (!this.l1) {
      const h = this.header!;
      const bytes = new Uint8Array(h.l1Size * 8);
      if (h.l1Size > 0) await this.file.read(bytes, h.l1TableOffset);
      this.l1 = new DataView(bytes.buffer);
    }
    return this.l1;
  }

  /** The L2 table for L1 index `index`, or null when unallocated. */
  async l2Table(index: number): Promise<DataView | null> {
    const l1 = await this.l1Table();
    if (index * 8 >= l1.byteLength) return null;
    const offset = entryOffset(l1.getUint32(index * 8), l1.getUint32(index * 8 + 4));
    if (offset === 0) return null;
    let table = this.l2Cache.get(offset);
    if (!table) {
      const g = this.geometry!;
      if (offset % g.clusterSize !== 0) throw new Qcow2Error('qcow2.corrupt', `${this.path}: L2 table offset 0x${offset.toString(16)} is not cluster aligned`);
      table = new Uint8Array(g.clusterSize);
      await this.file.read(table, offset);
      if (this.l2Cache.size > 4096) this.l2Cache.clear();
      this.l2Cache.set(offset, table);
    }
    return new DataView(table.buffer);
  }

  /**
   * This layer's own view of [start, end): runs of data / zero / unallocated / compressed,
   * merged when adjacent with contiguous host offsets. Past the layer's size: unallocated.
   */
  async extents(start: number, end: number): Promise<LayerExtent[]> {
    const out: LayerExtent[] = [];
    await this.walkExtents(start, end, (s, length, kind, hostOffset) => out.push({ start: s, length, kind, hostOffset }));
    return out;
  }

  /**
   * extents() without the array: `emit` gets each merged extent in order. A fragmented disk has
   * hundreds of thousands; map writes them out as they come (see resolveChain).
   */
  async walkExtents(start: number, end: number, emit: (start: number, length: number, kind: ExtentKind, hostOffset: number | null) => void): Promise<void> {
    const merger = new ExtentMerger(emit);
    const push = (s: number, length: number, kind: ExtentKind, hostOffset: number | null) => merger.push(s, length, kind, hostOffset);
    const flush = () => merger.flush();
    const limit = Math.min(end, this.size);
    if (this.format === 'raw' || !this.header || !this.geometry) {
      const dataEnd = Math.max(start, Math.min(limit, this.rawLength));
      // Holes of the host file read as zeros: qemu-img (file-posix, SEEK_DATA) reports them
      // so, and convert need not read them. Without the native helper: all data.
      const ranges = dataEnd > start ? await dataRanges(this.file, start, dataEnd) : null;
      if (ranges === null) {
        push(start, dataEnd - start, 'data', start);
      } else {
        let pos = start;
        for (const r of ranges) {
          push(pos, r.offset - pos, 'zero', pos);
          push(r.offset, r.length, 'data', r.offset);
          pos = r.offset + r.length;
        }
        push(pos, dataEnd - pos, 'zero', pos);
      }
      push(dataEnd, limit - dataEnd, 'zero', dataEnd);
      if (end > limit) push(Math.max(start, limit), end - Math.max(start, limit), 'unallocated', null);
      flush();
      return;
    }
    const g = this.geometry;
    const version = this.header.version;
    const external = this.externalData;
    let pos = start;
    while (pos < limit) {
      const l1Index = Math.floor(pos / g.l2Coverage);
      const tableEnd = Math.min(limit, (l1Index + 1) * g.l2Coverage);
      const l2 = await this.l2Table(l1Index);
      if (!l2) {
        push(pos, tableEnd - pos, 'unallocated', null);
        pos = tableEnd;
        continue;
      }
      while (pos < tableEnd) {
        const index = Math.floor((pos % g.l2Coverage) / g.clusterSize);
        const clusterStart = l1Index * g.l2Coverage + index * g.clusterSize;
        const clusterEnd = Math.min(tableEnd, clusterStart + g.clusterSize);
        const at = index * g.l2EntrySize;
        const hi = l2.getUint32(at);
        const lo = l2.getUint32(at + 4);
        if (hi === 0 && lo === 0 && !g.extendedL2) {
          // A run of empty entries is one unallocated extent: skip it in one step.
          let j = index + 1;
          const lastIndex = Math.floor((tableEnd - 1 - l1Index * g.l2Coverage) / g.clusterSize);
          while (j <= lastIndex && l2.getUint32(j * 8) === 0 && l2.getUint32(j * 8 + 4) === 0) j += 1;
          const runEnd = Math.min(tableEnd, l1Index * g.l2Coverage + j * g.clusterSize);
          push(pos, runEnd - pos, 'unallocated', null);
          pos = runEnd;
          continue;
        }
        if (hi & COMPRESSED_HI) {
          push(pos, clusterEnd - pos, 'compressed', null);
          pos = clusterEnd;
          continue;
        }
        const offset = entryOffset(hi, lo);
        const hasOffset = offset !== 0 || (external && (hi & COPIED_HI) !== 0);
        if (hasOffset && offset % g.clusterSize !== 0) {
          throw new Qcow2Error('qcow2.corrupt', `${this.path}: L2 entry host offset 0x${offset.toString(16)} is not cluster aligned`);
        }
        if (!g.extendedL2) {
          let kind: ExtentKind;
          if (lo & ZERO_LO && version >= 3) kind = 'zero';
          else kind = hasOffset ? 'data' : 'unallocated';
          push(pos, clusterEnd - pos, kind, hasOffset ? offset + (pos - clusterStart) : null);
          pos = clusterEnd;
          continue;
        }
        const zeroBits = l2.getUint32(at + 8);
        const allocBits = l2.getUint32(at + 12);
        if ((zeroBits & allocBits) !== 0) throw new Qcow2Error('qcow2.corrupt', `${this.path}: extended L2 entry marks a subcluster both allocated and zero`);
        while (pos < clusterEnd) {
          const sub = Math.floor((pos - clusterStart) / g.subclusterSize);
          const subEnd = Math.min(clusterEnd, clusterStart + (sub + 1) * g.subclusterSize);
          const bit = 2 ** sub;
          const kind: ExtentKind = zeroBits & bit ? 'zero' : allocBits & bit ? 'data' : 'unallocated';
          if (kind === 'data' && !hasOffset) throw new Qcow2Error('qcow2.corrupt', `${this.path}: allocated subcluster without a host offset`);
          push(pos, subEnd - pos, kind, hasOffset ? offset + (pos - clusterStart) : null);
          pos = subEnd;
        }
      }
    }
    if (end > limit) push(Math.max(start, limit), end - Math.max(start, limit), 'unallocated', null);
    flush();
  }

  /** Read guest bytes this layer holds itself (data, zero or compressed extents only). */
  async readExtent(extent: LayerExtent, into: Uint8Array): Promise<void> {
    if (extent.kind === 'zero' || extent.kind === 'unallocated') {
      into.fill(0);
      return;
    }
    if (extent.kind === 'data') {
      await this.dataFile.read(into, extent.hostOffset!);
      return;
    }
    // Compressed: collect every cluster's descriptor, read the compressed bytes with as few
    // reads as possible (QEMU packs them back to back), and inflate in parallel on the thread pool.
    const g = this.geometry!;
    const parts: Array<{ done: number; from: number; n: number; hostOffset: number; size: number }> = [];
    let done = 0;
    while (done < into.length) {
      const pos = extent.start + done;
      const clusterStart = pos - (pos % g.clusterSize);
      const l2 = (await this.l2Table(Math.floor(pos / g.l2Coverage)))!;
      const at = Math.floor((pos % g.l2Coverage) / g.clusterSize) * g.l2EntrySize;
      const d = decodeCompressed(l2.getUint32(at), l2.getUint32(at + 4), g.clusterBits);
      const from = pos - clusterStart;
      const n = Math.min(into.length - done, g.clusterSize - from);
      parts.push({ done, from, n, hostOffset: d.hostOffset, size: d.size });
      done += n;
    }
    const jobs: Promise<void>[] = [];
    for (let i = 0; i < parts.length; ) {
      // A run of descriptors whose bytes are close together in the file: one read.
      let j = i + 1;
      let lo = parts[i]!.hostOffset;
      let hi = lo + parts[i]!.size;
      while (j < parts.length) {
        const next = parts[j]!;
        const nlo = Math.min(lo, next.hostOffset);
        const nhi = Math.max(hi, next.hostOffset + next.size);
        if (nhi - nlo > 4 * 1024 * 1024 || next.hostOffset > hi + 65536 || next.hostOffset + next.size < lo) break;
        lo = nlo;
        hi = nhi;
        j += 1;
      }
      const group = parts.slice(i, j);
      const raw = new Uint8Array(hi - lo);
      await this.file.read(raw, lo);
      for (const part of group) {
        const bytes = raw.subarray(part.hostOffset - lo, part.hostOffset - lo + part.size);
        jobs.push(
          inflateCluster(bytes, g.clusterSize, this.header!.compressionType).then((cluster) => {
            into.set(cluster.subarray(part.from, part.from + part.n), part.done);
          }),
        );
      }
      i = j;
    }
    await Promise.all(jobs);
  }
}

/**
 * The extent being grown by walkExtents: merged while the next one continues it (same kind,
 * contiguous host offsets; compressed clusters are never merged). Kept in an object's fields, not
 * in closure variables: V8 updates a field holding a large number in place, while each store to a
 * closure variable allocates a new heap number (garbage for every cluster of a big disk).
 */
class ExtentMerger {
  private pending = false;
  private start = 0;
  private length = 0;
  private kind: ExtentKind = 'data';
  /** -1 for none: a field that is always a number is updated in place. */
  private hostOffset = -1;

  constructor(private readonly emit: (start: number, length: number, kind: ExtentKind, hostOffset: number | null) => void) {}

  push(start: number, length: number, kind: ExtentKind, hostOffset: number | null): void {
    if (length <= 0) return;
    if (
      this.pending &&
      this.kind === kind &&
      this.start + this.length === start &&
      kind !== 'compressed' &&
      (this.hostOffset === -1) === (hostOffset === null) &&
      (hostOffset === null || this.hostOffset + this.length === hostOffset)
    ) {
      this.length += length;
      return;
    }
    if (this.pending) this.emit(this.start, this.length, this.kind, this.hostOffset === -1 ? null : this.hostOffset);
    this.pending = true;
    this.start = start;
    this.length = length;
    this.kind = kind;
    this.hostOffset = hostOffset ?? -1;
  }

  flush(): void {
    if (this.pending) this.emit(this.start, this.length, this.kind, this.hostOffset === -1 ? null : this.hostOffset);
    this.pending = false;
  }
}

const inflateRawAsync = promisify(inflateRaw);

/**
 * Decompress one cluster. Deflate runs on the thread pool (so a window's clusters inflate in
 * parallel), with the same stream rules as the engine's decompressCluster: sync flush (QEMU's
 * stream may lack the final marker), sector padding ignored, exactly one cluster out. zstd has
 * no native binding here and uses the engine's decoder.
 */
async function inflateCluster(compressed: Uint8Array, clusterSize: number, type: number): Promise<Uint8Array> {
  if (type !== CompressionType.deflate) return decompressCluster(compressed, clusterSize, type);
  let out: Buffer;
  try {
    out = await inflateRawAsync(compressed, { windowBits: 12, finishFlush: zlibConstants.Z_SYNC_FLUSH, maxOutputLength: clusterSize });
  } catch (cause) {
    throw new Qcow2Error('qcow2.decompress-failed', `deflate-compressed cluster does not decompress: ${(cause as Error).message}`, { cause });
  }
  if (out.length !== clusterSize) {
    throw new Qcow2Error('qcow2.decompress-failed', `deflate-compressed cluster decompressed to ${out.length} bytes, expected ${clusterSize}`);
  }
  return out;
}

export interface OpenLayersOptions {
  fs?: FileSystemAccess;
  /** Format of the top image (default qcow2). */
  format?: 'qcow2' | 'raw';
  /** Folders (besides the top image's folder tree) that backing and data files may be in. */
  allowedDirectories?: readonly string[];
  maxDepth?: number;
  /** Open the top layer for writing. */
  writableTop?: boolean;
}

/** Open `path` and its whole backing chain, top first. Backing formats must be explicit. */
export async function openLayers(path: string, options: OpenLayersOptions = {}): Promise<MapLayer[]> {
  const fs = options.fs ?? nodeFileSystem;
  const maxDepth = options.maxDepth ?? 16;
  const policy = await NamedFilePolicy.forImage(path, { allowedDirectories: options.allowedDirectories, fs });
  const layers: MapLayer[] = [];
  const seen = new Set<string>();
  let pending: HostFile | undefined;
  try {
    const writableTop = options.writableTop === true;
    const top = await policy.openTop(path, writableTop ? 'write' : 'read');
    pending = top.file;
    let current = path;
    let real = top.realPath;
    let format: 'qcow2' | 'raw' = options.format ?? 'qcow2';
    for (;;) {
      if (seen.has(real)) throw new ChainError('chain.loop', `backing chain of ${path} loops back to ${real}`);
      seen.add(real);
      if (layers.length >= maxDepth) throw new ChainError('chain.too-deep', `backing chain of ${path} is deeper than ${maxDepth}`);
      const opened = pending;
      pending = undefined;
      const layer = await MapLayer.open(current, format, fs, layers.length === 0 && writableTop, policy, opened);
      layers.push(layer);
      const backing = layer.header?.backingFile ?? null;
      if (backing === null) break;
      const backingFormat = backingFormatOf(layer.header!);
      if (backingFormat === null) throw new ChainError('chain.missing-backing-format', `${current} names backing file "${backing}" without a backing format; formats are never probed`);
      if (backingFormat !== 'qcow2' && backingFormat !== 'raw') throw new ChainError('chain.unsupported-format', `${current}: backing format "${backingFormat}" is not supported (qcow2 or raw)`);
      const next = await policy.open(backing, current, 'backing file', 'read');
      pending = next.file;
      // Names below resolve from the real path, as this reader always did (rebase and convert
      // compare layers by it); the policy confines each one the same way.
      current = next.realPath;
      real = next.realPath;
      format = backingFormat;
    }
    return layers;
  } catch (error) {
    await pending?.close().catch(() => undefined);
    await closeLayers(layers);
    throw error;
  }
}

export async function closeLayers(layers: MapLayer[]): Promise<void> {
  for (const layer of layers) await layer.close();
}
