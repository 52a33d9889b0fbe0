/**
 * Hashed directory lookup (htree / dir_index): hash the name the way ext4 does, walk the index
 * from the root block down to one leaf block, and look only there. Reading one leaf instead of
 * the whole directory is what makes a single lookup in a 100,000-entry directory cheap.
 * Hash functions: legacy (dx_hack), half-MD4 and TEA, each in the signed-char and unsigned-char
 * variants (the superblock's s_flags says which one the filesystem was made with).
 */
import { crc32cRaw } from '../crc.js';
import { Ext4Error, corrupt } from '../errors.js';

export const HASH = { LEGACY: 0, HALF_MD4: 1, TEA: 2, LEGACY_UNSIGNED: 3, HALF_MD4_UNSIGNED: 4, TEA_UNSIGNED: 5, SIPHASH: 6 } as const;

const DEFAULT_SEED = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];

function charAt(name: Uint8Array, i: number, signed: boolean): number {
  const c = name[i]!;
  return signed && c >= 128 ? c - 256 : c;
}

/** The legacy "dx_hack" hash. */
function legacyHash(name: Uint8Array, signed: boolean): number {
  let hash0 = 0x12a3fe2d;
  let hash1 = 0x37abe8f9;
  for (let i = 0; i < name.length; i += 1) {
    let hash = (hash1 + (hash0 ^ Math.imul(charAt(name, i, signed), 7152373))) >>> 0;
    if (hash & 0x80000000) hash = (hash - 0x7fffffff) >>> 0;
    hash1 = hash0;
    hash0 = hash;
  }
  return (hash0 << 1) >>> 0;
}

/** Pack up to num*4 bytes of the name into num words, padded with a length-derived pattern. */
function toWords(name: Uint8Array, from: number, num: number, signed: boolean): Uint32Array {
  const out = new Uint32Array(num);
  let length = name.length - from;
  let pad = (length | (length << 8)) >>> 0;
  pad = (pad | (pad << 16)) >>> 0;
  let val = pad;
  if (length > num * 4) length = num * 4;
  let w = 0;
  for (let i = 0; i < length; i += 1) {
    val = (charAt(name, from + i, signed) + ((val << 8) >>> 0)) >>> 0;
    if (i % 4 === 3) {
      out[w++] = val;
      val = pad;
    }
  }
  if (w < num) out[w++] = val;
  while (w < num) out[w++] = pad;
  return out;
}

const rol = (x: number, s: number): number => ((x << s) | (x >>> (32 - s))) >>> 0;

function halfMd4Transform(buf: Uint32Array, x: Uint32Array): void {
  let a = buf[0]!;
  let b = buf[1]!;
  let c = buf[2]!;
  let d = buf[3]!;
  const F = (p: number, q: number, r: number): number => (r ^ (p & (q ^ r))) >>> 0;
  const G = (p: number, q: number, r: number): number => ((p & q) + ((p ^ q) & r)) >>> 0;
  const H = (p: number, q: number, r: number): number => (p ^ q ^ r) >>> 0;
  const K2 = 0x5a827999;
  const K3 = 0x6ed9eba1;
  // Each step: v = rol(v + f(three others) + word + k, shift), in MD4's rotating order.
  const plan: Array<[(p: number, q: number, r: number) => number, number, number, number]> = [
    [F, 0, 0, 3], [F, 1, 0, 7], [F, 2, 0, 11], [F, 3, 0, 19], [F, 4, 0, 3], [F, 5, 0, 7], [F, 6, 0, 11], [F, 7, 0, 19],
    [G, 1, K2, 3], [G, 3, K2, 5], [G, 5, K2, 9], [G, 7, K2, 13], [G, 0, K2, 3], [G, 2, K2, 5], [G, 4, K2, 9], [G, 6, K2, 13],
    [H, 3, K3, 3], [H, 7, K3, 9], [H, 2, K3, 11], [H, 6, K3, 15], [H, 1, K3, 3], [H, 5, K3, 9], [H, 0, K3, 11], [H, 4, K3, 15],
  ];
  plan.forEach(([f, word, k, shift], step) => {
    const t = (x[word]! + k) >>> 0;
    switch (step % 4) {
      case 0:
        a = rol((a + f(b, c, d) + t) >>> 0, shift);
        break;
      case 1:
        d = rol((d + f(a, b, c) + t) >>> 0, shift);
        break;
      case 2:
        c = rol((c + f(d, a, b) + t) >>> 0, shift);
        break;
      default:
        b = rol((b + f(c, d, a) + t) >>> 0, shift);
    }
  });
  buf[0] = (buf[0]! + a) >>> 0;
  buf[1] = (buf[1]! + b) >>> 0;
  buf[2] = (buf[2]! + c) >>> 0;
  buf[3] = (buf[3]! + d) >>> 0;
}

function teaTransform(buf: Uint32Array, x: Uint32Array): void {
  let sum = 0;
  let b0 = buf[0]!;
  let b1 = buf[1]!;
  const [a, b, c, d] = [x[0]!, x[1]!, x[2]!, x[3]!];
  for (let n = 0; n < 16; n += 1) {
    sum = (sum + 0x9e3779b9) >>> 0;
    b0 = (b0 + ((((b1 << 4) + a) ^ (b1 + sum) ^ ((b1 >>> 5) + b)) >>> 0)) >>> 0;
    b1 = (b1 + ((((b0 << 4) + c) ^ (b0 + sum) ^ ((b0 >>> 5) + d)) >>> 0)) >>> 0;
  }
  buf[0] = (buf[0]! + b0) >>> 0;
  buf[1] = (buf[1]! + b1) >>> 0;
}

/**
 * The major hash ext4 stores in its index for `name` (low bit cleared). `seed` is s_hash_seed;
 * an all-zero seed means the default MD4 constants.
 */
export function dirHash(name: Uint8Array, version: number, seed: ArrayLike<number>): { hash: number; minor: number } {
  const buf = new Uint32Array(4);
  const useSeed = Array.from(seed).some((v) => v !== 0);
  for (let i = 0; i < 4; i += 1) buf[i] = useSeed ? seed[i]! : DEFAULT_SEED[i]!;
  let hash: number;
  let minor = 0;
  switch (version) {
    case HASH.LEGACY:
    case HASH.LEGACY_UNSIGNED:
      hash = legacyHash(name, version === HASH.LEGACY);
      break;
    case HASH.HALF_MD4:
    case HASH.HALF_MD4_UNSIGNED:
      for (let at = 0; at < name.length; at += 32) halfMd4Transform(buf, toWords(name, at, 8, version === HASH.HALF_MD4));
      hash = buf[1]!;
      minor = buf[2]!;
      break;
    case HASH.TEA:
    case HASH.TEA_UNSIGNED:
      for (let at = 0; at < name.length; at += 16) teaTransform(buf, toWords(name, at, 4, version === HASH.TEA));
      hash = buf[0]!;
      minor = buf[1]!;
      break;
    default:
      throw corrupt(`directory hash version ${version} is not one this reader implements`);
  }
  hash = (hash & ~1) >>> 0;
  if (hash === 0xfffffffe) hash = 0xfffffffc; // the end-of-directory marker is reserved
  return { hash, minor };
}

/** One level of the index: sorted (hash, logical block) pairs; entry 0's hash is implicitly 0. */
export interface DxLevel {
  hashes: number[];
  blocks: number[];
}

/**
 * Parse a dx_countlimit + entries array at `offset` of an index block. With metadata_csum
 * (`seed` given), the dx_tail after `limit` entries holds crc32c(seed, block up to the last used
 * entry, the tail's reserved word, four zero bytes).
 */
export function parseDxEntries(block: Buffer, offset: number, where: string, seed?: number): DxLevel {
  if (offset + 8 > block.length) throw corrupt(`${where}: htree index header is outside the block`);
  const limit = block.readUInt16LE(offset);
  const count = block.readUInt16LE(offset + 2);
  if (count === 0 || count > limit || offset + limit * 8 > block.length) {
    throw corrupt(`${where}: htree index claims ${count} of ${limit} entries`);
  }
  const tail = offset + limit * 8;
  if (seed !== undefined && tail + 8 <= block.length) {
    let crc = crc32cRaw(seed, block.subarray(0, offset + count * 8));
    crc = crc32cRaw(crc, block.subarray(tail, tail + 4));
    crc = crc32cRaw(crc, new Uint8Array(4));
    const stored = block.readUInt32LE(tail + 4);
    if (crc !== stored) {
      throw new Ext4Error('fs.bad-checksum', `${where}: htree index block checksum mismatch (stored 0x${stored.toString(16)}, computed 0x${crc.toString(16)})`);
    }
  }
  // The top 4 bits of a dx_entry block number are reserved.
  const hashes = [0];
  const blocks = [block.readUInt32LE(offset + 4) & 0x0fffffff];
  for (let i = 1; i < count; i += 1) {
    hashes.push(block.readUInt32LE(offset + i * 8));
    blocks.push(block.readUInt32LE(offset + i * 8 + 4) & 0x0fffffff);
  }
  return { hashes, blocks };
}

/** Index of the last entry whose hash is <= `hash` (binary search; hashes are sorted). */
export function dxSearch(level: DxLevel, hash: number): number {
  let lo = 1;
  let hi = level.hashes.length - 1;
  let found = 0;
  while (lo <= hi) {
    const mid = (lo + hi) >> 1;
    if (level.hashes[mid]! <= hash) {
      found = mid;
      lo = mid + 1;
    } else {
      hi = mid - 1;
    }
  }
  return found;
}
