/**
 * QEMU's image locks asked two ways: fcntl(F_OFD_GETLK) through the native helper (native/locks.c)
 * and /proc/locks (the fallback without it). A paused QEMU runs a chain: it writes the top image
 * and only reads the base. Both ways must tell the two apart the same way, and see nothing once
 * QEMU is gone.
 */
import { mkdtempSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterEach, describe, expect, it } from 'vitest';
import { assertNotLocked, lockEntries, writerLocks } from '../../src/io/in-use.js';
import { nativeBinding, resetNativeBinding } from '../../src/io/native.js';

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

describe('QEMU image locks, native fcntl and /proc/locks', () => {
  it('agree on a chain a paused QEMU runs (top written, base only read), and on no QEMU', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qlayer-locks-'));
    try {
      const base = join(dir, 'base.qcow2');
      const top = join(dir, 'top.qcow2');
      await execa('qemu-img', ['create', '-q', '-f', 'qcow2', base, '16M']);
      await execa('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
      const native = nativeBinding();
      // Where the helper is built (npm ci builds it), it must answer: this test is about it.
      if (native !== null) expect(typeof native.lockTest).toBe('function');

      const free = { topWritten: false, baseWritten: false, topRefused: false, baseRefused: false };
      expect(await answers(top, base)).toEqual(free);

      const qemu = execa('qemu-system-x86_64', ['-accel', 'tcg', '-m', '64', '-display', 'none', '-monitor', 'none', '-drive', `file=${top},format=qcow2`, '-S'], { reject: false });
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
