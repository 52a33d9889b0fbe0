import { createHash } from 'node:crypto';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { describe, expect, it } from 'vitest';
import { buildApp, listApps, PAYLOAD_ALIGNMENT, resolveApp } from '../../src/layers/app.js';
import { Store } from '../../src/layers/store.js';
import { importBase } from '../../src/layers/bases.js';
import { processStartTime } from '../../src/io/process.js';

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

  it('refuses a second writer while the first holds the lock, naming the lock, the holder and the fix; takes over a stale lock', async () => {
    const store = await Store.open(mkdtempSync(join(tmpdir(), 'qlayer-store-')));
    const lock = store.path('lock');
    const holder = execa('sleep', ['30']);
    try {
      // A live holder, as this qlayer writes it (pid, start time, host) and as an older one did (pid only).
      for (const text of [`${holder.pid} ${processStartTime(holder.pid!)} ${hostname()}\n`, `${holder.pid}\n`]) {
        writeFileSync(lock, text);
        const refused = await store.withLock(async () => 1).catch((error: Error & { code?: string }) => error);
        expect(refused).toMatchObject({ code: 'store.locked' });
        const message = (refused as Error).message;
        expect(message).toContain(lock);
        expect(message).toContain(`pid ${holder.pid} (sleep 30)`);
        expect(message).toContain(`rm ${lock}`);
        expect(readFileSync(lock, 'utf8')).toBe(text); // untouched
      }
      // The same pid, but another start time: the pid was reused by another process. Stale.
      writeFileSync(lock, `${holder.pid} 1 ${hostname()}\n`);
      await expect(store.withLock(async () => readFileSync(lock, 'utf8'))).resolves.toBe(`${process.pid} ${processStartTime(process.pid)} ${hostname()}\n`);
      expect(existsSync(lock)).toBe(false);
      // Another host's lock cannot be judged from here: refused.
      writeFileSync(lock, `1 1 some-other-host\n`);
      await expect(store.withLock(async () => 1)).rejects.toThrow(/on host some-other-host/);
    } finally {
      holder.kill();
      await holder.catch(() => {});
    }
    // Now the holder is dead: the lock is stale and is taken over.
    writeFileSync(lock, `${holder.pid} ${processStartTime(process.pid)} ${hostname()}\n`);
    await expect(store.withLock(async () => 2)).resolves.toBe(2);
    // Two store operations of one process do not share the lock (the second would release it).
    await expect(store.withLock(() => store.withLock(async () => 3))).rejects.toThrow(/already held by this process/);
  });

  it('imports an empty 1 PiB base in about the time of its metadata, and sweeps a killed import\'s leftover', { timeout: 120_000 }, async () => {
    const store = await Store.open(mkdtempSync(join(tmpdir(), 'qlayer-store-')));
    const image = join(mkdtempSync(join(tmpdir(), 'qlayer-1p-')), 'empty.qcow2');
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', image, '1P']);
    // What a SIGKILLed import leaves: the next import of that name removes it first.
    writeFileSync(store.path('bases', 'huge.qcow2.importing'), 'half an image');
    const started = Date.now();
    const record = await importBase(store, 'huge', image, { format: 'qcow2' });
    expect(Date.now() - started).toBeLessThan(60_000); // generous: timings belong in the bench
    expect(record.virtualSize).toBe(2 ** 50);
    expect(existsSync(store.path('bases', 'huge.qcow2.importing'))).toBe(false);
    const check = await execa('qemu-img', ['check', store.path('bases', 'huge.qcow2')]);
    expect(check.exitCode).toBe(0);
  });

  it('gives each store its own id, kept across opens', async () => {
    const root = mkdtempSync(join(tmpdir(), 'qlayer-store-'));
    const a = await Store.open(root);
    expect(a.id).toMatch(/^[0-9a-f]{8}$/);
    expect((await Store.open(root)).id).toBe(a.id);
    expect(readFileSync(join(root, 'store-id'), 'utf8').trim()).toBe(a.id);
    expect((await Store.open(mkdtempSync(join(tmpdir(), 'qlayer-store-')))).id).not.toBe(a.id);
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

  it('sweeps the staging folders of dead builds (killed for real), and keeps a live build\'s', async () => {
    const store = await Store.open(mkdtempSync(join(tmpdir(), 'qlayer-store-')));
    const source = sampleApp();
    // A build killed half-way: a child process that stops inside buildApp's copy loop.
    const { writeFile: write } = await import('node:fs/promises');
    const big = join(source, 'share', 'doc', 'huge.dat');
    await write(big, Buffer.alloc(64 << 20, 3));
    const root = join(import.meta.dirname, '..', '..');
    const child = execa('node', ['--input-type=module', '-e', `
      import { Store } from ${JSON.stringify(join(root, 'dist', 'src', 'layers', 'store.js'))};
      import { buildApp } from ${JSON.stringify(join(root, 'dist', 'src', 'layers', 'app.js'))};
      const store = await Store.open(${JSON.stringify(store.root)});
      await buildApp(store, { name: 'killed', sourceDir: ${JSON.stringify(source)} });
    `], { reject: false });
    let staged: string[] = [];
    for (let i = 0; i < 2000 && staged.length === 0; i++) {
      await new Promise((r) => setTimeout(r, 5));
      staged = readdirSync(store.path('apps')).filter((e) => e.startsWith('.staging-killed-'));
    }
    expect(staged.length, 'the child build never made its staging folder').toBe(1);
    child.kill('SIGKILL');
    expect((await child).signal).toBe('SIGKILL');
    expect(readdirSync(store.path('apps'))).toContain(staged[0]);
    // A live build's folder (this process, its real start time) and an unreadable name stay.
    const live = `.staging-other-${process.pid}-${processStartTime(process.pid)}-0123abcd`;
    mkdirSync(store.path('apps', live));
    mkdirSync(store.path('apps', '.staging-weird'));
    // An older qlayer's name (pid, milliseconds) of a dead pid goes too.
    const older = `.staging-old-${child.pid}-1700000000000`;
    mkdirSync(store.path('apps', older));
    await buildApp(store, { name: 'hello', sourceDir: sampleApp() });
    const left = readdirSync(store.path('apps')).filter((e) => e.startsWith('.staging-'));
    expect(left.sort()).toEqual([live, '.staging-weird'].sort());
  });
});
