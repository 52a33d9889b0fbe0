import { readdirSync } from 'node:fs';
import { rename, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openChain } from '../../src/chain/chain.js';
import { importBase } from '../../src/layers/bases.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop, destroyDesktop } from '../../src/layers/desktop-lifecycle.js';
import { listDesktops, showDesktop } from '../../src/layers/desktop-views.js';
import { Store } from '../../src/layers/store.js';
import { qemuCheck, qemuCreate, qemuImg, qemuInfo, qemuIo, qemuRawHash, tempDir } from '../helpers/qemu.js';

describe('store: bases and desktops (no guest)', () => {
  let temp: { dir: string; cleanup: () => Promise<void> };
  let source: string;
  beforeAll(async () => {
    temp = await tempDir('qlayer-desktops-');
    // A two-layer source chain, so import must flatten it.
    const lower = join(temp.dir, 'lower.qcow2');
    source = join(temp.dir, 'upper.qcow2');
    await qemuCreate(lower, '32M');
    await qemuIo(lower, ['write -P 0x11 0 1M', 'write -P 0x22 8M 64k']);
    await qemuCreate(source, '', {}, { backing: 'lower.qcow2', backingFormat: 'qcow2' });
    await qemuIo(source, ['write -P 0x33 512k 1M']);
  });
  afterAll(async () => temp?.cleanup());

  it('base import flattens the chain into one read-only qcow2 with the same content', async () => {
    const store = await Store.open(join(temp.dir, 'store'));
    // A qcow2 header that names another file is not taken for qcow2 unless the user says so.
    await expect(importBase(store, 'os', source)).rejects.toMatchObject({ code: 'base.format-ambiguous', message: expect.stringMatching(/names a backing file; say -f qcow2/) });
    expect(Object.keys((await store.readState()).bases)).toEqual([]);
    const record = await importBase(store, 'os', source, { format: 'qcow2' });
    const path = store.path(record.file);
    expect(await qemuRawHash(path)).toBe(await qemuRawHash(source));
    const info = await qemuInfo(path);
    expect(info['backing-filename']).toBeUndefined();
    expect((await stat(path)).mode & 0o777).toBe(0o440); // owner and group only: bases can hold anything the guest had
    expect((await qemuCheck(path)).exitCode).toBe(0);
    await expect(importBase(store, 'os', source, { format: 'qcow2' })).rejects.toThrow(/already has a base named os/);
    await expect(importBase(store, 'other', join(temp.dir, 'missing.qcow2'))).rejects.toThrow();
    // An empty file, or one too small for any disk, is not a base; nothing is left behind.
    const empty = join(temp.dir, 'empty.raw');
    await writeFile(empty, '');
    await expect(importBase(store, 'empty', empty)).rejects.toMatchObject({ code: 'base.too-small', message: expect.stringMatching(/is 0 bytes: too small/) });
    await writeFile(empty, Buffer.alloc(4096));
    await expect(importBase(store, 'empty', empty, { format: 'raw' })).rejects.toMatchObject({ code: 'base.too-small' });
    expect(readdirSync(store.path('bases'))).toEqual(['os.qcow2']);
    expect(Object.keys((await store.readState()).bases)).toEqual(['os']);
  });

  it('a desktop is base <- apps.0 <- user with relative names, and the store can move', async () => {
    const store = await Store.open(join(temp.dir, 'store'));
    await createDesktop(store, 'alice', 'os');
    await expect(createDesktop(store, 'alice', 'os')).rejects.toThrow(/exists already/);
    await expect(createDesktop(store, 'bob', 'nope')).rejects.toThrow(/no base named nope/);
    const view = await showDesktop(store, null, 'alice');
    expect(view.state).toBe('stopped');
    expect((await qemuInfo(view.paths.user))['backing-filename']).toBe('apps.0.qcow2');
    expect((await qemuInfo(view.paths.apps))['backing-filename']).toBe('../../bases/os.qcow2');

    // Move the whole store: every chain still resolves, through qemu-img and our engine.
    const moved = join(temp.dir, 'moved-store');
    await rename(store.root, moved);
    const again = await Store.open(moved);
    const handle = desktopHandle(again, await again.readState(), 'alice');
    expect(handle.userPath.startsWith(moved)).toBe(true);
    const chainInfo = await qemuImg(['info', '--backing-chain', '--output=json', handle.userPath]);
    expect((JSON.parse(chainInfo.stdout) as unknown[]).length).toBe(3);
    const chain = await openChain(handle.userPath, { allowedDirectories: [moved] });
    try {
      expect(chain.layers.map((l) => l.path.slice(moved.length))).toEqual(['/desktops/alice/user.qcow2', '/desktops/alice/apps.0.qcow2', '/bases/os.qcow2']);
    } finally {
      await chain.close();
    }
    expect(await qemuRawHash(handle.userPath)).toBe(await qemuRawHash(source));
    expect((await listDesktops(again, null)).map((d) => d.name)).toEqual(['alice']);
    await destroyDesktop(again, null, 'alice');
    expect(await listDesktops(again, null)).toEqual([]);
    await expect(showDesktop(again, null, 'alice')).rejects.toThrow(/no desktop named alice/);
  });
});
