/**
 * `rebase`: point an image at a different backing file.
 *
 * Safe mode (the default, like qemu-img rebase): the guest-visible content must not change, so
 * every range the image does not hold itself is read through the old backing chain and through
 * the new one, and wherever they differ the old bytes are written into the image first. Only
 * then is the header switched. Unsafe mode (-u) only rewrites the backing name and format, for
 * when the caller knows the new backing file has the same content (e.g. it was moved).
 */
import type { ByteSource } from '../io/byte-source.js';
import type { FileSystemAccess } from '../io/host-file.js';
import { nodeFileSystem } from '../io/host-file.js';
import { Qcow2Error } from '../qcow2/errors.js';
import { Qcow2Image } from '../qcow2/image.js';
import { openChain, type Chain } from './chain.js';
import { resolveReferencedPath } from '../qcow2/referenced-names.js';
import { NamedFilePolicy } from '../qcow2/named-files.js';
import { chainStatus, type MapEntry } from './map.js';
import { closeLayers, openLayers, type MapLayer } from './map-layer.js';

export interface RebaseOptions {
  fs?: FileSystemAccess;
  /** New backing file name as it should be stored (relative to the image's folder), or null for none. */
  backing: string | null;
  /** Format of the new backing file (required with a backing file: formats are never probed). */
  backingFormat?: 'qcow2' | 'raw';
  /** Only rewrite the header (-u). */
  unsafe?: boolean;
  /** Folders (besides the image's folder tree) that backing and data files may be in. */
  allowedDirectories?: readonly string[];
  progress?: (done: number, total: number) => void;
}

export interface RebaseResult {
  /** Guest bytes copied into the image because old and new backing differ there. */
  copiedBytes: number;
}

/** How much is compared per step; a multiple of every cluster size. */
const STEP = 2 * 1024 * 1024;

export async function rebaseImage(path: string, options: RebaseOptions): Promise<RebaseResult> {
  const fs = options.fs ?? nodeFileSystem;
  if (options.backing !== null && options.backingFormat === undefined) {
    throw new Qcow2Error('qcow2.bad-argument', 'rebase: the new backing format (-F) is required; formats are never probed');
  }
  if (options.unsafe) {
    // Unsafe mode reads no backing file, but the data file is still opened: confine it.
    const image = await Qcow2Image.open(path, { fs, writable: true, namedFiles: await NamedFilePolicy.forImage(path, { allowedDirectories: options.allowedDirectories, fs }) });
    try {
      await image.setBackingFile(options.backing, options.backing === null ? null : options.backingFormat!);
    } finally {
      await image.close();
    }
    return { copiedBytes: 0 };
  }

  const chain = await openChain(path, { fs, writableTop: true, allowedDirectories: options.allowedDirectories });
  let newChain: Chain | null = null;
  const statusLayers: MapLayer[] = [];
  let newLayers: MapLayer[] = [];
  try {
    const image = chain.topImage;
    const oldBacking: ByteSource | null = chain.layers[1]?.source ?? null;
    let newBacking: ByteSource | null = null;
    if (options.backing !== null) {
      const resolved = resolveReferencedPath(options.backing, path, 'new backing file');
      newChain = await openChain(resolved, { fs, topFormat: options.backingFormat!, allowedDirectories: options.allowedDirectories });
      newBacking = newChain;
    }
    // Block status of both backing chains tells which ranges cannot differ without reading them.
    const oldLayers = (await openLayers(path, { fs, allowedDirectories: options.allowedDirectories })).slice(0);
    statusLayers.push(...oldLayers);
    if (options.backing !== null) {
      const resolved = resolveReferencedPath(options.backing, path, 'new backing file');
      newLayers = await openLayers(resolved, { fs, format: options.backingFormat!, allowedDirectories: options.allowedDirectories });
      statusLayers.push(...newLayers);
    }
    const size = image.size;
    const unit = image.geometry.subclusterSize;
    const oldBuf = new Uint8Array(STEP);
    const newBuf = new Uint8Array(STEP);
    let copiedBytes = 0;
    for (let pos = 0; pos < size; pos += STEP) {
      const length = Math.min(STEP, size - pos);
      for (const extent of await image.mapRange(pos, length)) {
        if (extent.mapping.kind !== 'unallocated') continue;
        // This range shows the backing file: old and new must read the same there.
        const ranges = await rangesThatMayDiffer(oldLayers.slice(1), newLayers, extent.guestOffset, extent.guestOffset + extent.length);
        for (const [rangeStart, rangeEnd] of ranges) {
          const length = rangeEnd - rangeStart;
          const old = oldBuf.subarray(0, length);
          const now = newBuf.subarray(0, length);
          if (oldBacking) await oldBacking.readAt(old, rangeStart);
          else old.fill(0);
          if (newBacking) await newBacking.readAt(now, rangeStart);
          else now.fill(0);
          // Write differing (sub)clusters, coalescing adjacent ones into one write. Ranges
          // start on unit boundaries (extents of the image are whole subclusters).
          let runStart = -1;
          for (let at = 0; at <= length; at += unit) {
            const end = Math.min(length, at + unit);
            const differs = at < length && Buffer.compare(old.subarray(at, end), now.subarray(at, end)) !== 0;
            if (differs && runStart < 0) runStart = at;
            if (!differs && runStart >= 0) {
              await image.write(old.subarray(runStart, at), rangeStart + runStart);
              copiedBytes += at - runStart;
              runStart = -1;
            }
          }
        }
      }
      options.progress?.(pos + length, size);
    }
    // Data first (durable), then the header switch.
    await image.flush();
    await image.setBackingFile(options.backing, options.backing === null ? null : options.backingFormat!);
    return { copiedBytes };
  } finally {
    await closeLayers(statusLayers);
    await newChain?.close();
    await chain.close();
  }
}

/** Block status of a backing chain (none: zeros everywhere). */
async function statusOf(layers: MapLayer[], start: number, end: number): Promise<MapEntry[]> {
  if (layers.length === 0) return [{ start, length: end - start, depth: 0, present: false, zero: true, data: false }];
  return chainStatus(layers, start, end);
}

/**
 * Sub-ranges of [start, end) where the old and new backing chains may read differently: not
 * where both read zeros, and not where both take the bytes from the same place of the same file
 * (rebasing onto a file that was already below in the chain). Returned ranges are coalesced.
 */
async function rangesThatMayDiffer(oldLayers: MapLayer[], newLayers: MapLayer[], start: number, end: number): Promise<Array<[number, number]>> {
  const a = await statusOf(oldLayers, start, end);
  const b = await statusOf(newLayers, start, end);
  const out: Array<[number, number]> = [];
  let i = 0;
  let j = 0;
  let pos = start;
  while (pos < end && i < a.length && j < b.length) {
    const x = a[i]!;
    const y = b[j]!;
    const segEnd = Math.min(end, x.start + x.length, y.start + y.length);
    let same = false;
    if (!x.data && !y.data) same = true;
    else if (x.data && y.data && x.offset !== undefined && y.offset !== undefined) {
      same = oldLayers[x.depth]!.path === newLayers[y.depth]!.path && x.offset + (pos - x.start) === y.offset + (pos - y.start);
    }
    if (!same) {
      const last = out[out.length - 1];
      if (last && last[1] === pos) last[1] = segEnd;
      else out.push([pos, segEnd]);
    }
    pos = segEnd;
    if (pos >= x.start + x.length) i += 1;
    if (pos >= y.start + y.length) j += 1;
  }
  // Split into pieces no larger than the compare buffers.
  const pieces: Array<[number, number]> = [];
  for (const [s, e] of out) for (let p = s; p < e; p += STEP) pieces.push([p, Math.min(e, p + STEP)]);
  return pieces;
}
