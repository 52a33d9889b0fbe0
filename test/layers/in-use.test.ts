import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';
import { convertImage } from '../../src/chain/convert.js';
import { locksOn, openedBy, writerLocks } from '../../src/io/in-use.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { pausedQemu } from '../helpers/qemu.js';
import { checkImage } from '../../src/qcow2/repair.js';
import { readFileSync } from 'node:fs';
import { stat } from 'node:fs/promises';

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

/**
 * Start a paused qemu-system on `image` (read-write, as a guest runs it) and wait for its locks:
 * the writer's on the image, and any on each of `backing` (QEMU locks those a moment later).
 */
async function qemuOn(image: string, backing: string[] = []) {
  const qemu = pausedQemu(image);
  const locked = async () => (await writerLocks(image)).length > 0 && (await Promise.all(backing.map(locksOn))).every((locks) => locks.length > 0);
  for (let i = 0; i < 200 && !(await locked()); i++) await new Promise((r) => setTimeout(r, 50));
  return { qemu }; // wrapped: an execa child is thenable, and returning it would wait for its exit
}

describe('images a running QEMU writes', () => {
  it('are told apart from images it only reads (a shared base), and convert refuses them unless forceShare', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qlayer-writer-'));
    const base = join(dir, 'base.qcow2');
    const top = join(dir, 'top.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', base, '16M']);
    await execa('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 1M', base]);
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
    const { qemu } = await qemuOn(top, [base]);
    try {
      expect((await writerLocks(top)).length).toBeGreaterThan(0);
      // The guest reads the base through the chain: locked, but not for writing.
      expect((await locksOn(base)).length).toBeGreaterThan(0);
      expect(await writerLocks(base)).toEqual([]);
      // The holder is named by pid and command line (OFD locks carry no pid: found by open files).
      expect((await openedBy(top)).join(' ')).toContain(`pid ${qemu.pid} (qemu-system-x86_64`);

      const refused = await convertImage(top, join(dir, 'copy.qcow2')).catch((error: Error) => error);
      expect(refused).toMatchObject({ code: 'image.being-written' });
      expect((refused as Error).message).toMatch(/-U \(--force-share\)/);
      await expect(stat(join(dir, 'copy.qcow2'))).rejects.toMatchObject({ code: 'ENOENT' });
      await convertImage(top, join(dir, 'copy.qcow2'), { forceShare: true });
      // The base a guest only reads converts without -U.
      await convertImage(base, join(dir, 'base-copy.qcow2'));
      expect((await execa('qemu-img', ['compare', base, join(dir, 'base-copy.qcow2')])).exitCode).toBe(0);
    } finally {
      qemu.kill('SIGKILL');
      await qemu;
    }
    expect(await writerLocks(top)).toEqual([]);
    await convertImage(top, join(dir, 'copy2.qcow2'));
  });
});
