import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';
import { convertImage } from '../../src/chain/convert.js';
import { locksOn } from '../../src/io/in-use.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { checkImage } from '../../src/qcow2/repair.js';
import { readFileSync } from 'node:fs';

describe('locksOn', () => {
  it('sees the locks a running QEMU holds on an image, refuses to write it, and sees none once QEMU exits', async () => {
    const image = join(mkdtempSync(join(tmpdir(), 'qlayer-lock-')), 'disk.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', image, '16M']);
    expect(await locksOn(image)).toEqual([]);
    const qemu = execa('qemu-system-x86_64', [
      '-machine', 'none', '-S', '-display', 'none', '-monitor', 'none',
      '-blockdev', `driver=qcow2,node-name=d,file.driver=file,file.filename=${image}`,
    ]);
    try {
      let locks: string[] = [];
      for (let i = 0; i < 100 && locks.length === 0; i++) {
        await new Promise((r) => setTimeout(r, 100));
        locks = await locksOn(image);
      }
      expect(locks.length).toBeGreaterThan(0);
      expect(locks[0]).toMatch(/OFDLCK/);
      // The engine refuses to write it (and changes nothing), but may still read it.
      const bytes = readFileSync(image);
      await expect(Qcow2Image.open(image, { writable: true })).rejects.toMatchObject({ code: 'image.in-use' });
      await expect(checkImage(image, { repair: 'all' })).rejects.toMatchObject({ code: 'image.in-use' });
      // Nor is it a convert's output (opening it would truncate it under the running guest).
      const source = join(dirname(image), 'source.raw');
      writeFileSync(source, Buffer.alloc(65536, 1));
      await expect(convertImage(source, image, { sourceFormat: 'raw' })).rejects.toMatchObject({ code: 'image.in-use' });
      const reader = await Qcow2Image.open(image);
      expect(reader.size).toBe(16 << 20);
      await reader.close();
      expect(readFileSync(image).equals(bytes)).toBe(true);
    } finally {
      qemu.kill('SIGKILL');
      await qemu.catch(() => {});
    }
    expect(await locksOn(image)).toEqual([]);
  });
});
