/**
 * The stable apps.qcow2 link a desktop's domain names (docs/design.md): made with the desktop,
 * made for a desktop from before it, repointed atomically, and read through by qemu-img as by
 * libvirt's explicit chain.
 */
import { lstat, readlink, rm } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { importBase } from '../../src/layers/bases.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop } from '../../src/layers/desktop-lifecycle.js';
import { APPS_LINK, pointAppsLink } from '../../src/layers/recompose.js';
import { Store } from '../../src/layers/store.js';
import { createImage } from '../../src/qcow2/create.js';
import { qemuCheck, qemuImg, qemuInfo, qemuReadRaw, qemuReadRawExplicit, tempDir } from '../helpers/qemu.js';

let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let desktopDir: string;

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-apps-link-'));
  store = await Store.open(join(dir, 'store'));
  await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'os.qcow2'), '8M']);
  await importBase(store, 'os', join(dir, 'os.qcow2'), { format: 'qcow2' });
  await createDesktop(store, 'd', 'os');
  desktopDir = store.path('desktops', 'd');
});
afterAll(async () => cleanup?.());

describe('the apps.qcow2 link', () => {
  it('is made with the desktop, relative, and the handle names it as the middle of the chain', async () => {
    expect(await readlink(join(desktopDir, APPS_LINK))).toBe('apps.0.qcow2');
    const handle = desktopHandle(store, await store.readState(), 'd');
    expect(handle.chain.map((l) => l.path)).toEqual([join(desktopDir, 'user.qcow2'), join(desktopDir, APPS_LINK), store.path('bases', 'os.qcow2')]);
    expect(handle.storeRoot).toBe(store.root);
  });

  it('qemu-img reads a chain through it (info --backing-chain, check)', async () => {
    const info = (await qemuInfo(join(desktopDir, APPS_LINK), ['--backing-chain'])) as unknown as Array<{ filename: string }>;
    // The base resolves from the link's folder, which is the target's: the same file.
    expect(info.map((i) => resolve(i.filename))).toEqual([join(desktopDir, APPS_LINK), store.path('bases', 'os.qcow2')]);
    expect((await qemuCheck(join(desktopDir, APPS_LINK))).exitCode).toBe(0);
    // The explicit chain libvirt builds, the user delta over the link, reads as the header chain.
    // (qemu-img info opens no backing files, so it takes no backing options: convert does.)
    const explicit = await qemuReadRawExplicit(join(desktopDir, 'user.qcow2'), join(desktopDir, APPS_LINK));
    expect(explicit.equals(await qemuReadRaw(join(desktopDir, 'user.qcow2')))).toBe(true);
  });

  it('a desktop made before the link gets one at its generation; an existing link is left alone', async () => {
    await rm(join(desktopDir, APPS_LINK));
    await store.update((s) => {
      s.desktops.d!.appsGeneration = 0;
    });
    desktopHandle(store, await store.readState(), 'd');
    expect(await readlink(join(desktopDir, APPS_LINK))).toBe('apps.0.qcow2');
    // Mid-recompose the link may point ahead of the record already: not moved back.
    await createImage({ path: join(desktopDir, 'apps.1.qcow2'), backing: { path: '../../bases/os.qcow2', format: 'qcow2' } });
    await pointAppsLink(desktopDir, 1);
    desktopHandle(store, await store.readState(), 'd');
    expect(await readlink(join(desktopDir, APPS_LINK))).toBe('apps.1.qcow2');
  });

  it('is repointed by renaming a new link over it (no moment without one), and repointing again changes nothing', async () => {
    const before = await lstat(join(desktopDir, APPS_LINK));
    await pointAppsLink(desktopDir, 1);
    expect((await lstat(join(desktopDir, APPS_LINK))).ino).toBe(before.ino); // already right: untouched
    await pointAppsLink(desktopDir, 0);
    const after = await lstat(join(desktopDir, APPS_LINK));
    expect(after.isSymbolicLink()).toBe(true);
    expect(after.ino).not.toBe(before.ino); // a new link took its place
    expect(await readlink(join(desktopDir, APPS_LINK))).toBe('apps.0.qcow2');
    expect((await import('node:fs')).readdirSync(desktopDir).filter((f) => f.endsWith('.tmp'))).toEqual([]);
  });
});
