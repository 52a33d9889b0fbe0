/**
 * `compare`: do two images (each with its whole backing chain) show the same virtual disk?
 * The answer and its wording follow qemu-img compare 7.2:
 * - identical: exit 0; different: exit 1 with the offset of the first differing 512-byte
 *   sector; an error (an image that cannot be opened): exit 2;
 * - images of different sizes are compared over the common part, and the larger one's extra
 *   part must read as zeros ("Warning: Image size mismatch!"); with `strict` different sizes
 *   are a difference, and so is a different block status (allocated, zero, data) anywhere.
 * Ranges where both sides are known zeros are never read (block status, as convert does).
 */
import type { FileSystemAccess } from '../io/host-file.js';
import { allocateAligned } from '../io/aligned-buffer.js';
import { isAllZero, readWindow } from './window-io.js';
import { chainStatus, type MapEntry } from './map.js';
import { closeLayers, openLayers, type MapLayer } from './map-layer.js';
import { MapCursor } from './map-cursor.js';

export interface CompareOptions {
  fs?: FileSystemAccess;
  /** Formats of the first and second image (qemu-img's -f and -F); default qcow2. */
  formatA?: 'qcow2' | 'raw';
  formatB?: 'qcow2' | 'raw';
  /** qemu-img's -s: sizes and block status must match too. */
  strict?: boolean;
  allowedDirectories?: string[];
}

export type CompareResult =
  | { identical: true; sizeMismatch: boolean }
  | { identical: false; sizeMismatch: boolean; reason: 'content' | 'size' | 'block-status'; offset?: number };

/** The words qemu-img prints for a result (stdout), one line each. */
export function formatCompareText(result: CompareResult, strict: boolean): string {
  const lines: string[] = [];
  if (result.sizeMismatch) lines.push(strict ? 'Strict mode: Image size mismatch!' : 'Warning: Image size mismatch!');
  if (result.identical) lines.push('Images are identical.');
  else if (result.reason === 'content') lines.push(`Content mismatch at offset ${result.offset}!`);
  else if (result.reason === 'block-status') lines.push(`Strict mode: Offset ${result.offset} block status mismatch!`);
  return lines.join('\n');
}

/** Bytes compared per step. */
const WINDOW = 2 * 1024 * 1024;
/** Block status is compared (strict mode) over spans of this size. */
const STATUS_SPAN = 2 ** 30;

/**
 * qemu-img compares the whole status word, which carries BDRV_BLOCK_EOF when the range runs to
 * the end of the image: an unallocated tail and an unallocated range before an allocated one
 * differ in strict mode even though both read as zeros. `end` is the (common) image size.
 */
const sameStatus = (a: MapEntry, b: MapEntry, end: number) =>
  a.present === b.present && a.zero === b.zero && a.data === b.data && (a.start + a.length >= end) === (b.start + b.length >= end);

/** The first offset in [0, end) where the two chains' block status differs, or end. */
async function firstStatusMismatch(a: MapLayer[], b: MapLayer[], end: number): Promise<number> {
  for (let span = 0; span < end; span += STATUS_SPAN) {
    const to = Math.min(end, span + STATUS_SPAN);
    const rowsA = await chainStatus(a, span, to);
    const rowsB = await chainStatus(b, span, to);
    let i = 0;
    let j = 0;
    let at = span;
    while (at < to && i < rowsA.length && j < rowsB.length) {
      const ra = rowsA[i]!;
      const rb = rowsB[j]!;
      if (!sameStatus(ra, rb, end)) return at;
      at = Math.min(ra.start + ra.length, rb.start + rb.length);
      if (ra.start + ra.length <= at) i += 1;
      if (rb.start + rb.length <= at) j += 1;
    }
  }
  return end;
}

/** Read [offset, offset + into.length) of a chain, zeros included. */
async function readRange(layers: MapLayer[], cursor: MapCursor, offset: number, into: Uint8Array): Promise<void> {
  const entries = await cursor.window(offset, offset + into.length);
  await readWindow(layers, entries, offset, into, into.length, [true]);
}

/** Offset of the first differing 512-byte sector of a and b (same length), or -1. */
function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const ba = Buffer.from(a.buffer, a.byteOffset, a.byteLength);
  const bb = Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  if (ba.equals(bb)) return -1;
  for (let at = 0; at < ba.length; at += 512) {
    const end = Math.min(ba.length, at + 512);
    if (ba.compare(bb, at, end, at, end) !== 0) return at;
  }
  return -1;
}

function firstNonZeroSector(a: Uint8Array): number {
  for (let at = 0; at < a.length; at += 512) if (!isAllZero(a.subarray(at, Math.min(a.length, at + 512)))) return at;
  return -1;
}

export async function compareImages(pathA: string, pathB: string, options: CompareOptions = {}): Promise<CompareResult> {
  const a = await openLayers(pathA, { fs: options.fs, format: options.formatA ?? 'qcow2', allowedDirectories: options.allowedDirectories });
  let b: MapLayer[] = [];
  try {
    b = await openLayers(pathB, { fs: options.fs, format: options.formatB ?? 'qcow2', allowedDirectories: options.allowedDirectories });
    const sizeA = a[0]!.size;
    const sizeB = b[0]!.size;
    const sizeMismatch = sizeA !== sizeB;
    if (sizeMismatch && options.strict) return { identical: false, sizeMismatch, reason: 'size' };
    const common = Math.min(sizeA, sizeB);
    // qemu-img checks status before content in each chunk: content counts only before the first status difference.
    const statusEnd = options.strict ? await firstStatusMismatch(a, b, common) : common;
    const cursorA = new MapCursor(a, 0, sizeA, WINDOW);
    const cursorB = new MapCursor(b, 0, sizeB, WINDOW);
    const memory = allocateAligned(2 * WINDOW);
    const bufA = memory.subarray(0, WINDOW);
    const bufB = memory.subarray(WINDOW);
    for (let position = 0; position < statusEnd; ) {
      const next = Math.min(await cursorA.nextData(position), await cursorB.nextData(position));
      if (next >= statusEnd) break;
      const offset = Math.floor(next / WINDOW) * WINDOW;
      const length = Math.min(WINDOW, statusEnd - offset);
      await readRange(a, cursorA, offset, bufA.subarray(0, length));
      await readRange(b, cursorB, offset, bufB.subarray(0, length));
      const at = firstDifference(bufA.subarray(0, length), bufB.subarray(0, length));
      if (at >= 0) return { identical: false, sizeMismatch, reason: 'content', offset: offset + at };
      position = offset + length;
    }
    if (statusEnd < common) return { identical: false, sizeMismatch, reason: 'block-status', offset: statusEnd };
    // The larger image's extra part must read as zeros.
    const [larger, cursor, size] = sizeA > sizeB ? [a, cursorA, sizeA] : [b, cursorB, sizeB];
    for (let position = common; position < size; ) {
      const next = await cursor.nextData(position);
      if (next >= size) break;
      const offset = Math.max(common, Math.floor(next / WINDOW) * WINDOW);
      const length = Math.min(WINDOW - (offset % WINDOW), size - offset);
      const into = bufA.subarray(0, length);
      await readRange(larger, cursor, offset, into);
      const at = firstNonZeroSector(into);
      if (at >= 0) return { identical: false, sizeMismatch, reason: 'content', offset: offset + at };
      position = offset + length;
    }
    return { identical: true, sizeMismatch };
  } finally {
    await closeLayers(b);
    await closeLayers(a);
  }
}
