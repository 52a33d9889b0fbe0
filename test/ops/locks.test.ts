/**
 * QEMU's image locks asked two ways: fcntl(F_OFD_GETLK) through the native helper (native/locks.c)
 * and /proc/locks (the fallback without it). A paused QEMU runs a chain: it writes the top image
 * and only reads the base. Both ways must tell the two apart the same way, and see nothing once
 * QEMU is gone. And the other way round: while qlayer writes an image it holds a QEMU writer's
 * locks, so QEMU (a guest start, qemu-img) refuses it in QEMU's own words.
 */
import { mkdtempSync, writeFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterEach, describe, expect, it } from 'vitest';
import { assertNotLocked, lockEntries, writerLocks } from '../../src/io/in-use.js';
import { nativeBinding, resetNativeBinding } from '../../src/io/native.js';
import { Qcow2Image } from '../../src/qcow2/image.js';
import { pausedQemu } from '../helpers/qemu.js';

afterEach(() => {
  delete process.env.QLAYER_NO_NATIVE;
  resetNativeBinding();
});

/** What each way says about the chain: writer locks on top and base, and whether each is refused for writing. */
async function answers(top: string, base: string) {
  const refused = async (path: string) => assertNotLocked(path).then(() => false, (error: { code?: string }) => error.code === 'image.in-use');
  return {
    topWritten: (await writerLocks(top)).length > 0,
    baseWritten: (await writerLocks(base)).length > 0,
    topRefused: await refused(top),
    baseRefused: await refused(base),
  };
}

/** base.qcow2 (16 MiB) and top.qcow2 on it, in `dir`. */
async function chainIn(dir: string): Promise<{ base: string; top: string }> {
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  await execa('qemu-img', ['create', '-q', '-f', 'qcow2', base, '16M']);
  await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
  return { base, top };
}

describe('QEMU image locks, native fcntl and /proc/locks', () => {
  it('agree on a chain a paused QEMU runs (top written, base only read), and on no QEMU', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qlayer-locks-'));
    try {
      const { base, top } = await chainIn(dir);
      const native = nativeBinding();
      // Where the helper is built (npm ci builds it), it must answer: this test is about it.
      if (native !== null) expect(typeof native.lockTest).toBe('function');

      const free = { topWritten: false, baseWritten: false, topRefused: false, baseRefused: false };
      expect(await answers(top, base)).toEqual(free);

      const qemu = pausedQemu(top);
      try {
        // QEMU locks the top image first and its backing file a moment later: wait for both, or the
        // base can look free for a few milliseconds (seen once in CI).
        const locked = async () => (await lockEntries(top)).length > 0 && (await lockEntries(base)).length > 0;
        for (let i = 0; i < 200 && !(await locked()); i++) await new Promise((r) => setTimeout(r, 50));
        const running = { topWritten: true, baseWritten: false, topRefused: true, baseRefused: true };
        expect(await answers(top, base)).toEqual(running);
        // The same through /proc/locks.
        process.env.QLAYER_NO_NATIVE = '1';
        resetNativeBinding();
        expect(nativeBinding()).toBeNull();
        expect(await answers(top, base)).toEqual(running);
      } finally {
        qemu.kill('SIGKILL');
        await qemu;
      }
      expect(await answers(top, base)).toEqual(free);
      delete process.env.QLAYER_NO_NATIVE;
      resetNativeBinding();
      expect(await answers(top, base)).toEqual(free);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, 60_000);
});

describe('qlayer holds QEMU writer locks while it writes an image', () => {
  it('a guest start and qemu-img refuse the image until qlayer closes it; qlayer itself is not refused by its own locks', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qlayer-locks-'));
    try {
      const { base, top } = await chainIn(dir);
      const startGuest = () => pausedQemu(top, { timeout: 20_000 });

      const image = await Qcow2Image.open(top, { writable: true });
      try {
        await image.write(new Uint8Array(4096).fill(7), 0);
        // QEMU's own words for an image another writer holds.
        const guest = await startGuest();
        expect(guest.exitCode).not.toBe(0);
        expect(guest.stderr).toMatch(/Failed to get "write" lock/);
        const info = await execa('qemu-img', ['info', top], { reject: false });
        expect(info.exitCode).not.toBe(0);
        expect(info.stderr).toMatch(/Failed to get shared "write" lock/);
        // libvirt's start of a domain on it fails the same way (what `virsh start` of a desktop
        // meets while a recompose writes its user delta).
        const domain = `qlayer-lockprobe-${process.pid}`;
        const xml = join(dir, 'domain.xml');
        writeFileSync(
          xml,
          `<domain type='qemu'><name>${domain}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os>` +
            `<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='${top}'/><target dev='vda' bus='virtio'/></disk></devices></domain>`,
        );
        const created = await execa('virsh', ['-c', 'qemu:///system', 'create', xml, '--paused'], { reject: false });
        if (created.exitCode === 0) await execa('virsh', ['-c', 'qemu:///system', 'destroy', domain], { reject: false });
        expect(created.exitCode).not.toBe(0);
        expect(created.stderr).toMatch(/Failed to get "write" lock/);
        // -U reads it anyway, as with a running guest's image.
        expect((await execa('qemu-img', ['info', '-U', '--output=json', top])).stdout).toMatch(/"virtual-size": 16777216/);
        // Another qlayer process is refused too; this one is not refused by its own locks.
        const resize = await execa(process.execPath, ['bin/qlayer.js', 'image', 'resize', top, '32M', '--json'], { reject: false });
        expect([resize.exitCode, JSON.parse(resize.stdout).error.code]).toEqual([1, 'image.in-use']);
        await assertNotLocked(top);
        expect(await writerLocks(top)).toEqual([]);
        // The base is only read: QEMU may still open it (qemu-img info of it works).
        await execa('qemu-img', ['info', base]);
      } finally {
        await image.close();
      }
      // Closed: the locks are gone and a guest starts.
      expect(await lockEntries(top)).toEqual([]);
      const qemu = startGuest();
      try {
        for (let i = 0; i < 200 && (await lockEntries(top)).length === 0; i++) await new Promise((r) => setTimeout(r, 50));
        expect((await writerLocks(top)).length).toBeGreaterThan(0);
        // ... and now qlayer refuses to write it.
        await expect(Qcow2Image.open(top, { writable: true })).rejects.toMatchObject({ code: 'image.in-use' });
      } finally {
        qemu.kill('SIGKILL');
        await qemu;
      }
      await execa('qemu-img', ['check', '-q', top]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }, 60_000);

  it('without the native helper nothing is held (as QEMU without OFD locks), and the write still works', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qlayer-locks-'));
    try {
      const top = join(dir, 'top.qcow2');
      await execa('qemu-img', ['create', '-q', '-f', 'qcow2', top, '16M']);
      process.env.QLAYER_NO_NATIVE = '1';
      resetNativeBinding();
      const image = await Qcow2Image.open(top, { writable: true });
      try {
        await image.write(new Uint8Array(512).fill(1), 0);
        expect(await lockEntries(top)).toEqual([]);
      } finally {
        await image.close();
      }
      await execa('qemu-img', ['check', '-q', top]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
