import { chmod, mkdir, open, rename, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { openChain } from '../chain/chain.js';
import { convertImage } from '../chain/convert.js';
import { openGuestFilesystem } from '../fs/index.js';
import { locksOn } from '../io/in-use.js';
import { removeOnInterrupt } from '../io/interrupt.js';
import { createImage } from '../qcow2/create.js';
import { allocatePlaceholders, checkGuestSpace, createdBeforeFailure, removeAppFiles, type AllocationResult, type RollbackResult } from './allocate.js';
import { appKey, payloadPath, resolveApp, type AppManifest } from './app.js';
import { LayerError } from './errors.js';
import { groupsWanting, recordDirect } from './app-sources.js';
import { failAndUndo, newOperation, operationView, undoOperation, type UndoContext } from './guest-operation.js';
import { runGuestScript, shellQuote, type GuestShell } from './guest-script.js';
import { locatePlaceholders, recheckAssigned, type RecheckedFiles } from './locate.js';
import { checkName } from './names.js';
import { createHomeDisk, guestHomeMount, HOME_FILE, HOME_LABEL, prepareHomeMount, type HomeMount } from './home-disk.js'; // home disk (issue 13)
import { checkPathConflicts, planAssign, planUnassign, planUpdate } from './plan.js';
import { APPS_LINK, appsLayerName, ensureAppsLinkSync, runRecompose, USER_LAYER, type RecomposeReport } from './recompose.js';
import type { DesktopHandle, DesktopRuntime, DesktopTemplate } from './runtime.js';
import { newDesktopRecord, type BaseRecord, type DesktopRecord, type LocatedFile, type StoreState } from './state.js';
import type { Store } from './store.js';
import { applyPendingBeforeStart, pendingBootView, refusePendingBoot, refuseStartedOutside, type PendingBootView } from './pending.js';

export type Log = (message: string) => void;
const quiet: Log = () => {};

// ---------------------------------------------------------------- bases

/**
 * Import a base image: flattened (its whole backing chain read through) into a new qcow2 in the
 * store, then made read-only. Nothing in the store ever opens it for writing again.
 */
export async function importBase(
  store: Store,
  name: string,
  image: string,
  options: { format?: 'qcow2' | 'raw'; progress?: (done: number, total: number) => void; allowedDirectories?: string[]; prepareHome?: boolean; log?: Log } = {},
): Promise<BaseRecord> {
  checkName('base', name);
  return store.withLock(async () => {
    const state = await store.readState();
    if (state.bases[name]) throw new LayerError('base.exists', `the store already has a base named ${name}; bases are immutable`);
    const file = join('bases', `${name}.qcow2`);
    const target = store.path(file);
    const partial = `${target}.importing`;
    // A leftover of an import that was killed (SIGKILL leaves it): nobody else can be writing
    // it, since importing holds the store lock.
    await rm(partial, { force: true });
    const forgetPartial = removeOnInterrupt(partial);
    try {
      const result = await convertImage(image, partial, {
        sourceFormat: options.format ?? (await sniffFormat(image)),
        outputFormat: 'qcow2',
        ...(options.allowedDirectories ? { allowedDirectories: options.allowedDirectories } : {}),
        sync: true,
        ...(options.progress ? { progress: options.progress } : {}),
      });
      if (result.virtualSize < MIN_BASE_BYTES) {
        throw new LayerError(
          'base.too-small',
          `${image} is ${result.virtualSize} bytes: too small to hold a guest's disk (at least ${MIN_BASE_BYTES} bytes: a partition table and a filesystem); nothing was imported`,
        );
      }
      // home disk (issue 13): the fstab line that mounts a desktop's home disk at /home.
      if (options.prepareHome) await prepareHomeMount(partial, options.log);
      // Read-only, and for the owner and group alone: a base holds whatever its guest had.
      await chmod(partial, 0o440);
      await rename(partial, target);
      const record: BaseRecord = { file, virtualSize: result.virtualSize, importedFrom: image, importedAt: new Date().toISOString() };
      state.bases[name] = record;
      await store.writeState(state);
      return record;
    } catch (error) {
      await rm(partial, { force: true });
      throw error;
    } finally {
      forgetPartial();
    }
  });
}

/** The smallest disk a base can be: room for a partition table and the smallest ext4. */
const MIN_BASE_BYTES = 1 << 20;

/**
 * The format of a file the user names without -f: raw without the qcow2 magic; qcow2 with it,
 * but only when the header names no other file. A raw guest disk can start with a forged qcow2
 * header (qemu's probing CVEs), and taking it for qcow2 would make qlayer read whatever backing
 * or data file it names; such a file needs the user to say which it is.
 */
async function sniffFormat(path: string): Promise<'qcow2' | 'raw'> {
  const handle = await open(path, 'r');
  try {
    const header = Buffer.alloc(80);
    const { bytesRead } = await handle.read(header, 0, header.length, 0);
    if (bytesRead < 4 || header.toString('latin1', 0, 4) !== 'QFI\xfb') return 'raw';
    const version = header.readUInt32BE(4);
    const namesBacking = bytesRead >= 16 && header.readBigUInt64BE(8) !== 0n;
    const namesDataFile = version >= 3 && bytesRead >= 80 && (header.readBigUInt64BE(72) & 4n) !== 0n;
    if (namesBacking || namesDataFile) {
      throw new LayerError(
        'base.format-ambiguous',
        `${path} starts with a qcow2 header that names ${namesBacking ? 'a backing file' : 'an external data file'}; say -f qcow2 to import it as that qcow2 chain, or -f raw to import its bytes as a raw disk`,
      );
    }
    return 'qcow2';
  } finally {
    await handle.close();
  }
}

/** Remove a base nothing uses any more; refuses, naming them, while desktops are on it. */
export async function removeBase(store: Store, name: string): Promise<BaseRecord> {
  return store.withLock(async () => {
    const state = await store.readState();
    const record = state.bases[name];
    if (!record) throw new LayerError('base.not-found', `no base named ${name}`);
    const users = Object.entries(state.desktops).filter(([, d]) => d.base === name).map(([desktop]) => desktop);
    if (users.length) throw new LayerError('base.in-use', `base ${name} is in use by desktop${users.length === 1 ? '' : 's'} ${users.join(', ')}; move or destroy ${users.length === 1 ? 'it' : 'them'} first`);
    delete state.bases[name];
    await store.writeState(state); // the record goes first: a crash now leaves only an orphan file
    await rm(store.path(record.file), { force: true });
    return record;
  });
}

// ---------------------------------------------------------------- desktops

export function desktopRecord(state: StoreState, name: string): DesktopRecord {
  const record = state.desktops[name];
  if (!record) throw new LayerError('desktop.not-found', `no desktop named ${name} (create it with: qlayer desktop create ${name} --base BASE)`);
  return record;
}

/** The record of a desktop that may be started or changed: one with no recompose pending. */
function idleDesktopRecord(state: StoreState, name: string): DesktopRecord {
  const record = desktopRecord(state, name);
  if (record.recompose) {
    throw new LayerError('desktop.recompose-pending', `desktop ${name} has an unfinished recompose; finish it first: qlayer desktop recompose ${name}`);
  }
  refusePendingBoot(name, record);
  return record;
}

/**
 * A running guest whose agent does not answer (stopped, crashed, never installed) can get no
 * placeholders, and no undo could reach it either. Found before anything is recorded, so the
 * refusal changes nothing. (A guest qlayer starts is waited for until its agent answers.)
 */
async function assertAgentAnswers(runtime: DesktopRuntime, handle: DesktopHandle, name: string): Promise<void> {
  try {
    await runGuestScript(runtime.shell(handle), 'true\n', 'checking the guest agent');
  } catch (error) {
    throw new LayerError(
      'guest.agent-unavailable',
      `desktop ${name} is running, but its guest agent does not answer (${error instanceof Error ? error.message : String(error)}): qlayer allocates through qemu-guest-agent; start it in the guest (systemctl start qemu-guest-agent) or shut the desktop down, and try again; nothing was changed`,
    );
  }
}

/**
 * Was the desktop's guest filesystem left dirty (powered off hard, virsh destroy)? Read offline
 * from the stopped chain; null when it cannot be told (no ext4 root found, a chain being written).
 */
async function uncleanShutdown(store: Store, handle: DesktopHandle): Promise<boolean | null> {
  try {
    const chain = await openChain(handle.userPath, { allowedDirectories: [store.root] });
    try {
      const filesystem = await openGuestFilesystem(chain, { allowNeedsRecovery: true });
      return filesystem.needsRecovery;
    } finally {
      await chain.close();
    }
  } catch {
    return null;
  }
}

/**
 * Start the desktop's guest unless it already runs. A guest that was powered off hard is started
 * all the same, and says so: its kernel replays the journal when it mounts the filesystem, before
 * anything is allocated, and the recompose later checks the filesystem is clean.
 */
async function ensureRunning(runtime: DesktopRuntime, handle: DesktopHandle, name: string, log: Log, store?: Store): Promise<void> {
  if (await runtime.isRunning(handle)) return;
  if (store !== undefined && (await uncleanShutdown(store, handle)) === true) {
    log(`${name} was not shut down cleanly (its filesystem journal needs recovery): the guest replays it as it boots, before anything is allocated`);
  }
  log(`starting ${name}`);
  await runtime.start(handle);
}

function basePathOf(store: Store, state: StoreState, record: DesktopRecord): string {
  const base = state.bases[record.base];
  if (!base) throw new LayerError('store.corrupt-state', `desktop's base ${record.base} is missing from the store`);
  return store.path(base.file);
}

/**
 * A desktop made by `desktop adopt` runs as the VM it was, under that VM's domain name.
 * (Kept beside DesktopRecord until state.ts has the field: absent for every other desktop.)
 */

export function desktopHandle(store: Store, state: StoreState, name: string): DesktopHandle {
  const record = desktopRecord(state, name);
  const dir = store.path(record.dir);
  // The domain names the stable link (see APPS_LINK); a desktop from before the link gets it here.
  ensureAppsLinkSync(dir, record.appsGeneration);
  return {
    name,
    storeId: store.id,
    storeRoot: store.root,
    ...(record.domain === undefined ? {} : { domain: record.domain }),
    userPath: join(dir, USER_LAYER),
    ...(record.home ? { home: store.path(record.home.file) } : {}), // home disk (issue 13)
    chain: [
      { path: join(dir, USER_LAYER), format: 'qcow2' },
      { path: join(dir, APPS_LINK), format: 'qcow2' },
      { path: basePathOf(store, state, record), format: 'qcow2' },
    ],
  };
}

/**
 * Create a desktop: an empty apps layer on the base and a user delta on that. With a runtime
 * that keeps definitions, its domain is defined too (hardware from `template`, else the
 * runtime's defaults); a definition libvirt refuses leaves no desktop behind.
 */
export async function createDesktop(
  store: Store,
  name: string,
  base: string,
  options: { runtime?: DesktopRuntime | null; template?: DesktopTemplate; homeBytes?: number } = {},
): Promise<DesktopRecord> {
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
    try {
      // Relative backing names: the store can move to another folder or host.
      await createImage({ path: join(dir, appsLayerName(0)), backing: { path: relative(dir, store.path(baseRecord.file)), format: 'qcow2' } });
      await createImage({ path: join(dir, USER_LAYER), backing: { path: appsLayerName(0), format: 'qcow2' } });
      ensureAppsLinkSync(dir, 0);
      // home disk (issue 13): beside the chain, in no chain.
      if (options.homeBytes !== undefined) await createHomeDisk(join(dir, HOME_FILE), options.homeBytes);
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
    return record;
  });
}

/** Refuse offline work on a desktop whose images a guest or any other process has open. */
async function assertNotInUse(runtime: DesktopRuntime | null, handle: DesktopHandle, what: string): Promise<void> {
  if (runtime && (await runtime.isRunning(handle))) {
    throw new LayerError('desktop.running', `${what}: desktop ${handle.name} is running; stop it first (qlayer desktop stop ${handle.name})`);
  }
  for (const layer of handle.chain.slice(0, 2)) {
    const locks = await locksOn(layer.path).catch(() => []);
    if (locks.length) throw new LayerError('desktop.in-use', `${what}: ${layer.path} is open in another process (QEMU holds locks on it)`);
  }
}

export interface DesktopView {
  name: string;
  state: 'running' | 'stopped' | 'recompose-pending';
  base: string;
  apps: string[];
  files: number;
  paths: { base: string; apps: string; user: string; home?: string };
  appsGeneration: number;
  pendingRecompose: { phase: string; apps: string[] } | null;
  /** An assign or update whose guest side did not finish: what it is and the commands that end it. */
  operation: ReturnType<typeof operationView> | null;
  /** An assign or unassign `--at-next-boot` waiting for the next start, with why the last start did not apply it. */
  pendingAtNextBoot: PendingBootView | null;
  /** A rebase that has not finished (issue 13). */
  rebase?: { phase: string; from: string; to: string } | null;
  /** This is the staging desktop of that desktop's rebase (issue 13). */
  stagingFor?: string;
  createdAt: string;
}

export async function showDesktop(store: Store, runtime: DesktopRuntime | null, name: string): Promise<DesktopView> {
  const state = await store.readState();
  const record = desktopRecord(state, name);
  const handle = desktopHandle(store, state, name);
  const running = runtime ? await runtime.isRunning(handle) : false;
  return {
    name,
    state: record.recompose ? 'recompose-pending' : running ? 'running' : 'stopped',
    base: record.base,
    apps: record.apps,
    files: record.files.length,
    paths: { base: handle.chain[2]!.path, apps: join(store.path(record.dir), appsLayerName(record.appsGeneration)), user: handle.userPath, ...(handle.home ? { home: handle.home } : {}) },
    appsGeneration: record.appsGeneration,
    pendingRecompose: record.recompose ? { phase: record.recompose.phase, apps: record.recompose.apps } : null,
    operation: record.operation ? operationView(name, record.operation) : null,
    pendingAtNextBoot: await pendingBootView(store, record),
    ...(record.rebase ? { rebase: { phase: record.rebase.phase, from: record.rebase.from, to: record.rebase.to } } : {}),
    ...(record.stagingFor !== undefined ? { stagingFor: record.stagingFor } : {}),
    createdAt: record.createdAt,
  };
}

export async function listDesktops(store: Store, runtime: DesktopRuntime | null): Promise<DesktopView[]> {
  const state = await store.readState();
  return Promise.all(Object.keys(state.desktops).sort().map((name) => showDesktop(store, runtime, name)));
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

/** Persist-and-run the desktop's recompose plan (the record is inside `state`). */
export async function recomposeRecorded(store: Store, state: StoreState, name: string, log: Log, runtime: DesktopRuntime | null): Promise<RecomposeReport> {
  const record = desktopRecord(state, name);
  const report = await runRecompose({
    desktopDir: store.path(record.dir),
    basePath: basePathOf(store, state, record),
    allowedDirectories: [store.root],
    record,
    payloadPath: (app) => {
      const [appName, version] = app.split('@') as [string, string];
      return payloadPath(store, { name: appName, version });
    },
    persist: () => store.writeState(state),
    log,
  });
  // The apps generation changed: a persistent domain's definition must open the new chain, so
  // that a start outside qlayer (virsh start, virt-manager) boots what the store says.
  await runtime?.updateDefinition?.(desktopHandle(store, state, name));
  return report;
}

/**
 * Locate placeholders offline, reading the guest filesystem from the stopped desktop's chain, and
 * look again at the files of the apps already assigned (recheckAssigned): blocks the user freed
 * since may now belong to the new placeholders.
 */
export async function locateOffline(store: Store, handle: DesktopHandle, manifests: AppManifest[], assigned: LocatedFile[]): Promise<{ located: LocatedFile[]; rechecked: RecheckedFiles }> {
  const chain = await openChain(handle.userPath, { allowedDirectories: [store.root] });
  try {
    const filesystem = await openGuestFilesystem(chain);
    const located = await locatePlaceholders(filesystem, chain, manifests);
    return { located, rechecked: await recheckAssigned(filesystem, assigned) };
  } finally {
    await chain.close();
  }
}

/** Check offline that none of these paths exists any more. */
export async function assertGoneOffline(store: Store, handle: DesktopHandle, paths: string[]): Promise<void> {
  const chain = await openChain(handle.userPath, { allowedDirectories: [store.root] });
  try {
    const filesystem = await openGuestFilesystem(chain);
    for (const path of paths) {
      const found = await filesystem.lookup(path, { follow: false }).then(
        () => true,
        (error: { code?: string }) => {
          if (error.code === 'fs.not-found') return false;
          throw error;
        },
      );
      if (found) throw new LayerError('unassign.still-present', `${path} is still in the guest filesystem; refusing to drop its app`);
    }
  } finally {
    await chain.close();
  }
}

export interface AssignResult {
  apps: string[];
  /** How the placeholders were made in the guest (helper or script) and how many each way. */
  allocation: AllocationResult;
  located: number;
  report: RecomposeReport;
}

/** Allocate placeholders in the running guest and say how it went. */
async function allocateLogged(runtime: DesktopRuntime, handle: DesktopHandle, manifests: AppManifest[], log: Log): Promise<AllocationResult> {
  log(`allocating ${manifests.reduce((n, m) => n + m.files.length, 0)} placeholder files in the guest`);
  const allocation = await allocatePlaceholders(runtime.shell(handle), manifests);
  if (allocation.helperSkipped) log(`guest helper not used: ${allocation.helperSkipped}`);
  log(
    `allocated ${allocation.files} placeholders in the guest with the ${allocation.method} (fallocate: ${allocation.fallocated}, written zeros: ${allocation.zeroFilled}` +
      `${allocation.kept ? `, kept from an interrupted assign: ${allocation.kept}` : ''}; ${allocation.processes} guest processes)`,
  );
  return allocation;
}

export function undoContext(store: Store, state: StoreState, runtime: DesktopRuntime, name: string, log: Log): UndoContext {
  return {
    name,
    record: desktopRecord(state, name),
    handle: desktopHandle(store, state, name),
    runtime,
    resolve: (ref) => resolveApp(store, ref),
    persist: () => store.writeState(state),
    log,
  };
}

/** Undo what an interrupted assign or update left in the guest before anything new starts. */
async function settleOperation(store: Store, state: StoreState, runtime: DesktopRuntime, name: string, log: Log): Promise<void> {
  const op = desktopRecord(state, name).operation;
  if (!op) return;
  log(`finishing the undo of an unfinished ${op.kind} of ${op.apps.join(', ')}${op.failure ? ` (${op.failure.code})` : ''}`);
  await undoOperation(undoContext(store, state, runtime, name, log));
}

/** Test seams: let a test make a step fail for real, between the guest-side steps. */
export interface AssignHooks {
  /** Runs after the shutdown, before the placeholders are located offline. */
  beforeLocate?: () => Promise<void>;
}

/**
 * The guest-side steps of an assign or update (allocation, shutdown, locate), with the
 * operation recorded first and undone if any step fails. `beforeAllocate` runs in the booted
 * guest first (an update deletes the old version there).
 */
async function guestSide(
  store: Store,
  state: StoreState,
  runtime: DesktopRuntime,
  name: string,
  manifests: AppManifest[],
  options: { kind: 'assign' | 'update'; replacing: string[]; log: Log; hooks: AssignHooks; beforeAllocate?: (handle: DesktopHandle) => Promise<void>; afterStop?: (handle: DesktopHandle) => Promise<void> },
): Promise<{ allocation: AllocationResult; located: LocatedFile[] }> {
  const record = desktopRecord(state, name);
  const handle = desktopHandle(store, state, name);
  await refuseStartedOutside(runtime, handle, options.kind);
  const wasRunning = await runtime.isRunning(handle);
  if (wasRunning) await assertAgentAnswers(runtime, handle, name);
  record.operation = newOperation(options.kind, manifests.map(appKey), options.replacing, wasRunning);
  await store.writeState(state);
  const op = record.operation;
  try {
    await ensureRunning(runtime, handle, name, options.log, store);
    await options.beforeAllocate?.(handle);
    const space = await checkGuestSpace(runtime.shell(handle), manifests);
    options.log(`the guest has ${(space.free / 1048576).toFixed(0)} MiB free on ${space.filesystem}; the app needs ${(space.needed / 1048576).toFixed(0)} MiB with its margin`);
    let allocation: AllocationResult;
    try {
      allocation = await allocateLogged(runtime, handle, manifests, options.log);
    } catch (error) {
      op.created = createdBeforeFailure(error);
      throw error;
    }
    op.created = allocation.created;
    op.phase = 'allocated';
    await store.writeState(state);
    options.log(`shutting ${name} down`);
    await runtime.stop(handle);
    await assertNotInUse(runtime, handle, options.kind);
    await options.afterStop?.(handle);
    await options.hooks.beforeLocate?.();
    options.log('locating placeholders offline');
    // The files of an app being replaced were deleted on purpose; the plan drops them anyway.
    const replacing = (f: LocatedFile): boolean => options.replacing.includes(f.app);
    const { located, rechecked } = await locateOffline(store, handle, manifests, record.files.filter((f) => !replacing(f)));
    for (const gone of rechecked.released) {
      options.log(`${gone.path}: ${gone.why}; its ${gone.bytes} freed bytes no longer read from the apps layer`);
    }
    record.files = [...rechecked.files, ...record.files.filter(replacing)];
    return { allocation, located };
  } catch (error) {
    throw await failAndUndo(undoContext(store, state, runtime, name, options.log), error);
  }
}

/**
 * The assign of one desktop, for a caller that holds the store lock and shares `state` (several
 * desktops may run this at once on one state: each changes only its own record, and every
 * write stores the whole state in order). A failure before the recompose plan is recorded
 * undoes what the guest got; after it, the recompose is resumable.
 */
export async function assignLocked(
  store: Store,
  state: StoreState,
  runtime: DesktopRuntime,
  name: string,
  manifests: AppManifest[],
  log: Log = quiet,
  hooks: AssignHooks = {},
): Promise<AssignResult> {
  idleDesktopRecord(state, name);
  await settleOperation(store, state, runtime, name, log);
  const record = idleDesktopRecord(state, name);
  checkPathConflicts(record, manifests); // before anything happens in the guest
  const { allocation, located } = await guestSide(store, state, runtime, name, manifests, { kind: 'assign', replacing: [], log, hooks });
  record.recompose = planAssign(record, manifests, located);
  record.operation = null; // the plan takes over: from here the way is forward (desktop recompose)
  await store.writeState(state);
  const report = await recomposeRecorded(store, state, name, log, runtime);
  return { apps: manifests.map(appKey), allocation, located: located.length, report };
}

/**
 * Undo an unfinished assign or update: the placeholders it left in the guest, and its record.
 * Null when there was nothing to undo.
 */
export async function abortOperation(store: Store, runtime: DesktopRuntime, name: string, log: Log = quiet): Promise<RollbackResult | null | 'nothing'> {
  return store.withLock(async () => {
    const state = await store.readState();
    if (!desktopRecord(state, name).operation) return 'nothing';
    return undoOperation(undoContext(store, state, runtime, name, log));
  });
}

/**
 * Assign apps: allocate their placeholders in the running desktop (started if needed), shut it
 * down, locate the placeholders offline, and recompose. The whole operation holds the store lock.
 */
export async function assignApps(store: Store, runtime: DesktopRuntime, name: string, refs: string[], log: Log = quiet, hooks: AssignHooks = {}): Promise<AssignResult> {
  return store.withLock(async () => {
    const state = await store.readState();
    const manifests = await Promise.all(refs.map((ref) => resolveApp(store, ref)));
    const result = await assignLocked(store, state, runtime, name, manifests, log, hooks);
    recordDirect(desktopRecord(state, name), { add: result.apps });
    await store.writeState(state);
    return result;
  });
}

export interface UpdateResult extends AssignResult {
  /** The version replaced (name@version). */
  replaced: string;
}

/**
 * Replace an assigned app by another version in one guest session: the old version's files are
 * deleted and the new one's placeholders allocated while the desktop runs once, then one
 * shutdown and one recompose (an unassign and an assign would boot it twice).
 */
export async function updateApp(store: Store, runtime: DesktopRuntime, name: string, ref: string, log: Log = quiet, hooks: AssignHooks = {}): Promise<UpdateResult> {
  return store.withLock(async () => {
    const state = await store.readState();
    const result = await updateLocked(store, state, runtime, name, ref, log, hooks);
    recordDirect(desktopRecord(state, name), { add: result.apps, remove: [result.replaced] });
    await store.writeState(state);
    return result;
  });
}

/** The update of one desktop, for a caller that holds the store lock (see assignLocked). */
export async function updateLocked(store: Store, state: StoreState, runtime: DesktopRuntime, name: string, ref: string, log: Log = quiet, hooks: AssignHooks = {}): Promise<UpdateResult> {
  idleDesktopRecord(state, name);
  await settleOperation(store, state, runtime, name, log);
  const record = idleDesktopRecord(state, name);
  const next = await resolveApp(store, ref);
  const current = record.apps.find((a) => a.split('@')[0] === next.name);
  if (!current) throw new LayerError('update.not-assigned', `desktop ${name} has no version of ${next.name} to update (assign it: qlayer desktop assign ${name} ${ref})`);
  if (current === appKey(next)) throw new LayerError('update.same-version', `desktop ${name} already has ${current}`);
  const old = await resolveApp(store, current);
  const without = planUnassign(record, [current]); // the record as it is once the old version is gone
  checkPathConflicts({ apps: without.apps, files: without.files }, [next]);
  const newPaths = new Set(next.files.map((f) => f.path));
  const { allocation, located } = await guestSide(store, state, runtime, name, [next], {
    kind: 'update',
    replacing: [current],
    log,
    hooks,
    beforeAllocate: async (handle) => {
      log(`deleting ${current} in the guest`);
      await removeAppFiles(runtime.shell(handle), [old]);
    },
    afterStop: (handle) => assertGoneOffline(store, handle, old.files.map((f) => f.path).filter((p) => !newPaths.has(p))),
  });
  record.recompose = planUpdate(record, current, next, located);
  record.operation = null;
  await store.writeState(state);
  const report = await recomposeRecorded(store, state, name, log, runtime);
  return { apps: [appKey(next)], replaced: current, allocation, located: located.length, report };
}

/** Unassign apps: delete their files in the guest, shut down, check they are gone, recompose. */
export interface UnassignResult extends RecomposeReport {
  /** App files the user had deleted in the guest already: reported, not an error. */
  alreadyGone: string[];
}

export async function unassignApps(store: Store, runtime: DesktopRuntime, name: string, refs: string[], log: Log = quiet): Promise<UnassignResult> {
  return store.withLock(async () => {
    const state = await store.readState();
    desktopRecord(state, name);
    for (const ref of refs) {
      const groups = groupsWanting(state, name, ref);
      if (groups.length) {
        throw new LayerError('unassign.from-group', `${ref} comes to ${name} from group ${groups.join(', ')}: take it out there (qlayer group unassign ${groups[0]} ${ref.split('@')[0]}) or take ${name} out of the group`);
      }
    }
    const result = await unassignLocked(store, state, runtime, name, refs, log);
    recordDirect(desktopRecord(state, name), { remove: refs });
    await store.writeState(state);
    return result;
  });
}

/** The unassign of one desktop, for a caller that holds the store lock (see assignLocked). */
export async function unassignLocked(store: Store, state: StoreState, runtime: DesktopRuntime, name: string, refs: string[], log: Log = quiet): Promise<UnassignResult> {
  idleDesktopRecord(state, name);
  await settleOperation(store, state, runtime, name, log);
  const record = idleDesktopRecord(state, name);
  const plan = planUnassign(record, refs); // validates the names before the guest is touched
  const removing = record.apps.filter((a) => !plan.apps.includes(a));
  const manifests = await Promise.all(removing.map((ref) => resolveApp(store, ref)));
  const handle = desktopHandle(store, state, name);
  await refuseStartedOutside(runtime, handle, 'unassign');
  await ensureRunning(runtime, handle, name, log, store);
  log(`deleting ${removing.join(', ')} in the guest`);
  const alreadyGone = await removeAppFiles(runtime.shell(handle), manifests);
  if (alreadyGone.length) log(`${alreadyGone.length} app files were already gone: ${alreadyGone.slice(0, 5).join(', ')}${alreadyGone.length > 5 ? ', ...' : ''}`);
  log(`shutting ${name} down`);
  await runtime.stop(handle);
  await assertNotInUse(runtime, handle, 'unassign');
  await assertGoneOffline(store, handle, manifests.flatMap((m) => m.files.map((f) => f.path)));
  record.recompose = plan;
  await store.writeState(state);
  return { ...(await recomposeRecorded(store, state, name, log, runtime)), alreadyGone };
}

/** Run (or finish) the desktop's pending recompose; offline only. */
export async function recomposeDesktop(store: Store, runtime: DesktopRuntime | null, name: string, log: Log = quiet): Promise<RecomposeReport | null> {
  return store.withLock(async () => {
    const state = await store.readState();
    const record = desktopRecord(state, name);
    if (!record.recompose) return null;
    await assertNotInUse(runtime, desktopHandle(store, state, name), 'recompose');
    return recomposeRecorded(store, state, name, log, runtime);
  });
}

/**
 * What verify found for one app file:
 * - ok: its bytes hash to the manifest;
 * - user-changed: different, and the guest's filesystem says it was written or replaced after the
 *   assign (its mtime or inode moved): the user's own edit, kept in the user delta;
 * - user-deleted: the guest has no such file any more;
 * - damaged: different, though neither its inode nor its mtime moved: no write through the
 *   guest's filesystem explains it, so a layer is wrong (or, for apps assigned before qlayer
 *   recorded inode times, it cannot tell).
 */
export type VerifiedStatus = 'ok' | 'user-changed' | 'user-deleted' | 'damaged';

export interface VerifiedFile {
  app: string;
  path: string;
  expected: string;
  actual: string | null;
  ok: boolean;
  status: VerifiedStatus;
  /** Why a file that is not ok got its status, in the guest's terms. */
  why?: string;
}

/** The guest's inode number and mtime of each path that exists (one stat per file, missing ones skipped). */
async function guestIdentities(shell: GuestShell, paths: string[]): Promise<Map<string, { inode: number; mtime: number }>> {
  const found = new Map<string, { inode: number; mtime: number }>();
  if (!paths.length) return found;
  const script = paths.map((p) => `stat -c '%i %Y %n' ${shellQuote(p)} 2>/dev/null || true`).join('\n');
  const output = await runGuestScript(shell, `${script}\n`, 'reading the changed files\' inodes');
  for (const line of output.split('\n')) {
    const match = /^(\d+) (-?\d+) (.*)$/.exec(line.trim());
    if (match) found.set(match[3]!, { inode: Number(match[1]), mtime: Number(match[2]) });
  }
  return found;
}

/** Tell a user's edit from damage for a file whose hash differs (see VerifiedStatus). */
function classifyChanged(located: LocatedFile | undefined, now: { inode: number; mtime: number } | undefined): { status: VerifiedStatus; why: string } {
  if (now === undefined) return { status: 'user-deleted', why: 'the guest has no such file: deleted in the guest' };
  if (located?.inode === undefined || located.mtime === undefined) {
    return { status: 'damaged', why: 'its bytes differ, and this assign predates recorded inode times: qlayer cannot tell a user\'s edit from damage' };
  }
  if (now.inode !== located.inode) return { status: 'user-changed', why: `replaced in the guest (inode ${now.inode}, was ${located.inode}); the new file lives in the user delta` };
  if (now.mtime !== located.mtime) {
    return { status: 'user-changed', why: `written in the guest at ${new Date(now.mtime * 1000).toISOString()} (assigned with mtime ${new Date(located.mtime * 1000).toISOString()}); the changed blocks live in the user delta` };
  }
  return { status: 'damaged', why: 'its bytes differ, but neither its inode nor its mtime changed since the assign: no write through the guest explains it (check the layers: qlayer image check, e2fsck)' };
}

/**
 * Boot the desktop (if needed), hash every assigned app file in the guest, compare with the
 * manifests, and stop it again if it was not running before.
 */
/**
 * Files under the assigned apps' folders that no assigned app has: leftovers of an app (an
 * undo that had to leave a file the user wrote into), or files the user made there. Reported,
 * never a failure.
 */
async function unknownFilesUnder(shell: GuestShell, manifests: AppManifest[]): Promise<string[]> {
  const prefixes = [...new Set(manifests.map((m) => m.prefix))];
  if (!prefixes.length) return [];
  const known = new Set(manifests.flatMap((m) => m.files.map((f) => f.path)));
  const output = await runGuestScript(shell, `find ${prefixes.map(shellQuote).join(' ')} -type f 2>/dev/null || true\n`, 'listing the app folders');
  return output.split('\n').filter((path) => path && !known.has(path)).sort();
}

export interface VerifyResult {
  files: VerifiedFile[];
  /** Files under the apps' folders that belong to no assigned app (reported, not a failure). */
  unknownFiles: string[];
  /** sha256 of each extra path asked for (null when missing): e.g. a user file to prove intact. */
  extra: Record<string, string | null>;
  /** home disk (issue 13): whether the guest mounted something at /home (absent: no home disk). */
  home?: HomeMount & { disk: string };
}

export async function verifyDesktop(store: Store, runtime: DesktopRuntime, name: string, extraPaths: string[] = [], log: Log = quiet): Promise<VerifyResult> {
  // Under the lock from boot to stop: an assign or recompose must not change the chain under
  // the running guest, and a pending recompose must be finished before the guest may boot.
  return store.withLock(() => verifyLocked(store, runtime, name, extraPaths, log));
}

/** verifyDesktop for a caller that holds the store lock (exported for rebase.ts, issue 13). */
export async function verifyLocked(store: Store, runtime: DesktopRuntime, name: string, extraPaths: string[], log: Log): Promise<VerifyResult> {
  const state = await store.readState();
  const record = idleDesktopRecord(state, name);
  if (record.operation) {
    const view = operationView(name, record.operation);
    throw new LayerError(
      'desktop.operation-pending',
      `desktop ${name} has an unfinished ${view.kind} of ${view.apps.join(', ')}: its guest may hold placeholders that are no app yet; undo it with ${view.undo}, or do it again: ${view.finish}`,
    );
  }
  const handle = desktopHandle(store, state, name);
  const manifests = await Promise.all(record.apps.map((ref) => resolveApp(store, ref)));
  const wasRunning = await runtime.isRunning(handle);
  if (!wasRunning) {
    log(`booting ${name}`);
    await runtime.start(handle);
  }
  try {
    // home disk (issue 13): first, since a guest can answer before /home is mounted (systemd, nofail) and files under it must be read from it.
    const home = handle.home ? { disk: handle.home, ...(await guestHomeMount(runtime.shell(handle))) } : undefined;
    const files = manifests.flatMap((m) => m.files.map((f) => ({ app: appKey(m), path: f.path, expected: f.sha256 })));
    const paths = [...files.map((f) => f.path), ...extraPaths];
    const hashes = new Map<string, string>();
    if (paths.length) {
      // One sha256sum per file so that a missing file shows as missing, not as a failed batch.
      const script = paths.map((p) => `sha256sum ${shellQuote(p)} 2>/dev/null || echo "missing  ${p.replace(/["$`\\]/g, '')}"`).join('\n');
      const output = await runGuestScript(runtime.shell(handle), `${script}\n`, 'hashing app files');
      for (const line of output.split('\n')) {
        const match = /^([0-9a-f]{64}|missing)\s+(.*)$/.exec(line.trim());
        if (match) hashes.set(match[2]!, match[1]!);
      }
    }
    const hashOf = (path: string): string | null => {
      const actual = hashes.get(path);
      return actual && actual !== 'missing' ? actual : null;
    };
    const changed = files.filter((f) => hashOf(f.path) !== f.expected).map((f) => f.path);
    const identities = await guestIdentities(runtime.shell(handle), changed);
    const locatedByPath = new Map(record.files.map((f) => [f.path, f]));
    return {
      files: files.map((f): VerifiedFile => {
        const actual = hashOf(f.path);
        if (actual === f.expected) return { ...f, actual, ok: true, status: 'ok' };
        return { ...f, actual, ok: false, ...classifyChanged(locatedByPath.get(f.path), identities.get(f.path)) };
      }),
      extra: Object.fromEntries(extraPaths.map((p) => [p, hashOf(p)])),
      unknownFiles: await unknownFilesUnder(runtime.shell(handle), manifests),
      ...(home ? { home } : {}), // home disk (issue 13)
    };
  } finally {
    if (!wasRunning) {
      log(`stopping ${name}`);
      await runtime.stop(handle);
    }
  }
}

// ---------------------------------------------------------------- adopt / release

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
