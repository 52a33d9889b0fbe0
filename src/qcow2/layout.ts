/**
 * Bit layouts of qcow2 table entries: L1, L2 (standard and extended), compressed cluster
 * descriptors and refcount entries of any width. Entries are decoded from two 32-bit halves so
 * hot loops stay on plain numbers (offsets are below 2^56, exact in a double).
 */
import { Qcow2Error } from './errors.js';

const TWO32 = 0x1_0000_0000;

/** Bits 9..55 of a table entry as an offset: hi bits 32..55, lo bits 9..31. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
}

export const COPIED_HI = 0x80000000;
export const COMPRESSED_HI = 0x40000000;
export const ZERO_LO = 0x1;
/** Reserved bits of an L1 entry: 0..8 and 56..62. */
export const L1_RESERVED_LO = 0x1ff;
export const L1_RESERVED_HI = 0x7f000000;
/** Reserved bits of a standard L2 entry: 1..8 and 56..61. */
export const L2_RESERVED_LO = 0x1fe;
export const L2_RESERVED_HI = 0x3f000000;

export interface L1Entry {
  l2Offset: number;
  copied: boolean;
}

export function decodeL1(view: DataView, index: number): L1Entry {
  const hi = view.getUint32(index * 8);
  const lo = view.getUint32(index * 8 + 4);
  return { l2Offset: entryOffset(hi, lo), copied: (hi & COPIED_HI) !== 0 };
}

export function encodeEntry(view: DataView, byteOffset: number, offset: number, flagsHi: number, flagsLo: number): void {
  view.setUint32(byteOffset, ((Math.floor(offset / TWO32) & 0x00ffffff) | flagsHi) >>> 0);
  view.setUint32(byteOffset + 4, ((offset >>> 0) | flagsLo) >>> 0);
}

/** Geometry derived from the header that every table computation needs. */
export interface Geometry {
  clusterBits: number;
  clusterSize: number;
  extendedL2: boolean;
  /** Bytes per L2 entry: 8 or 16. */
  l2EntrySize: number;
  l2Entries: number;
  /** Virtual bytes one L2 table maps. */
  l2Coverage: number;
  subclusterSize: number;
  subclustersPerCluster: number;
  refcountOrder: number;
  refcountBits: number;
  /** Refcount entries per refcount block. */
  refcountBlockEntries: number;
}

export function geometry(clusterBits: number, extendedL2: boolean, refcountOrder: number): Geometry {
  const clusterSize = 2 ** clusterBits;
  const l2EntrySize = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / l2EntrySize;
  const subclustersPerCluster = extendedL2 ? 32 : 1;
  const refcountBits = 2 ** refcountOrder;
  return {
    clusterBits,
    clusterSize,
    extendedL2,
    l2EntrySize,
    l2Entries,
    l2Coverage: l2Entries * clusterSize,
    subclusterSize: clusterSize / subclustersPerCluster,
    subclustersPerCluster,
    refcountOrder,
    refcountBits,
    refcountBlockEntries: (clusterSize * 8) / refcountBits,
  };
}

/** Where a compressed cluster's bytes are in the host file. */
export interface CompressedDescriptor {
  hostOffset: number;
  /** Bytes to read from hostOffset (whole 512-byte sectors, minus the offset into the first). */
  size: number;
}

/**
 * Compressed descriptor (bits 0..61 of the L2 entry): x = 62 - (cluster_bits - 8) low bits are
 * the host byte offset, the bits above count additional 512-byte sectors.
 */
export function decodeCompressed(hi: number, lo: number, clusterBits: number): CompressedDescriptor {
  const x = 62 - (clusterBits - 8);
  const hiOffsetBits = x - 32;
  const hiBits = hi & 0x3fffffff;
  const offsetHi = hiBits & ((1 << hiOffsetBits) - 1);
  const hostOffset = offsetHi * TWO32 + (lo >>> 0);
  const extraSectors = hiBits >>> hiOffsetBits;
  const size = (extraSectors + 1) * 512 - (hostOffset % 512);
  return { hostOffset, size };
}

/** Encode a compressed descriptor (used by tests and by convert -c writers). */
export function encodeCompressed(hostOffset: number, compressedBytes: number, clusterBits: number): { hi: number; lo: number } {
  const x = 62 - (clusterBits - 8);
  const hiOffsetBits = x - 32;
  const first = Math.floor(hostOffset / 512);
  const last = Math.floor((hostOffset + compressedBytes - 1) / 512);
  const extraSectors = last - first;
  const hi = (COMPRESSED_HI | (extraSectors << hiOffsetBits) | Math.floor(hostOffset / TWO32)) >>> 0;
  return { hi, lo: hostOffset >>> 0 };
}

/**
 * What one guest cluster (or subcluster) is, from the image's own L2 entry:
 * - unallocated: read from the backing file (zeros without one);
 * - zero: reads as zeros, hiding the backing file; `hostOffset` set when preallocated;
 * - normal: data at hostOffset (in the external data file when there is one);
 * - compressed: compressed bytes at hostOffset..+size.
 */
export type ClusterMapping =
  | { kind: 'unallocated' }
  | { kind: 'zero'; hostOffset: number | null }
  | { kind: 'normal'; hostOffset: number }
  | { kind: 'compressed'; hostOffset: number; size: number };

/** The raw words of one L2 entry. */
export interface RawL2Entry {
  hi: number;
  lo: number;
  /** Extended L2 only: bits 32..63 of the bitmap word ("reads as zero"). */
  zeroBits: number;
  /** Extended L2 only: bits 0..31 of the bitmap word ("allocated"). */
  allocBits: number;
}

export function readL2Entry(view: DataView, index: number, g: Geometry): RawL2Entry {
  const at = index * g.l2EntrySize;
  const hi = view.getUint32(at);
  const lo = view.getUint32(at + 4);
  if (!g.extendedL2) return { hi, lo, zeroBits: 0, allocBits: 0 };
  return { hi, lo, zeroBits: view.getUint32(at + 8), allocBits: view.getUint32(at + 12) };
}

export function writeL2Entry(view: DataView, index: number, g: Geometry, entry: RawL2Entry): void {
  const at = index * g.l2EntrySize;
  view.setUint32(at, entry.hi >>> 0);
  view.setUint32(at + 4, entry.lo >>> 0);
  if (g.extendedL2) {
    view.setUint32(at + 8, entry.zeroBits >>> 0);
    view.setUint32(at + 12, entry.allocBits >>> 0);
  }
}

function corrupt(message: string): never {
  throw new Qcow2Error('qcow2.corrupt', message);
}

/**
 * Decode the state of guest cluster `guestCluster`'s subcluster `sub` (0 without extended L2)
 * from its raw L2 entry. `version` matters: the zero flag exists only in v3.
 * `externalData` allows host offset 0 (with the COPIED bit) as a valid data offset.
 */
export function decodeL2(entry: RawL2Entry, sub: number, g: Geometry, version: number, externalData: boolean): ClusterMapping {
  const { hi, lo } = entry;
  if (hi & COMPRESSED_HI) {
    if (externalData) corrupt('compressed cluster in an image with an external data file');
    if (g.extendedL2 && (entry.allocBits !== 0 || entry.zeroBits !== 0)) corrupt('compressed cluster with a non-zero subcluster bitmap');
    const d = decodeCompressed(hi, lo, g.clusterBits);
    return { kind: 'compressed', hostOffset: d.hostOffset, size: d.size };
  }
  if (lo & L2_RESERVED_LO || hi & L2_RESERVED_HI) corrupt(`L2 entry 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} has reserved bits set`);
  const offset = entryOffset(hi, lo);
  const hasOffset = offset !== 0 || (externalData && (hi & COPIED_HI) !== 0);
  if (offset % g.clusterSize !== 0) corrupt(`L2 entry host offset 0x${offset.toString(16)} is not cluster-aligned`);
  if (g.extendedL2) {
    if ((entry.allocBits & entry.zeroBits) !== 0) corrupt('extended L2 entry marks a subcluster both allocated and zero');
    const bit = 1 << sub;
    if (entry.zeroBits & bit) return { kind: 'zero', hostOffset: hasOffset ? offset : null };
    if (entry.allocBits & bit) {
      if (!hasOffset) corrupt('extended L2 entry has allocated subclusters but no host offset');
      return { kind: 'normal', hostOffset: offset };
    }
    return { kind: 'unallocated' };
  }
  if (lo & ZERO_LO) {
    if (version < 3) corrupt('zero cluster flag in a version 2 image');
    return { kind: 'zero', hostOffset: hasOffset ? offset : null };
  }
  if (!hasOffset) return { kind: 'unallocated' };
  return { kind: 'normal', hostOffset: offset };
}

/** Read refcount entry `index` of a refcount block of width 2^order bits. */
export function getRefcount(block: Uint8Array, view: DataView, index: number, order: number): number {
  switch (order) {
    case 0:
      return ((block[index >>> 3] ?? 0) >>> (index & 7)) & 1;
    case 1:
      return ((block[index >>> 2] ?? 0) >>> ((index & 3) * 2)) & 3;
    case 2:
      return ((block[index >>> 1] ?? 0) >>> ((index & 1) * 4)) & 15;
    case 3:
      return block[index] ?? 0;
    case 4:
      return view.getUint16(index * 2);
    case 5:
      return view.getUint32(index * 4);
    case 6: {
      const hi = view.getUint32(index * 8);
      const lo = view.getUint32(index * 8 + 4);
      if (hi > 0x1fffff) corrupt(`refcount 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is too large`);
      return hi * TWO32 + lo;
    }
    default:
      throw new RangeError(`refcount order ${order}`);
  }
}

export function maxRefcount(order: number): number {
  return order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** order) - 1;
}

export function setRefcount(block: Uint8Array, view: DataView, index: number, order: number, value: number): void {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const perByte = 8 / bits;
      const byte = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[byte] = ((block[byte] ?? 0) & ~mask) | ((value << shift) & mask);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4:
      view.setUint16(index * 2, value);
      return;
    case 5:
      view.setUint32(index * 4, value);
      return;
    case 6:
      view.setUint32(index * 8, Math.floor(value / TWO32));
      view.setUint32(index * 8 + 4, value >>> 0);
      return;
    default:
      throw new RangeError(`refcount order ${order}`);
  }
}
