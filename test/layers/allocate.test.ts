import { mkdirSync, mkdtempSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';
import { allocationScript, removalScript } from '../../src/layers/allocate.js';
import type { AppManifest } from '../../src/layers/app.js';
import { runGuestScript, shellQuote, type GuestShell } from '../../src/layers/guest-script.js';

/** The scripts run under busybox sh here, exactly as in the test guest, against a scratch folder. */
const busybox: GuestShell = {
  async exec(path, args, options) {
    const result = await execa('busybox', ['sh', ...args], { input: options?.input as string, reject: false });
    void path;
    return { exitCode: result.exitCode ?? 1, stdout: result.stdout, stderr: result.stderr };
  },
};

function manifestUnder(root: string): AppManifest {
  const prefix = join(root, "opt/it's app");
  return {
    format: 'qlayer-app/1',
    name: 'demo',
    version: '1',
    prefix,
    directories: [
      { path: prefix, mode: 0o755, uid: 0, gid: 0 },
      { path: `${prefix}/bin`, mode: 0o750, uid: 0, gid: 0 },
    ],
    files: [
      { path: `${prefix}/bin/tool`, size: 12_345, mode: 0o755, uid: 0, gid: 0, sha256: '', payloadOffset: 0 },
      { path: `${prefix}/empty`, size: 0, mode: 0o600, uid: 0, gid: 0, sha256: '', payloadOffset: 16384 },
      { path: `${prefix}/big`, size: (3 << 20) + 5, mode: 0o644, uid: 0, gid: 0, sha256: '', payloadOffset: 16384 },
    ],
    payloadSize: 16384 + (3 << 20) + 4096,
    createdAt: '',
  };
}

describe('guest scripts (run by busybox sh)', () => {
  it('quotes anything', async () => {
    const nasty = `a'b"c $(x) \`y\` \\ z`;
    const out = await runGuestScript(busybox, `printf %s ${shellQuote(nasty)}`, 'quote');
    expect(out).toBe(nasty);
  });

  it('allocate makes zero-filled files of exact sizes and modes, is rerunnable, and refuses foreign files', async () => {
    const root = mkdtempSync(join(tmpdir(), 'qlayer-alloc-'));
    const manifest = manifestUnder(root);
    await runGuestScript(busybox, allocationScript([manifest]), 'allocate');
    for (const file of manifest.files) {
      const info = statSync(file.path);
      expect(info.size).toBe(file.size);
      expect(info.mode & 0o7777).toBe(file.mode);
      expect(readFileSync(file.path).every((b) => b === 0)).toBe(true);
    }
    expect(statSync(`${manifest.prefix}/bin`).mode & 0o7777).toBe(0o750);
    // An interrupted assign left the placeholders: running again is fine.
    await runGuestScript(busybox, allocationScript([manifest]), 'allocate');
    // A user file of another size at an app path is never overwritten.
    writeFileSync(manifest.files[0]!.path, 'user data');
    await expect(runGuestScript(busybox, allocationScript([manifest]), 'allocate')).rejects.toThrow(/already has .*bin\/tool/);
    expect(readFileSync(manifest.files[0]!.path, 'utf8')).toBe('user data');
  });

  it('removal deletes the files and empty app folders, and keeps folders the user filled', async () => {
    const root = mkdtempSync(join(tmpdir(), 'qlayer-alloc-'));
    const manifest = manifestUnder(root);
    await runGuestScript(busybox, allocationScript([manifest]), 'allocate');
    mkdirSync(`${manifest.prefix}/mine`);
    writeFileSync(`${manifest.prefix}/mine/notes`, 'keep');
    await runGuestScript(busybox, removalScript([manifest]), 'remove');
    for (const file of manifest.files) expect(() => statSync(file.path)).toThrow();
    expect(() => statSync(`${manifest.prefix}/bin`)).toThrow();
    expect(readFileSync(`${manifest.prefix}/mine/notes`, 'utf8')).toBe('keep');
  });
});
