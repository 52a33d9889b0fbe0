/**
 * allocateAligned's contract. Its point, alignment, is not visible from JavaScript (no
 * addresses); `npm run bench` measures what it buys (convert raw -> qcow2).
 */
import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { allocateAligned } from '../../src/io/aligned-buffer.js';
import { tempDir } from '../helpers/qemu.js';

describe('allocateAligned', () => {
  it('gives zeroed, independent buffers of exactly the size asked, usable for pread/pwrite', async () => {
    const a = allocateAligned(3 * 1024 * 1024 + 5);
    const b = allocateAligned(100);
    expect(a.length).toBe(3 * 1024 * 1024 + 5);
    expect(b.length).toBe(100);
    expect(a.every((byte) => byte === 0)).toBe(true);
    a.fill(7);
    expect(b.every((byte) => byte === 0)).toBe(true);
    expect(allocateAligned(0).length).toBe(0);

    const { dir, cleanup } = await tempDir('qlayer-aligned-');
    try {
      const fd = openSync(join(dir, 'f'), 'w+');
      writeSync(fd, a, 0, a.length, 0);
      const back = allocateAligned(a.length);
      expect(readSync(fd, back, 0, back.length, 0)).toBe(a.length);
      expect(Buffer.from(back.buffer, back.byteOffset, back.length).equals(Buffer.from(a.buffer, a.byteOffset, a.length))).toBe(true);
      closeSync(fd);
    } finally {
      await cleanup();
    }
  });
});
