import { createHash } from 'node:crypto';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';
import { buildApp, listApps, PAYLOAD_ALIGNMENT, resolveApp } from '../../src/layers/app.js';
import { Store } from '../../src/layers/store.js';

const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

function sampleApp(): string {
  const dir = mkdtempSync(join(tmpdir(), 'qlayer-appsrc-'));
  mkdirSync(join(dir, 'bin'));
  mkdirSync(join(dir, 'share', 'doc'), { recursive: true });
  writeFileSync(join(dir, 'bin', 'hello'), '#!/bin/sh\necho hello\n');
  chmodSync(join(dir, 'bin', 'hello'), 0o755);
  writeFileSync(join(dir, 'share', 'doc', 'big.dat'), Buffer.alloc(100_000, 7));
  writeFileSync(join(dir, 'empty'), '');
  return dir;
}

describe('store', () => {
  it('writes the state atomically and reads it back', async () => {
    const store = await Store.open(mkdtempSync(join(tmpdir(), 'qlayer-store-')));
    const state = await store.readState();
    expect(state).toEqual({ format: 'qlayer-store/1', bases: {}, desktops: {} });
    state.bases.b = { file: 'bases/b.qcow2', virtualSize: 1, importedFrom: '/x', importedAt: 'now' };
    await store.writeState(state);
    expect(JSON.parse(readFileSync(store.path('state.json'), 'utf8')).bases.b.file).toBe('bases/b.qcow2');
  });

  it('refuses a second writer while the first holds the lock, and takes over a stale lock', async () => {
    const store = await Store.open(mkdtempSync(join(tmpdir(), 'qlayer-store-')));
    // Another live process holds the lock.
    const holder = execa('sleep', ['30']);
    writeFileSync(store.path('lock'), `${holder.pid}\n`);
    await expect(store.withLock(async () => 1)).rejects.toThrow(/in use by another qlayer \(pid \d+\)/);
    holder.kill();
    await holder.catch(() => {});
    // Now the holder is dead: the lock is stale and is taken over.
    await expect(store.withLock(async () => 2)).resolves.toBe(2);
  });

  it('refuses a state file it cannot read, naming it', async () => {
    const store = await Store.open(mkdtempSync(join(tmpdir(), 'qlayer-store-')));
    writeFileSync(store.path('state.json'), '{"format": "other"}');
    await expect(store.readState()).rejects.toThrow(/format "other"/);
  });
});

describe('app build', () => {
  it('makes a manifest and a 4 KiB-aligned payload whose slices hash to each file', async () => {
    const store = await Store.open(mkdtempSync(join(tmpdir(), 'qlayer-store-')));
    const source = sampleApp();
    const manifest = await buildApp(store, { name: 'hello', sourceDir: source });
    expect(manifest.prefix).toBe('/opt/hello');
    expect(manifest.files.map((f) => f.path)).toEqual(['/opt/hello/bin/hello', '/opt/hello/empty', '/opt/hello/share/doc/big.dat']);
    expect(manifest.directories.map((d) => d.path)).toEqual(['/opt/hello', '/opt/hello/bin', '/opt/hello/share', '/opt/hello/share/doc']);
    const payload = readFileSync(store.path('apps', 'hello', manifest.version, 'payload.bin'));
    expect(payload.length % PAYLOAD_ALIGNMENT).toBe(0);
    for (const file of manifest.files) {
      expect(file.payloadOffset % PAYLOAD_ALIGNMENT).toBe(0);
      const original = readFileSync(join(source, file.path.replace('/opt/hello/', '')));
      expect(sha256(payload.subarray(file.payloadOffset, file.payloadOffset + file.size))).toBe(sha256(original));
      expect(file.sha256).toBe(sha256(original));
    }
    expect(manifest.files[0]!.mode).toBe(0o755);

    // Same content, no --version: the same version, nothing rebuilt.
    const again = await buildApp(store, { name: 'hello', sourceDir: source });
    expect(again.version).toBe(manifest.version);
    // An explicit version that exists with other content is refused: versions are immutable.
    await buildApp(store, { name: 'hello', sourceDir: source, version: '1.0' });
    writeFileSync(join(source, 'empty'), 'now with content');
    await expect(buildApp(store, { name: 'hello', sourceDir: source, version: '1.0' })).rejects.toThrow(/immutable/);
    expect((await listApps(store)).hello!.map((m) => m.version).sort()).toEqual(['1.0', manifest.version].sort());
    expect((await resolveApp(store, 'hello@1.0')).version).toBe('1.0');
    await expect(resolveApp(store, 'hello@2.0')).rejects.toThrow(/has no version 2.0/);
    await expect(resolveApp(store, 'nope')).rejects.toThrow(/no app named nope/);
  });

  it('refuses symlinks and bad names, leaving nothing behind', async () => {
    const store = await Store.open(mkdtempSync(join(tmpdir(), 'qlayer-store-')));
    const source = sampleApp();
    symlinkSync('/etc/passwd', join(source, 'link'));
    await expect(buildApp(store, { name: 'linky', sourceDir: source })).rejects.toThrow(/symlink/);
    expect(await listApps(store)).toEqual({});
    await expect(buildApp(store, { name: '../evil', sourceDir: source })).rejects.toThrow(/not allowed/);
  });
});
