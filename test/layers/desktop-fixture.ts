/**
 * An offline desktop for the recompose tests: a store with an ext4 base, one desktop
 * (apps.0 <- user), a user file and an app built, with the guest's side (allocating
 * placeholders) done by debugfs on the chain (test/helpers/offline-guest.ts).
 */
import { mkdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { expect } from 'vitest';
import { openChain } from '../../src/chain/chain.js';
import { openGuestFilesystem } from '../../src/fs/index.js';
import { nodeFileSystem } from '../../src/io/host-file.js';
import { createImage } from '../../src/qcow2/create.js';
import { buildApp, type AppManifest } from '../../src/layers/app.js';
import { locatePlaceholders } from '../../src/layers/locate.js';
import type { RecomposeContext } from '../../src/layers/recompose.js';
import { newDesktopRecord, type DesktopRecord, type LocatedFile } from '../../src/layers/state.js';
import { Store } from '../../src/layers/store.js';
import { debugfsExtents, debugfsFlip, guestChange } from '../helpers/offline-guest.js';
import { qemuCheck, qemuImg, seededRandom } from '../helpers/qemu.js';

export const BLOCK = 4096;

export interface Desktop {
  store: Store;
  desktopDir: string;
  basePath: string;
  userPath: string;
  record: DesktopRecord;
  appSource: string;
  manifest: AppManifest;
}

/** apps.0 over the store's base and a user delta over it, as createDesktop makes them. */
async function newDesktopImages(store: Store, name: string): Promise<{ desktopDir: string; userPath: string }> {
  const desktopDir = store.path('desktops', name);
  await mkdir(desktopDir, { recursive: true });
  await createImage({ path: join(desktopDir, 'apps.0.qcow2'), backing: { path: '../../bases/base.qcow2', format: 'qcow2' } });
  const userPath = join(desktopDir, 'user.qcow2');
  await createImage({ path: userPath, backing: { path: 'apps.0.qcow2', format: 'qcow2' } });
  await symlink('apps.0.qcow2', join(desktopDir, 'apps.qcow2'));
  return { desktopDir, userPath };
}

/** Another desktop on the same store, base and app. */
export async function addDesktop(first: Desktop, name: string): Promise<Desktop> {
  const { desktopDir, userPath } = await newDesktopImages(first.store, name);
  return { ...first, desktopDir, userPath, record: newDesktopRecord('base', `desktops/${name}`) };
}

export function randomContent(seed: number, length: number): Buffer {
  const random = seededRandom(seed);
  const data = Buffer.alloc(length);
  for (let i = 0; i < length; i++) data[i] = Math.floor(random() * 256);
  return data;
}

export interface DesktopOptions {
  /** The base filesystem's size (default 64 MiB). */
  baseBytes?: number;
  /** The app's files, relative path -> size (default: three files of 300 KB, 100 KB and 5 KB). */
  appFiles?: Record<string, number>;
  /** Where the store goes (default ROOT/store). */
  storeDir?: string;
}

const DEFAULT_APP = { 'bin/tool': 300_000, 'data.bin': 100_000, README: 5_000 };

/** A store with an ext4 base, one desktop (apps.0 <- user), a user file, and an app built. */
export async function makeDesktop(root: string, options: DesktopOptions = {}): Promise<Desktop> {
  const store = await Store.open(options.storeDir ?? join(root, 'store'));
  const rootfs = join(root, 'rootfs');
  await mkdir(join(rootfs, 'home', 'user'), { recursive: true });
  await mkdir(join(rootfs, 'etc'), { recursive: true });
  await writeFile(join(rootfs, 'home', 'user', 'notes.txt'), randomContent(1, 50_000));
  await writeFile(join(rootfs, 'etc', 'hostname'), 'desktop\n');
  const baseRaw = join(root, 'base.raw');
  await execa('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-d', rootfs, baseRaw, `${Math.round((options.baseBytes ?? 64 << 20) / 1024)}k`]);
  const basePath = store.path('bases', 'base.qcow2');
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', baseRaw, basePath]);

  const { desktopDir, userPath } = await newDesktopImages(store, 'alice');

  // The user writes a file in the guest before any app arrives.
  await writeFile(join(root, 'later.txt'), randomContent(2, 20_000));
  await guestChange(userPath, root, [`write ${join(root, 'later.txt')} /home/user/later.txt`]);

  const appSource = join(root, 'app-src');
  let seed = 3;
  for (const [path, size] of Object.entries(options.appFiles ?? DEFAULT_APP)) {
    await mkdir(join(appSource, path, '..'), { recursive: true });
    await writeFile(join(appSource, path), randomContent(seed++, size));
  }
  const manifest = await buildApp(store, { name: 'app', sourceDir: appSource, version: '1' });
  const record = newDesktopRecord('base', 'desktops/alice');
  return { store, desktopDir, basePath, userPath, record, appSource, manifest };
}

/** Allocate the app's placeholders "in the guest": written files whose blocks are then zeroed. */
export async function allocateOffline(desktop: Desktop, scratch: string): Promise<void> {
  const commands: string[] = [];
  for (const dir of desktop.manifest.directories.map((d) => d.path)) {
    const parts = dir.split('/').filter(Boolean);
    for (let i = 1; i <= parts.length; i++) commands.push(`mkdir /${parts.slice(0, i).join('/')}`);
  }
  for (const file of desktop.manifest.files) {
    const filler = join(scratch, `fill-${file.size}`);
    await writeFile(filler, Buffer.alloc(file.size, 0xa5)); // non-zero, so debugfs allocates every block
    commands.push(`write ${filler} ${file.path}`, `sif ${file.path} mode 0${(0o100000 | file.mode).toString(8)}`);
  }
  const unique = [...new Set(commands)].filter((c) => !/^mkdir \/(opt)?$/.test(c) || c === 'mkdir /opt');
  await guestChange(desktop.userPath, scratch, unique, async (rawPath, raw) => {
    // The guest writes zeros over every block, so they land in the user delta.
    const forced: Array<{ offset: number; length: number }> = [];
    for (const file of desktop.manifest.files) {
      for (const range of await debugfsExtents(rawPath, file.path, BLOCK)) {
        raw.fill(0, range.offset, range.offset + range.length);
        forced.push(range);
      }
    }
    return { raw, forced };
  });
}

/**
 * Allocate the app's placeholders as fallocate(2) does in the guest: unwritten extents of the
 * exact size, no data written. Their blocks then get stale bytes in the user delta, like blocks
 * of long-deleted user files: the recompose must never let those show.
 */
export async function allocateFallocated(desktop: Desktop, scratch: string, options: { staleBytes?: boolean } = {}): Promise<void> {
  const commands: string[] = [];
  for (const dir of desktop.manifest.directories.map((d) => d.path)) {
    const parts = dir.split('/').filter(Boolean);
    for (let i = 1; i <= parts.length; i++) commands.push(`mkdir /${parts.slice(0, i).join('/')}`);
  }
  for (const file of desktop.manifest.files) {
    const blocks = Math.ceil(file.size / BLOCK);
    commands.push(`write /dev/null ${file.path}`, `sif ${file.path} mode 0${(0o100000 | file.mode).toString(8)}`);
    if (blocks > 0) commands.push(`fallocate ${file.path} 0 ${blocks - 1}`, `sif ${file.path} size ${file.size}`);
  }
  const unique = [...new Set(commands)].filter((c) => !/^mkdir \/(opt)?$/.test(c) || c === 'mkdir /opt');
  if (options.staleBytes === false) {
    await guestChange(desktop.userPath, scratch, unique);
    return;
  }
  await guestChange(desktop.userPath, scratch, unique, async (rawPath, raw) => {
    const forced: Array<{ offset: number; length: number }> = [];
    for (const file of desktop.manifest.files) {
      for (const range of await debugfsExtents(rawPath, file.path, BLOCK)) {
        for (let i = range.offset; i < range.offset + range.length; i++) raw[i] = (i * 7 + 13) & 0xff;
        forced.push(range);
      }
    }
    return { raw, forced };
  });
}

/** `expected` with debugfs's own flip of each placeholder applied: the oracle for a whole assign. */
export async function withDebugfsFlip(expected: Buffer, paths: string[], scratch: string): Promise<Buffer> {
  const raw = join(scratch, 'oracle.raw');
  await writeFile(raw, expected);
  for (const path of paths) await debugfsFlip(raw, path);
  return readFile(raw);
}

export async function locate(desktop: Desktop, manifests: AppManifest[]): Promise<LocatedFile[]> {
  const chain = await openChain(desktop.userPath, { allowedDirectories: [desktop.store.root] });
  try {
    return await locatePlaceholders(await openGuestFilesystem(chain), chain, manifests);
  } finally {
    await chain.close();
  }
}

export function context(desktop: Desktop, persisted: { json: string }, fs = nodeFileSystem): RecomposeContext {
  return {
    desktopDir: desktop.desktopDir,
    basePath: desktop.basePath,
    allowedDirectories: [desktop.store.root],
    record: desktop.record,
    payloadPath: (app) => desktop.store.path('apps', ...app.split('@'), 'payload.bin'),
    persist: async () => {
      persisted.json = JSON.stringify(desktop.record);
    },
    fs,
  };
}

/** What the disk must read after assigning: `before`, with each file's bytes (zero-padded) at its extents. */
export async function expectedAfterAssign(before: Buffer, located: LocatedFile[], source: string, prefix: string): Promise<Buffer> {
  const expected = Buffer.from(before);
  for (const file of located) {
    const content = await readFile(join(source, file.path.slice(prefix.length + 1)));
    for (const extent of file.extents) {
      expected.fill(0, extent.diskOffset, extent.diskOffset + extent.length);
      content.copy(expected, extent.diskOffset, extent.fileOffset, Math.min(content.length, extent.fileOffset + extent.length));
    }
  }
  return expected;
}

export async function assertCleanImages(paths: string[]): Promise<void> {
  for (const path of paths) {
    const report = await qemuCheck(path);
    expect({ path, corruptions: report.corruptions, leaks: report.leaks, exit: report.exitCode }).toEqual({ path, corruptions: 0, leaks: 0, exit: 0 });
  }
}

