/**
 * The two CRCs the guest-filesystem reader needs, table-driven, on plain numbers:
 * - CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): ext4 metadata_csum.
 * - CRC-32 (IEEE, reflected polynomial 0xEDB88320): GPT header and entry array.
 * Both are exposed as the "raw" register update (no pre/post inversion) plus the conventional
 * form, because ext4 stores the raw register seeded with ~0 (no final inversion).
 */

function makeTable(polynomial: number): Uint32Array {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n += 1) {
    let c = n;
    for (let k = 0; k < 8; k += 1) c = c & 1 ? (c >>> 1) ^ polynomial : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
}

const crc32cTable = makeTable(0x82f63b78);
const crc32Table = makeTable(0xedb88320);

/**
 * Slicing-by-8 tables for CRC-32C: eight bytes per step instead of one. Metadata checksums run
 * on every inode and directory block a lookup touches, so this is on the hot path.
 */
const crc32cSlices: Uint32Array[] = (() => {
  const slices = [crc32cTable];
  for (let k = 1; k < 8; k += 1) {
    const previous = slices[k - 1]!;
    const next = new Uint32Array(256);
    for (let n = 0; n < 256; n += 1) next[n] = (crc32cTable[previous[n]! & 0xff]! ^ (previous[n]! >>> 8)) >>> 0;
    slices.push(next);
  }
  return slices;
})();

function update(table: Uint32Array, register: number, data: Uint8Array): number {
  let c = register >>> 0;
  for (let i = 0; i < data.length; i += 1) {
    c = (table[(c ^ data[i]!) & 0xff]! ^ (c >>> 8)) >>> 0;
  }
  return c >>> 0;
}

/** CRC-32C register update with no inversions (what Linux's crc32c_le() computes). */
export function crc32cRaw(register: number, data: Uint8Array): number {
  const [t0, t1, t2, t3, t4, t5, t6, t7] = crc32cSlices as [Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array, Uint32Array];
  let c = register >>> 0;
  let i = 0;
  const end8 = data.length - (data.length % 8);
  for (; i < end8; i += 8) {
    const lo = (c ^ (data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24))) >>> 0;
    c =
      (t7[lo & 0xff]! ^
        t6[(lo >>> 8) & 0xff]! ^
        t5[(lo >>> 16) & 0xff]! ^
        t4[lo >>> 24]! ^
        t3[data[i + 4]!]! ^
        t2[data[i + 5]!]! ^
        t1[data[i + 6]!]! ^
        t0[data[i + 7]!]!) >>>
      0;
  }
  for (; i < data.length; i += 1) c = (t0[(c ^ data[i]!) & 0xff]! ^ (c >>> 8)) >>> 0;
  return c;
}

/** Conventional CRC-32C (init ~0, final inversion): "123456789" -> 0xE3069283. */
export function crc32c(data: Uint8Array): number {
  return (~crc32cRaw(0xffffffff, data)) >>> 0;
}

/** Conventional CRC-32 (IEEE 802.3, as used by GPT and zlib): "123456789" -> 0xCBF43926. */
export function crc32(data: Uint8Array): number {
  return (~update(crc32Table, 0xffffffff, data)) >>> 0;
}
