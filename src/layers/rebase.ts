/**
 * `desktop rebase`: move a desktop onto another base (an OS update) keeping its apps and its
 * home disk. The new system chain (apps.0 <- user on the new base) is built in a folder of its
 * own beside the old one, as a staging desktop (a record of its own, NAME.rebase, with its own
 * domain); the desktop's apps are placed in it with the usual assign (allocate in the booted
 * staging guest, locate offline, recompose), and it is booted once more to hash every app file.
 * Only then does the desktop's record switch to the new chain, in one state write; the old chain
 * is deleted last.
 *
 * Each step is recorded in the desktop's record (`rebase`, phases planned -> staged -> assigned
 * -> verified -> switched) before the next begins. An interruption before the switch leaves the
 * old desktop whole (the staging desktop is garbage: a rerun removes it and starts again); one
 * after it leaves the new desktop whole (a rerun finishes moving the domain definition and
 * deleting the old chain). What is lost: every change the user made in the old system chain,
 * i.e. outside the home disk.
 */
import { mkdir, readdir, rm, stat } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { locksOn } from '../io/in-use.js';
import { createImage } from '../qcow2/create.js';
import { resolveApp } from './app.js';
import { assignLocked } from './desktop-assign.js';
import { desktopHandle } from './desktop-handle.js';
import { verifyLocked } from './desktop-verify.js';
import type { Log } from './log.js';
import { LayerError } from './errors.js';
import { HOME_FILE } from './home-disk.js';
import { checkName } from './names.js';
import { appsLayerName, USER_LAYER } from './recompose.js';
import type { DesktopHandle, DesktopRuntime } from './runtime.js';
import { newDesktopRecord, type DesktopRecord, type RebaseOperation, type RebasePhase, type StoreState } from './state.js';
import type { Store } from './store.js';

export interface RebaseOptions {
  /** Without it nothing changes: the call fails with what would be lost (rebase.needs-yes). */
  yes?: boolean;
  log?: Log;
  /** Test seam: runs after each phase is recorded; a throw there stops the rebase as a crash would. */
  afterPhase?: (phase: RebasePhase | 'planned') => Promise<void>;
  /** A desktop on the base already is 'unchanged', not refused (group rebase, whose reruns skip done members). */
  unchangedIfOn?: boolean;
}

export interface RebaseResult {
  desktop: string;
  from: string;
  to: string;
  apps: string[];
  /** The home disk kept (absolute), when the desktop has one. */
  home: string | null;
  /** The desktop was on `to` already (a rerun): nothing was done but finishing an interrupted run. */
  unchanged: boolean;
  /** An interrupted rebase was found: 'finished' (it had switched) or 'discarded' (it had not; started again). */
  interrupted: 'finished' | 'discarded' | null;
}

/** What a rebase keeps and loses, for the confirmation (and `--json` without --yes). */
export interface RebaseLoss {
  desktop: string;
  from: string;
  to: string;
  /** Bytes the user delta (the user's changes outside /home) occupies on the host: lost. */
  userDeltaBytes: number;
  home: string | null;
  apps: string[];
}

const quiet: Log = () => {};

function recordOf(state: StoreState, name: string): DesktopRecord {
  const record = state.desktops[name];
  if (!record) throw new LayerError('desktop.not-found', `no desktop named ${name}`);
  return record;
}

/** The staging desktop's name: the desktop's with `.rebase` (a valid desktop and domain name). */
export function stagingName(name: string): string {
  return `${name}.rebase`;
}

/** The new chain's folder: desktops/NAME.on-BASE (the old chain may sit in desktops/NAME). */
function newDirOf(name: string, base: string): string {
  return join('desktops', `${name}.on-${base}`);
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/** Refuse (changing nothing) what a rebase cannot do; returns what it would lose. */
async function checkRebase(store: Store, state: StoreState, runtime: DesktopRuntime | null, name: string, base: string): Promise<RebaseLoss> {
  const record = recordOf(state, name);
  if (record.stagingFor !== undefined) throw new LayerError('rebase.staging', `${name} is the staging desktop of ${record.stagingFor}'s rebase: rerun qlayer desktop rebase ${record.stagingFor}`);
  const next = state.bases[base];
  if (!next) throw new LayerError('base.not-found', `no base named ${base} (import one with: qlayer base import ${base} IMAGE)`);
  if (record.base === base) throw new LayerError('rebase.same-base', `desktop ${name} is on base ${base} already; nothing to rebase`);
  const current = state.bases[record.base];
  if (!current) throw new LayerError('store.corrupt-state', `desktop ${name}'s base ${record.base} is missing from the store`);
  if (next.virtualSize < current.virtualSize) {
    throw new LayerError(
      'rebase.smaller-base',
      `base ${base} is ${next.virtualSize} bytes, smaller than ${name}'s base ${record.base} (${current.virtualSize} bytes): the desktop's partition layout would not fit; nothing was changed`,
    );
  }
  if (record.recompose) throw new LayerError('desktop.recompose-pending', `desktop ${name} has an unfinished recompose; finish it first: qlayer desktop recompose ${name}`);
  if (record.operation) throw new LayerError('desktop.operation-pending', `desktop ${name} has an unfinished ${record.operation.kind}; undo it first: qlayer desktop assign --abort ${name}`);
  const staging = stagingName(name);
  checkName('desktop', staging);
  if (state.desktops[staging] && state.desktops[staging]!.stagingFor !== name) {
    throw new LayerError('rebase.name-taken', `a desktop named ${staging} exists; a rebase of ${name} needs that name for its staging desktop`);
  }
  const handle = desktopHandle(store, state, name);
  if (runtime && (await runtime.isRunning(handle))) throw new LayerError('desktop.running', `rebase: desktop ${name} is running; stop it first (qlayer desktop stop ${name})`);
  for (const path of [handle.chain[0]!.path, handle.chain[1]!.path, ...(handle.home ? [handle.home] : [])]) {
    const locks = await locksOn(path).catch(() => []);
    if (locks.length) throw new LayerError('desktop.in-use', `rebase: ${path} is open in another process (QEMU holds locks on it)`);
  }
  const userDeltaBytes = await stat(handle.userPath).then((s) => s.blocks * 512, () => 0);
  return { desktop: name, from: record.base, to: base, userDeltaBytes, home: handle.home ?? null, apps: [...record.apps] };
}

/** The words that say what a rebase loses and keeps. */
export function describeLoss(loss: RebaseLoss): string {
  const mib = (loss.userDeltaBytes / 1048576).toFixed(1);
  return [
    `rebasing ${loss.desktop} from ${loss.from} to ${loss.to} replaces its system disk:`,
    loss.home
      ? `  lost: every change made in the guest outside /home (${mib} MiB in its user delta: installed packages, /etc, /root, /opt, /var, ...)`
      : `  lost: every change made in the guest (${mib} MiB in its user delta) — this desktop has no home disk, so its users' files go too`,
    ...(loss.home ? [`  kept: the home disk ${loss.home} (/home)`] : []),
    `  kept: its apps, placed again on the new base: ${loss.apps.length ? loss.apps.join(', ') : '(none)'}`,
  ].join('\n');
}

/** What a rebase of `name` onto `base` would lose; changes nothing (the confirmation's text). */
export async function rebaseLoss(store: Store, runtime: DesktopRuntime | null, name: string, base: string): Promise<RebaseLoss> {
  return checkRebase(store, await store.readState(), runtime, name, base);
}

/** rebaseLoss for a caller that holds the lock (group rebase). */
export function rebaseLossIn(store: Store, state: StoreState, runtime: DesktopRuntime | null, name: string, base: string): Promise<RebaseLoss> {
  return checkRebase(store, state, runtime, name, base);
}

/** Rebase `name` onto `base` (see the file comment). Holds the store lock throughout. */
export async function rebaseDesktop(store: Store, runtime: DesktopRuntime, name: string, base: string, options: RebaseOptions = {}): Promise<RebaseResult> {
  return store.withLock(async () => rebaseLocked(store, await store.readState(), runtime, name, base, options));
}

/** The rebase of one desktop, for a caller that holds the store lock and shares `state` (group rebase). */
export async function rebaseLocked(store: Store, state: StoreState, runtime: DesktopRuntime, name: string, base: string, options: RebaseOptions = {}): Promise<RebaseResult> {
  const log = options.log ?? quiet;
  const persist = (): Promise<void> => store.writeState(state);
  const record = recordOf(state, name);
  if (record.rebase && !options.yes) {
    // Finishing or undoing it is a change too: not without --yes (or --resume, which does only that).
    throw new LayerError(
      'rebase.needs-yes',
      `desktop ${name} has an interrupted rebase from ${record.rebase.from} to ${record.rebase.to} (phase ${record.rebase.phase}); nothing was changed: qlayer desktop rebase ${name} --resume finishes or undoes it, or add --yes`,
    );
  }
  let interrupted: RebaseResult['interrupted'] = null;
  if (record.rebase) {
    if (record.rebase.phase === 'switched') {
      log(`finishing the interrupted rebase onto ${record.rebase.to} (it had switched to the new chain)`);
      await finishSwitched(store, state, runtime, name, log);
      interrupted = 'finished';
    } else {
      log(`discarding the interrupted rebase onto ${record.rebase.to} (phase ${record.rebase.phase}; the desktop is still whole on ${record.rebase.from})`);
      await discardStaging(store, state, runtime, record.rebase, log);
      record.rebase = null;
      await persist();
      interrupted = 'discarded';
    }
  }
  // On `base` already: fine for a rerun that just finished it, or a group rebase; an error otherwise.
  if (record.base === base && state.bases[base] && (interrupted !== null || options.unchangedIfOn)) {
    return { desktop: name, from: base, to: base, apps: [...record.apps], home: desktopHandle(store, state, name).home ?? null, unchanged: true, interrupted };
  }
  const loss = await checkRebase(store, state, runtime, name, base);
  if (!options.yes) throw new LayerError('rebase.needs-yes', `${describeLoss(loss)}\nnothing was changed; run again with --yes to rebase`);

  const op: RebaseOperation = {
    phase: 'planned',
    from: record.base,
    to: base,
    staging: stagingName(name),
    oldDir: record.dir,
    newDir: newDirOf(name, base),
    apps: [...record.apps],
    startedAt: new Date().toISOString(),
  };
  record.rebase = op;
  await persist();
  await options.afterPhase?.('planned');

  // staged: the new chain in its own folder, known to the state as the staging desktop.
  log(`building the new system chain on ${base} in ${op.newDir}`);
  const dir = store.path(op.newDir);
  await rm(dir, { recursive: true, force: true }); // a leftover no record names (we hold the lock)
  await mkdir(dir, { recursive: true });
  await createImage({ path: join(dir, appsLayerName(0)), backing: { path: relative(dir, store.path(state.bases[base]!.file)), format: 'qcow2' } });
  await createImage({ path: join(dir, USER_LAYER), backing: { path: appsLayerName(0), format: 'qcow2' } });
  state.desktops[op.staging] = { ...newDesktopRecord(base, op.newDir), stagingFor: name };
  op.phase = 'staged';
  await persist();
  await options.afterPhase?.('staged');

  // assigned: the apps placed again by the usual assign in the staging desktop.
  if (op.apps.length) {
    log(`placing ${op.apps.join(', ')} in the new system`);
    const manifests = await Promise.all(op.apps.map((ref) => resolveApp(store, ref)));
    await assignLocked(store, state, runtime, op.staging, manifests, (m) => log(`[new system] ${m}`));
  }
  op.phase = 'assigned';
  await persist();
  await options.afterPhase?.('assigned');

  // verified: the new system boots and every app file hashes to its manifest.
  log('booting the new system to verify it');
  const verified = await verifyLocked(store, runtime, op.staging, [], (m) => log(`[new system] ${m}`));
  const bad = verified.files.filter((f) => !f.ok);
  if (bad.length) {
    throw new LayerError('rebase.verify-failed', `the new system of ${name} does not verify: ${bad.map((f) => f.path).join(', ')}; the desktop stays on ${op.from} (rerun to try again)`);
  }
  op.phase = 'verified';
  await persist();
  await options.afterPhase?.('verified');

  // switched: one state write moves the desktop onto the new chain and drops the staging record.
  const staged = state.desktops[op.staging]!;
  record.base = base;
  record.dir = op.newDir;
  record.appsGeneration = staged.appsGeneration;
  record.apps = staged.apps;
  record.files = staged.files;
  record.recompose = null;
  record.operation = null;
  delete state.desktops[op.staging];
  op.phase = 'switched';
  await persist();
  await options.afterPhase?.('switched');

  await finishSwitched(store, state, runtime, name, log);
  return { desktop: name, from: op.from, to: base, apps: [...record.apps], home: desktopHandle(store, state, name).home ?? null, unchanged: false, interrupted };
}

/** The handle the staging desktop's domain was made with (its record may be gone: after the switch). */
function stagingHandle(store: Store, op: RebaseOperation): DesktopHandle {
  const dir = store.path(op.newDir);
  return {
    name: op.staging,
    storeId: store.id,
    userPath: join(dir, USER_LAYER),
    chain: [{ path: join(dir, USER_LAYER), format: 'qcow2' }],
  };
}

/**
 * After the switch: the staging domain goes, the desktop's own definition opens the new chain
 * (and keeps its home disk and every other setting), the old chain is deleted, the record
 * cleared. Each step can be redone, so a rerun after a crash anywhere here finishes it.
 */
async function finishSwitched(store: Store, state: StoreState, runtime: DesktopRuntime, name: string, log: Log): Promise<void> {
  const record = recordOf(state, name);
  const op = record.rebase!;
  await runtime.undefine?.(stagingHandle(store, op));
  const handle = desktopHandle(store, state, name);
  await runtime.moveDefinition?.(handle, join(store.path(op.oldDir), USER_LAYER));
  log(`removing the old system chain in ${op.oldDir}`);
  await removeChainFolder(store, op.oldDir, record);
  record.rebase = null;
  await store.writeState(state);
}

/** Delete a chain's folder; a home disk in it stays (with the folder). */
async function removeChainFolder(store: Store, dirRelative: string, record: DesktopRecord): Promise<void> {
  const dir = store.path(dirRelative);
  if (!record.home || !record.home.file.startsWith(`${dirRelative}/`)) {
    await rm(dir, { recursive: true, force: true });
    return;
  }
  const entries = await readdir(dir).catch(() => [] as string[]);
  for (const entry of entries) if (entry !== HOME_FILE) await rm(join(dir, entry), { recursive: true, force: true });
}

/**
 * Before the switch: the staging desktop is garbage (the desktop is whole on its old chain).
 * Its guest is stopped if a crash left it running, its domain undefined, its folder and record removed.
 */
async function discardStaging(store: Store, state: StoreState, runtime: DesktopRuntime, op: RebaseOperation, log: Log): Promise<void> {
  const staged = state.desktops[op.staging];
  const handle = staged ? desktopHandle(store, state, op.staging) : stagingHandle(store, op);
  if (await runtime.isRunning(handle)) {
    log(`stopping the staging guest ${op.staging}`);
    await runtime.stop(handle);
  }
  await runtime.undefine?.(handle);
  if (await exists(store.path(op.newDir))) await rm(store.path(op.newDir), { recursive: true, force: true });
  delete state.desktops[op.staging];
}

/** Finish or discard an interrupted rebase without starting a new one (`desktop rebase NAME --resume`). */
export async function resumeRebase(store: Store, runtime: DesktopRuntime, name: string, log: Log = quiet): Promise<RebaseResult | null> {
  return store.withLock(async () => {
    const state = await store.readState();
    const record = recordOf(state, name);
    if (!record.rebase) return null;
    const op = record.rebase;
    if (op.phase === 'switched') {
      await finishSwitched(store, state, runtime, name, log);
      return { desktop: name, from: op.from, to: op.to, apps: [...record.apps], home: desktopHandle(store, state, name).home ?? null, unchanged: false, interrupted: 'finished' };
    }
    await discardStaging(store, state, runtime, op, log);
    record.rebase = null;
    await store.writeState(state);
    return { desktop: name, from: op.from, to: op.from, apps: [...record.apps], home: desktopHandle(store, state, name).home ?? null, unchanged: true, interrupted: 'discarded' };
  });
}
