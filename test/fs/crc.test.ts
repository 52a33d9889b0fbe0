/** CRC-32C and CRC-32: published check values, and slicing-by-8 against a bitwise reference. */
import { describe, expect, it } from 'vitest';
import { crc32, crc32c, crc32cRaw } from '../../src/fs/crc.js';
import { seededRandom } from '../helpers/qemu.js';

/** Bit-at-a-time CRC-32C register update: slow, obviously right. */
function bitwiseCrc32cRaw(register: number, data: Uint8Array): number {
  let c = register >>> 0;
  for (const byte of data) {
    c ^= byte;
    for (let k = 0; k < 8; k += 1) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
  }
  return c >>> 0;
}

describe('crc', () => {
  it('matches the published check values', () => {
    const check = Buffer.from('123456789');
    expect(crc32c(check)).toBe(0xe3069283);
    expect(crc32(check)).toBe(0xcbf43926);
    expect(crc32c(new Uint8Array(32))).toBe(0x8a9136aa); // RFC 3720 B.4: 32 bytes of zeros
    expect(crc32c(new Uint8Array(32).fill(0xff))).toBe(0x62a8ab43); // RFC 3720 B.4: 32 bytes of 0xff
  });

  it('slicing-by-8 equals the bitwise definition for every length and seed', () => {
    const random = seededRandom(42);
    for (let length = 0; length < 300; length += 1) {
      const data = Uint8Array.from({ length }, () => Math.floor(random() * 256));
      const seed = Math.floor(random() * 2 ** 32);
      expect(crc32cRaw(seed, data)).toBe(bitwiseCrc32cRaw(seed, data));
    }
  });
});
