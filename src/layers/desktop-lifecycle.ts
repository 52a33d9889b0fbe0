/**
 * A desktop's life in the store: create (apps and user layers on a base, and the runtime's
 * definition), start, stop, destroy.
 */
import { mkdir, rm } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import { createImage } from '../qcow2/create.js';
import { ensureRunning } from './desktop-boot.js';
import { assertNotInUse, idleDesktopRecord } from './desktop-guards.js';
import { desktopHandle, desktopRecord } from './desktop-handle.js';
import { LayerError } from './errors.js';
import { createHomeDisk, HOME_FILE, HOME_LABEL } from './home-disk.js'; // home disk (issue 13)
import type { HomeSeed } from './home-seed.js';
import { quiet, type Log } from './log.js';
import { checkName } from './names.js';
import { applyPendingBeforeStart } from './pending-boot-apply.js';
import { appsLayerName, ensureAppsLinkSync, USER_LAYER } from './recompose.js';
import type { DesktopRuntime, DesktopTemplate } from './runtime.js';
import { newDesktopRecord, type DesktopRecord } from './state.js';
import type { Store } from './store.js';

/** A new desktop's record, and what its home disk was seeded with (absent: no home disk, or nothing to seed). */
export type CreatedDesktop = DesktopRecord & { homeSeed?: HomeSeed };

/**
 * Create a desktop: an empty apps layer on the base and a user delta on that. With a runtime
 * that keeps definitions, its domain is defined too (hardware from `template`, else the
 * runtime's defaults); a definition libvirt refuses leaves no desktop behind. With `homeBytes`,
 * a home disk seeded with the base's /home (createHomeDisk); a /home too big for it is refused
 * (home.too-small) with nothing left behind.
 */
export async function createDesktop(
  store: Store,
  name: string,
  base: string,
  options: { runtime?: DesktopRuntime | null; template?: DesktopTemplate; homeBytes?: number; log?: Log } = {},
): Promise<CreatedDesktop> {
  checkName('desktop', name);
  return store.withLock(async () => {
    const state = await store.readState();
    if (state.desktops[name]) throw new LayerError('desktop.exists', `a desktop named ${name} exists already`);
    if (state.groups?.[name]) throw new LayerError('desktop.name-taken', `${name} is already a group's name; a desktop needs a name of its own`);
    const baseRecord = state.bases[base];
    if (!baseRecord) throw new LayerError('base.not-found', `no base named ${base} (import one with: qlayer base import ${base} IMAGE)`);
    const dirRelative = join('desktops', name);
    const dir = store.path(dirRelative);
    await mkdir(dir, { recursive: true });
    let homeSeed: HomeSeed | null = null;
    try {
      // Relative backing names: the store can move to another folder or host.
      await createImage({ path: join(dir, appsLayerName(0)), backing: { path: relative(dir, store.path(baseRecord.file)), format: 'qcow2' } });
      await createImage({ path: join(dir, USER_LAYER), backing: { path: appsLayerName(0), format: 'qcow2' } });
      ensureAppsLinkSync(dir, 0);
      // home disk (issue 13): beside the chain, in no chain.
      if (options.homeBytes !== undefined) homeSeed = await createHomeDisk(join(dir, HOME_FILE), options.homeBytes, { base: store.path(baseRecord.file), log: options.log ?? quiet });
    } catch (error) {
      await rm(dir, { recursive: true, force: true });
      throw error;
    }
    const record = newDesktopRecord(base, dirRelative);
    if (options.homeBytes !== undefined) record.home = { file: join(dirRelative, HOME_FILE), size: options.homeBytes, label: HOME_LABEL, createdAt: record.createdAt }; // home disk (issue 13)
    state.desktops[name] = record;
    try {
      await options.runtime?.define?.(desktopHandle(store, state, name), options.template);
    } catch (error) {
      await rm(dir, { recursive: true, force: true });
      throw error;
    }
    await store.writeState(state);
    return homeSeed ? { ...record, homeSeed } : record;
  });
}

export async function startDesktop(store: Store, runtime: DesktopRuntime, name: string): Promise<void> {
  // A change waiting for this start is applied first (also without the hook installed).
  await applyPendingBeforeStart(store, runtime, name);
  const state = await store.readState();
  // A change that could not be applied stays pending: the desktop starts as it was (as with the hook).
  if (desktopRecord(state, name).recompose) idleDesktopRecord(state, name);
  await ensureRunning(runtime, desktopHandle(store, state, name), name, quiet);
}

export async function stopDesktop(store: Store, runtime: DesktopRuntime, name: string): Promise<void> {
  const state = await store.readState();
  const handle = desktopHandle(store, state, name);
  if (await runtime.isRunning(handle)) await runtime.stop(handle);
}

export async function destroyDesktop(store: Store, runtime: DesktopRuntime | null, name: string): Promise<void> {
  await store.withLock(async () => {
    const state = await store.readState();
    const record = desktopRecord(state, name);
    // rebase (issue 13): its staging desktop and new chain would be left behind.
    if (record.rebase) throw new LayerError('desktop.rebase-pending', `desktop ${name} has an unfinished rebase; finish or undo it first: qlayer desktop rebase ${name} --resume`);
    const handle = desktopHandle(store, state, name);
    await assertNotInUse(runtime, handle, 'destroy');
    await runtime?.undefine?.(handle); // before the files: a definition on missing files helps nobody
    await rm(store.path(record.dir), { recursive: true, force: true });
    if (record.home) await rm(dirname(store.path(record.home.file)), { recursive: true, force: true }); // home disk (issue 13): its folder may outlive a rebased chain's
    delete state.desktops[name];
    await store.writeState(state);
  });
}
