/**
 * Refcount blocks hold entries of 2^refcount_order bits (1 to 64), big-endian, packed. These
 * helpers read and write one entry inside a refcount block buffer. 64-bit entries are handled as
 * two 32-bit halves; a refcount above 2^53 cannot occur in a real image and is clamped to
 * MAX_SAFE_INTEGER (it would be a corruption anyway).
 */

export function refcountEntriesPerBlock(clusterSize: number, refcountOrder: number): number {
  return (clusterSize * 8) >> refcountOrder;
}

export function getRefcountEntry(block: Uint8Array, index: number, refcountOrder: number): number {
  const bits = 1 << refcountOrder;
  switch (bits) {
    case 16:
      return ((block[index * 2] ?? 0) << 8) | (block[index * 2 + 1] ?? 0);
    case 8:
      return block[index] ?? 0;
    case 32: {
      const o = index * 4;
      return (((block[o] ?? 0) << 24) >>> 0) + (((block[o + 1] ?? 0) << 16) | ((block[o + 2] ?? 0) << 8) | (block[o + 3] ?? 0));
    }
    case 64: {
      const o = index * 8;
      const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
      const hi = view.getUint32(o);
      const lo = view.getUint32(o + 4);
      return hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x100000000 + lo;
    }
    default: {
      // 1, 2 or 4 bits: entries are packed from the least significant bits of each byte.
      const perByte = 8 / bits;
      const byte = block[Math.floor(index / perByte)] ?? 0;
      const shift = (index % perByte) * bits;
      return (byte >> shift) & ((1 << bits) - 1);
    }
  }
}

export function refcountMax(refcountOrder: number): number {
  const bits = 1 << refcountOrder;
  return bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
}

export function setRefcountEntry(block: Uint8Array, index: number, refcountOrder: number, value: number): void {
  const bits = 1 << refcountOrder;
  if (value < 0 || value > refcountMax(refcountOrder)) throw new RangeError(`refcount ${value} does not fit in ${bits} bits`);
  switch (bits) {
    case 16:
      block[index * 2] = value >>> 8;
      block[index * 2 + 1] = value & 0xff;
      return;
    case 8:
      block[index] = value;
      return;
    case 32: {
      const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
      view.setUint32(index * 4, value >>> 0);
      return;
    }
    case 64: {
      const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
      view.setUint32(index * 8, Math.floor(value / 0x100000000));
      view.setUint32(index * 8 + 4, value >>> 0);
      return;
    }
    default: {
      const perByte = 8 / bits;
      const at = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[at] = ((block[at] ?? 0) & ~mask) | ((value << shift) & mask);
    }
  }
}
