/**
 * Moving a VM into the store and out again: adopt makes an existing libvirt domain a desktop
 * (its disk becomes a base), release writes a desktop's composed disk out as one image and
 * hands the domain back to it.
 */
import { rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { convertImage } from '../chain/convert.js';
import { importBase, removeBase } from './bases.js';
import { assertNotInUse, idleDesktopRecord } from './desktop-guards.js';
import { desktopHandle, desktopRecord } from './desktop-handle.js';
import { createDesktop } from './desktop-lifecycle.js';
import { LayerError } from './errors.js';
import { checkName } from './names.js';
import type { DesktopRuntime } from './runtime.js';
import type { Store } from './store.js';

export interface AdoptResult {
  desktop: string;
  domain: string;
  base: string;
  /** The VM's original disk, left untouched. */
  importedFrom: string;
}

/**
 * Make an existing shut-off VM a desktop: its first disk's content (a qcow2 chain, flattened,
 * or a raw file) becomes a new base NAME in the store, the desktop NAME gets an empty apps
 * layer and a fresh user delta on it, and the domain is redefined on that chain keeping every
 * other setting and its own name. The original disk file is only read. A failure part-way
 * removes what adopt made (the domain is redefined last, so it is never left half-changed).
 */
export async function adoptDesktop(
  store: Store,
  runtime: DesktopRuntime,
  domain: string,
  options: { as?: string; allowedDirectories?: string[]; progress?: (done: number, total: number) => void } = {},
): Promise<AdoptResult> {
  const name = options.as ?? domain;
  try {
    checkName('desktop', name);
  } catch (error) {
    if (options.as === undefined) throw new LayerError('adopt.bad-name', `domain name ${JSON.stringify(domain)} is no desktop name: give one with --as NAME (1-63 of a-z 0-9 . _ - starting with a letter or digit)`);
    throw error;
  }
  if (!runtime.describeDomain || !runtime.adopt) throw new LayerError('adopt.unsupported', 'this runtime cannot adopt domains');
  const state = await store.readState();
  const adoptedAlready = Object.entries(state.desktops).find(([, r]) => r.domain === domain)?.[0];
  if (adoptedAlready !== undefined || domain.startsWith(`qlayer-${store.id}-`)) {
    throw new LayerError('adopt.already-desktop', `domain ${domain} is already a desktop of this store${adoptedAlready ? ` (${adoptedAlready})` : ''}`);
  }
  if (state.desktops[name]) throw new LayerError('desktop.exists', `a desktop named ${name} exists already; adopt ${domain} under another name with --as NAME`);
  if (state.bases[name]) throw new LayerError('base.exists', `the store already has a base named ${name}; adopt ${domain} under another name with --as NAME`);
  const info = await runtime.describeDomain(domain);
  if (!info.exists) throw new LayerError('adopt.not-found', `libvirt knows no domain ${domain}`);
  if (info.running) throw new LayerError('adopt.running', `domain ${domain} is running; shut it down first (virsh shutdown ${domain}): its disk must not change while it is copied`);
  if (!info.disk) throw new LayerError('adopt.no-disk', `domain ${domain} has no disk to make a base of`);
  if (info.disk.type !== 'file' || info.disk.file === undefined) {
    throw new LayerError('adopt.not-a-file', `domain ${domain}'s first disk is of type ${info.disk.type ?? 'unknown'}, not a file; qlayer adopts file disks (qcow2 or raw)`);
  }
  const format = info.disk.format;
  if (format !== 'qcow2' && format !== 'raw') throw new LayerError('adopt.format', `domain ${domain}'s first disk is ${format ?? 'of no stated format'}; qlayer adopts qcow2 and raw disks`);
  const file = info.disk.file;
  if (!existsSync(file)) throw new LayerError('adopt.no-disk', `domain ${domain}'s disk ${file} does not exist`);

  // A qcow2 disk's backing files usually sit beside it: its folder is allowed, as are the user's --allow folders.
  await importBase(store, name, file, { format, allowedDirectories: [dirname(file), ...(options.allowedDirectories ?? [])], ...(options.progress ? { progress: options.progress } : {}) });
  try {
    await createDesktop(store, name, name);
    try {
      await store.update((s) => {
        desktopRecord(s, name).domain = domain;
      });
      await runtime.adopt(desktopHandle(store, await store.readState(), name));
    } catch (error) {
      await store.update(async (s) => {
        const record = s.desktops[name];
        if (record) await rm(store.path(record.dir), { recursive: true, force: true });
        delete s.desktops[name];
      });
      throw error;
    }
  } catch (error) {
    await removeBase(store, name).catch(() => undefined);
    throw error;
  }
  return { desktop: name, domain, base: name, importedFrom: file };
}

export interface ReleaseResult {
  desktop: string;
  domain: string;
  image: string;
  format: 'qcow2' | 'raw';
  virtualSize: number;
}

/**
 * The reverse of adopt, for any desktop: its composed disk (user <- apps <- base) is written
 * out as one image, the desktop's domain is redefined on it (every other setting kept), and
 * the desktop leaves the store (its apps and user layers are deleted; the base stays for the
 * desktops that share it, `base remove` takes it out). Refused while it runs or has an
 * unfinished recompose or assign.
 */
export async function releaseDesktop(
  store: Store,
  runtime: DesktopRuntime,
  name: string,
  output: string,
  options: { format?: 'qcow2' | 'raw'; progress?: (done: number, total: number) => void } = {},
): Promise<ReleaseResult> {
  if (!runtime.redefineOn) throw new LayerError('release.unsupported', 'this runtime keeps no domain definitions');
  const to = resolve(output); // libvirt resolves nothing relative
  return store.withLock(async () => {
    const state = await store.readState();
    const record = idleDesktopRecord(state, name);
    if (record.operation) throw new LayerError('desktop.operation-pending', `desktop ${name} has an unfinished ${record.operation.kind}; undo it first (qlayer desktop assign --abort ${name})`);
    // home disk (issue 13): release would delete it with the desktop's folder while the domain still names it.
    if (record.home) throw new LayerError('release.has-home', `desktop ${name} has a home disk (${store.path(record.home.file)}); release does not carry it out of the store yet, and would delete it: copy /home out first`);
    const handle = desktopHandle(store, state, name);
    await assertNotInUse(runtime, handle, 'release');
    // convert truncates its output: never over a file that exists.
    if (existsSync(to)) throw new LayerError('release.exists', `${to} exists already; release writes a new file`);
    const format = options.format ?? (/\.(raw|img)$/i.test(to) ? 'raw' : 'qcow2');
    const result = await convertImage(handle.userPath, to, {
      sourceFormat: 'qcow2',
      outputFormat: format,
      allowedDirectories: [store.root],
      sync: true,
      ...(options.progress ? { progress: options.progress } : {}),
    });
    let domain: string;
    try {
      domain = await runtime.redefineOn!(handle, { path: to, format });
    } catch (error) {
      await rm(to, { force: true }); // the desktop stays as it was
      throw error;
    }
    await rm(store.path(record.dir), { recursive: true, force: true });
    delete state.desktops[name];
    for (const group of Object.values(state.groups ?? {})) {
      group.desktops = group.desktops.filter((d) => d !== name);
      group.pending = group.pending.filter((d) => d !== name);
    }
    await store.writeState(state);
    return { desktop: name, domain, image: to, format, virtualSize: result.virtualSize };
  });
}
