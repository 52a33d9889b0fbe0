/**
 * Block status through a backing chain: for every byte range of the virtual disk, which layer
 * answers a read (depth 0 = the top image), and whether it holds data, zeros, or nothing.
 * `map` prints it like `qemu-img map --output=json` (map-json.ts); convert, rebase and commit use
 * the same per-layer extents (map-layer.ts) to skip what they need not read.
 */
import { closeLayers, openLayers, type MapLayer, type OpenLayersOptions } from './map-layer.js';

/** One row of `qemu-img map --output=json`. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/**
 * Where chainStatus puts its rows, one at a time and in order: an array of MapEntry (the API)
 * or the JSON text of `image map --json` (MapJsonWriter), which needs no object per row.
 */
export interface RowSink {
  row(start: number, length: number, depth: number, present: boolean, zero: boolean, data: boolean, offset: number | null): void;
}

/** Append rows to `out`, merging each into the last row the way qemu-img map does. */
function arraySink(out: MapEntry[]): RowSink {
  return {
    row(start, length, depth, present, zero, data, offset) {
      const last = out[out.length - 1];
      if (
        last &&
        last.start + last.length === start &&
        last.depth === depth &&
        last.present === present &&
        last.zero === zero &&
        last.data === data &&
        (last.offset === undefined) === (offset === null) &&
        (last.offset === undefined || last.offset + last.length === offset)
      ) {
        last.length += length;
      } else {
        // Key order as qemu-img prints it; offset only when there is one.
        out.push(offset === null ? { start, length, depth, present, zero, data } : { start, length, depth, present, zero, data, offset });
      }
    },
  };
}

/**
 * Resolve [start, end) through layers[depth..]: which layer answers each byte. Follows QEMU's
 * rules: an unallocated range falls through to the backing layer, unless this layer has no
 * backing or the range lies past the backing's size; then it reads as zeros at this depth.
 * Rows are appended to `out` already merged.
 */
export async function chainStatus(layers: MapLayer[], start: number, end: number, depth = 0, out: MapEntry[] = []): Promise<MapEntry[]> {
  await resolveChain(layers, start, end, depth, arraySink(out));
  return out;
}

async function resolveChain(layers: MapLayer[], start: number, end: number, depth: number, sink: RowSink): Promise<void> {
  const layer = layers[depth]!;
  const below = layers[depth + 1];
  if (below === undefined) {
    // The last layer: nothing to fall through to, so each extent becomes a row as it comes.
    await layer.walkExtents(start, end, (s, length, kind, hostOffset) => {
      if (kind === 'data') sink.row(s, length, depth, true, false, true, hostOffset);
      else if (kind === 'compressed') sink.row(s, length, depth, true, false, true, null);
      else if (kind === 'zero') sink.row(s, length, depth, true, true, false, hostOffset);
      else sink.row(s, length, depth, false, true, false, hostOffset);
    });
    return;
  }
  for (const e of await layer.extents(start, end)) {
    switch (e.kind) {
      case 'data':
        sink.row(e.start, e.length, depth, true, false, true, e.hostOffset);
        break;
      case 'compressed':
        sink.row(e.start, e.length, depth, true, false, true, null);
        break;
      case 'zero':
        sink.row(e.start, e.length, depth, true, true, false, e.hostOffset);
        break;
      case 'unallocated': {
        const eEnd = e.start + e.length;
        const fallsThrough = below ? Math.min(eEnd, below.size) : e.start;
        if (below && fallsThrough > e.start) await resolveChain(layers, e.start, fallsThrough, depth + 1, sink);
        const rest = Math.max(e.start, fallsThrough);
        if (rest < eEnd) sink.row(rest, eEnd - rest, depth, false, true, false, e.hostOffset === null ? null : e.hostOffset + (rest - e.start));
        break;
      }
    }
  }
}

/** Merge adjacent rows the way qemu-img map does (same flags, contiguous offsets). */
export function mergeMapEntries(entries: MapEntry[]): MapEntry[] {
  const out: MapEntry[] = [];
  const sink = arraySink(out);
  for (const e of entries) sink.row(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset ?? null);
  return out;
}

export interface MapOptions extends OpenLayersOptions {
  start?: number;
  length?: number;
}

/** `qemu-img map` of an image and its chain: merged extents over the whole virtual disk. */
export async function mapImage(path: string, options: MapOptions = {}): Promise<MapEntry[]> {
  const entries: MapEntry[] = [];
  await mapInto(path, options, arraySink(entries));
  return entries;
}

export async function mapInto(path: string, options: MapOptions, sink: RowSink): Promise<void> {
  const layers = await openLayers(path, options);
  try {
    const size = layers[0]!.size;
    const start = options.start ?? 0;
    const end = Math.min(size, options.length === undefined ? size : start + options.length);
    // A window at a time keeps the per-layer extent lists small on huge disks.
    const step = Math.max(layers[0]!.geometry?.l2Coverage ?? 1 << 30, 1 << 30);
    for (let pos = start; pos < end; pos += step) await resolveChain(layers, pos, Math.min(end, pos + step), 0, sink);
  } finally {
    await closeLayers(layers);
  }
}
