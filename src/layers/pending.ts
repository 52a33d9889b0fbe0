/**
 * Assign and unassign at the next boot (`--at-next-boot`): the guest half now, in the running
 * desktop (placeholders allocated, or the app's files deleted), and the host half (locate,
 * recompose) when the desktop next starts, whoever starts it. libvirt's QEMU hook runs
 * `applyPendingAtStart` at `prepare`, before QEMU opens the disk (src/virt/hook.ts); `qlayer
 * desktop start` runs it too, so the change also lands on a host without the hook.
 *
 * A start is never stopped: when the change cannot be applied (the guest was not shut down
 * cleanly, a placeholder changed, the store is locked), the desktop starts as it was, the change
 * stays pending, and why is written beside the desktop (pending-boot.json), not into the store
 * state, because the store may be locked and the hook must not wait for it.
 */
import { readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { allocatePlaceholders, checkGuestSpace, createdBeforeFailure, removeAppFiles, type AllocationResult, type RollbackResult } from './allocate.js';
import { appKey, resolveApp, type AppManifest } from './app.js';
import { groupsWanting, recordDirect } from './app-sources.js';
import { assertGoneOffline, desktopHandle, desktopRecord, locateOffline, recomposeRecorded, undoContext, type Log } from './desktops.js';
import { LayerError } from './errors.js';
import { failAndUndo, newOperation, undoOperation } from './guest-operation.js';
import { checkPathConflicts, planAssign, planUnassign } from './plan.js';
import { APPS_LINK, type RecomposeReport } from './recompose.js';
import type { DesktopHandle, DesktopRuntime } from './runtime.js';
import type { DesktopRecord, PendingBootChange, StoreState } from './state.js';
import { Store } from './store.js';

const quiet: Log = () => {};

/** The file beside the desktop's images that says why the last start did not apply the change. */
export const PENDING_STATUS_FILE = 'pending-boot.json';

/** Why a start did not apply a pending change. */
export interface PendingAttempt {
  at: string;
  /** Who tried: libvirt's hook, or `qlayer desktop start`. */
  by: 'hook' | 'qlayer';
  code: string;
  reason: string;
  /** The request this attempt was about (a later request is a new change). */
  requestedAt: string;
}

export interface PendingBootView {
  kind: 'assign' | 'unassign';
  apps: string[];
  requestedAt: string;
  /** Why the last start did not apply it; null when no start has tried yet. */
  lastAttempt: Omit<PendingAttempt, 'requestedAt'> | null;
}

/** Refuse to start other work on a desktop whose change waits for its next start. */
export function refusePendingBoot(name: string, record: DesktopRecord): void {
  const pending = record.pendingBoot;
  if (!pending) return;
  throw new LayerError(
    'desktop.pending-at-next-boot',
    `desktop ${name} has a pending ${pending.kind} of ${pending.refs.join(', ')} for its next start: shut it down and start it (from inside the guest, virsh, or qlayer desktop stop/start ${name}) to apply it` +
      (pending.kind === 'assign' ? `, or drop it with qlayer desktop assign --abort ${name}` : ''),
  );
}

export async function pendingBootView(store: Store, record: DesktopRecord): Promise<PendingBootView | null> {
  const pending = record.pendingBoot;
  if (!pending) return null;
  const attempt = await readAttempt(store, record);
  return {
    kind: pending.kind,
    apps: pending.refs,
    requestedAt: pending.requestedAt,
    lastAttempt: attempt && attempt.requestedAt === pending.requestedAt ? { at: attempt.at, by: attempt.by, code: attempt.code, reason: attempt.reason } : null,
  };
}

async function readAttempt(store: Store, record: DesktopRecord): Promise<PendingAttempt | null> {
  const text = await readFile(join(store.path(record.dir), PENDING_STATUS_FILE), 'utf8').catch(() => null);
  if (text === null) return null;
  try {
    return JSON.parse(text) as PendingAttempt;
  } catch {
    return null; // half-written by a killed hook: as if no attempt was recorded
  }
}

async function writeAttempt(desktopDir: string, attempt: PendingAttempt): Promise<void> {
  const target = join(desktopDir, PENDING_STATUS_FILE);
  const temporary = `${target}.${process.pid}.tmp`;
  await writeFile(temporary, `${JSON.stringify(attempt, null, 2)}\n`);
  await rename(temporary, target);
}

/** The guest must be running, and started by qlayer or anyone: allocation needs the guest, not a restart. */
async function requireRunning(runtime: DesktopRuntime, handle: DesktopHandle, name: string, verb: string): Promise<void> {
  if (!(await runtime.isRunning(handle))) {
    throw new LayerError('desktop.not-running', `${verb} --at-next-boot needs desktop ${name} running (the guest does its part now); it is not: ${verb} without --at-next-boot works on a stopped desktop`);
  }
}

function checkIdle(name: string, record: DesktopRecord): void {
  if (record.recompose) throw new LayerError('desktop.recompose-pending', `desktop ${name} has an unfinished recompose; finish it first: qlayer desktop recompose ${name}`);
  if (record.operation) throw new LayerError('desktop.operation-pending', `desktop ${name} has an unfinished ${record.operation.kind}; undo it first (qlayer desktop assign --abort ${name})`);
  refusePendingBoot(name, record);
}

export interface AtNextBootResult {
  desktop: string;
  kind: 'assign' | 'unassign';
  apps: string[];
  allocation: AllocationResult | null;
  /** Unassign: app files the user had deleted already. */
  alreadyGone: string[];
}

/**
 * Allocate the apps' placeholders in the running desktop and record their recompose for its
 * next start. The guest keeps running. A failure in the guest undoes what it got.
 */
export async function assignAtNextBoot(store: Store, runtime: DesktopRuntime, name: string, refs: string[], log: Log = quiet): Promise<AtNextBootResult> {
  return store.withLock(async () => {
    const state = await store.readState();
    const record = desktopRecord(state, name);
    checkIdle(name, record);
    const manifests = await Promise.all(refs.map((ref) => resolveApp(store, ref)));
    checkPathConflicts(record, manifests);
    const handle = desktopHandle(store, state, name);
    await requireRunning(runtime, handle, name, 'assign');
    record.operation = newOperation('assign', manifests.map(appKey), [], true);
    await store.writeState(state);
    const op = record.operation;
    let allocation: AllocationResult;
    try {
      const space = await checkGuestSpace(runtime.shell(handle), manifests);
      log(`the guest has ${(space.free / 1048576).toFixed(0)} MiB free on ${space.filesystem}; the app needs ${(space.needed / 1048576).toFixed(0)} MiB with its margin`);
      log(`allocating ${manifests.reduce((n, m) => n + m.files.length, 0)} placeholder files in the guest`);
      try {
        allocation = await allocatePlaceholders(runtime.shell(handle), manifests);
      } catch (error) {
        op.created = createdBeforeFailure(error);
        throw error;
      }
      // The guest's writes must reach the disk before anyone powers it off hard.
      await runtime.shell(handle).exec('/bin/sh', ['-c', 'sync']);
    } catch (error) {
      throw await failAndUndo(undoContext(store, state, runtime, name, log), error);
    }
    record.operation = null;
    record.pendingBoot = { kind: 'assign', refs: manifests.map(appKey), requestedAt: new Date().toISOString(), created: allocation.created };
    await store.writeState(state);
    log(`allocated ${allocation.files} placeholders; the recompose runs when ${name} next starts`);
    return { desktop: name, kind: 'assign', apps: manifests.map(appKey), allocation, alreadyGone: [] };
  });
}

/** Delete the apps' files in the running desktop now; drop the apps from its layers at its next start. */
export async function unassignAtNextBoot(store: Store, runtime: DesktopRuntime, name: string, refs: string[], log: Log = quiet): Promise<AtNextBootResult> {
  return store.withLock(async () => {
    const state = await store.readState();
    const record = desktopRecord(state, name);
    checkIdle(name, record);
    for (const ref of refs) {
      const groups = groupsWanting(state, name, ref);
      if (groups.length) throw new LayerError('unassign.from-group', `${ref} comes to ${name} from group ${groups.join(', ')}: take it out there (qlayer group unassign ${groups[0]} ${ref.split('@')[0]}) or take ${name} out of the group`);
    }
    const plan = planUnassign(record, refs); // validates the names before the guest is touched
    const removing = record.apps.filter((a) => !plan.apps.includes(a));
    const manifests = await Promise.all(removing.map((ref) => resolveApp(store, ref)));
    const handle = desktopHandle(store, state, name);
    await requireRunning(runtime, handle, name, 'unassign');
    // Recorded first: once files are deleted the app can only go forward.
    record.pendingBoot = { kind: 'unassign', refs: removing, requestedAt: new Date().toISOString(), created: null };
    await store.writeState(state);
    log(`deleting ${removing.join(', ')} in the guest`);
    const alreadyGone = await removeAppFiles(runtime.shell(handle), manifests);
    await runtime.shell(handle).exec('/bin/sh', ['-c', 'sync']);
    log(`the apps' layers are dropped when ${name} next starts`);
    return { desktop: name, kind: 'unassign', apps: removing, allocation: null, alreadyGone };
  });
}

/**
 * Drop a pending assign: its placeholders are removed from the guest (started if needed, as any
 * undo) and the record forgotten. A pending unassign cannot be dropped: the files are gone.
 */
export async function abortPendingAssign(store: Store, runtime: DesktopRuntime, name: string, log: Log = quiet): Promise<RollbackResult | null | 'nothing'> {
  return store.withLock(async () => {
    const state = await store.readState();
    const record = desktopRecord(state, name);
    const pending = record.pendingBoot;
    if (!pending) return 'nothing';
    if (pending.kind !== 'assign') {
      throw new LayerError('unassign.pending', `the pending unassign of ${pending.refs.join(', ')} cannot be undone (the files are deleted in the guest); it completes at ${name}'s next start`);
    }
    const handle = desktopHandle(store, state, name);
    record.operation = { ...newOperation('assign', pending.refs, [], await runtime.isRunning(handle)), phase: 'allocated', created: pending.created };
    record.pendingBoot = null;
    await store.writeState(state);
    return undoOperation(undoContext(store, state, runtime, name, log));
  });
}

export interface ApplyResult {
  /** What was pending (null: nothing was). */
  pending: PendingBootChange | null;
  applied: boolean;
  /** Why not, when not applied. */
  reason: { code: string; message: string } | null;
  report: RecomposeReport | null;
}

/**
 * Apply the desktop's pending change, for a caller that holds the store lock and knows the
 * desktop is not running (the hook at `prepare`, qlayer before a start). An unfinished recompose
 * is finished first. A failure before the recompose plan is recorded leaves the change pending
 * with its reason; after, the recompose is resumable like any other.
 */
export async function applyPendingLocked(store: Store, state: StoreState, name: string, by: PendingAttempt['by'], log: Log = quiet): Promise<ApplyResult> {
  const record = desktopRecord(state, name);
  const pending = record.pendingBoot ?? null;
  const dir = store.path(record.dir);
  try {
    if (record.recompose && !record.recompose.atNextBoot) {
      throw new LayerError('desktop.recompose-pending', `desktop ${name} has an unfinished recompose; finish it first: qlayer desktop recompose ${name}`);
    }
    if (record.recompose) {
      // Only a plan of a change made --at-next-boot gets here (hasWorkAtStart): qlayer's own
      // interrupted recompose is for `desktop recompose`, and a start refused it before.
      log(`finishing the unfinished recompose of ${name}`);
      await recomposeRecorded(store, state, name, log, null);
    }
    if (!pending) return { pending: null, applied: false, reason: null, report: null };
    const handle = desktopHandle(store, state, name);
    let report: RecomposeReport;
    if (pending.kind === 'assign') {
      const manifests: AppManifest[] = await Promise.all(pending.refs.map((ref) => resolveApp(store, ref)));
      log('locating placeholders offline');
      // As a plain assign does: the assigned files are looked at again (blocks the user freed since).
      const { located, rechecked } = await locateOffline(store, handle, manifests, record.files);
      for (const gone of rechecked.released) log(`${gone.path}: ${gone.why}; its ${gone.bytes} freed bytes no longer read from the apps layer`);
      record.files = rechecked.files;
      record.recompose = { ...planAssign(record, manifests, located), atNextBoot: true };
      record.pendingBoot = null;
      await store.writeState(state);
      report = await recomposeRecorded(store, state, name, log, null);
      recordDirect(record, { add: pending.refs });
    } else {
      const manifests = await Promise.all(pending.refs.map((ref) => resolveApp(store, ref)));
      await assertGoneOffline(store, handle, manifests.flatMap((m) => m.files.map((f) => f.path)));
      record.recompose = { ...planUnassign(record, pending.refs), atNextBoot: true };
      record.pendingBoot = null;
      await store.writeState(state);
      report = await recomposeRecorded(store, state, name, log, null);
      recordDirect(record, { remove: pending.refs });
    }
    await store.writeState(state);
    await rm(join(dir, PENDING_STATUS_FILE), { force: true });
    return { pending, applied: true, reason: null, report };
  } catch (error) {
    const reason = { code: (error as { code?: string }).code ?? 'error', message: (error as Error).message ?? String(error) };
    if (pending) await writeAttempt(dir, { at: new Date().toISOString(), by, code: reason.code, reason: reason.message, requestedAt: pending.requestedAt }).catch(() => undefined);
    return { pending, applied: false, reason, report: null };
  }
}

/** Whether a start has anything to do for this desktop (read without the lock: the fast path). */
export function hasWorkAtStart(record: DesktopRecord | undefined): boolean {
  return record !== undefined && (record.pendingBoot != null || record.recompose?.atNextBoot === true);
}

/**
 * `qlayer desktop start`: apply a waiting change before the start (the hook would too; this
 * covers a host without it). Never stops the start: a failure is recorded and the start goes on.
 */
export async function applyPendingBeforeStart(store: Store, runtime: DesktopRuntime, name: string, log: Log = quiet): Promise<ApplyResult | null> {
  const before = await store.readState();
  const record = desktopRecord(before, name);
  if (!record.pendingBoot) return null;
  if (await runtime.isRunning(desktopHandle(store, before, name))) return null;
  return store.withLock(async () => applyPendingLocked(store, await store.readState(), name, 'qlayer', log));
}

/** How long the hook tries for the store lock before it lets the start go on without the change. */
const HOOK_LOCK_PATIENCE_MS = 3000;

/**
 * The hook's part (src/virt/hook.ts calls it with what the domain's metadata says): apply the
 * desktop's pending change if it has one. Fast when there is nothing to do (one state read, no
 * lock). The store lock is tried for a few seconds only; a locked store leaves the change
 * pending with that reason.
 */
export async function applyPendingAtStart(
  storeRoot: string,
  storeId: string | undefined,
  name: string,
  diskPath: string | undefined,
  options: { log?: Log; namesAppsLink?: boolean } = {},
): Promise<ApplyResult | null> {
  const log = options.log ?? quiet;
  const store = await Store.open(storeRoot, { create: false });
  if (storeId !== undefined && store.id !== storeId) return null; // another store now lives there
  const state = await store.readState();
  const record = state.desktops[name];
  if (!record || !hasWorkAtStart(record)) return null;
  // The domain must open this desktop's own disk: anything else is not ours to touch.
  if (diskPath !== undefined && diskPath !== join(store.path(record.dir), 'user.qcow2')) return null;
  // A definition that names an apps generation itself (made by an older qlayer, or edited by
  // hand) would open the old one after a recompose, or fail the start: leave the change pending.
  if (options.namesAppsLink === false) {
    const reason = {
      code: 'hook.stale-definition',
      message: `the domain's disk chain names an apps generation, not ${join(store.path(record.dir), APPS_LINK)}; start the desktop once with qlayer desktop start ${name}, which rewrites it (and applies the change)`,
    };
    if (record.pendingBoot) await writeAttempt(store.path(record.dir), { at: new Date().toISOString(), by: 'hook', code: reason.code, reason: reason.message, requestedAt: record.pendingBoot.requestedAt }).catch(() => undefined);
    return { pending: record.pendingBoot ?? null, applied: false, reason, report: null };
  }
  const deadline = Date.now() + HOOK_LOCK_PATIENCE_MS;
  for (;;) {
    try {
      return await store.withLock(async () => applyPendingLocked(store, await store.readState(), name, 'hook', log));
    } catch (error) {
      if ((error as { code?: string }).code !== 'store.locked' || Date.now() >= deadline) {
        const pending = record.pendingBoot;
        const reason = { code: (error as { code?: string }).code ?? 'error', message: (error as Error).message };
        if (pending) {
          await writeAttempt(store.path(record.dir), { at: new Date().toISOString(), by: 'hook', code: reason.code, reason: reason.message, requestedAt: pending.requestedAt }).catch(() => undefined);
        }
        return { pending: pending ?? null, applied: false, reason, report: null };
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }
}

/**
 * A plain assign, update or unassign shuts the guest down. On a desktop someone started outside
 * qlayer (virsh start, virt-manager) that ends their session: refused, naming the two ways on.
 */
export async function refuseStartedOutside(runtime: DesktopRuntime, handle: DesktopHandle, verb: string): Promise<void> {
  if (!runtime.startedOutside || !(await runtime.isRunning(handle))) return;
  if (!(await runtime.startedOutside(handle))) return;
  throw new LayerError(
    'desktop.started-outside',
    `desktop ${handle.name} was started outside qlayer (virsh start, virt-manager): a plain ${verb} shuts the guest down, which would end that session. ` +
      `Use qlayer desktop ${verb} ${handle.name} APP... --at-next-boot (the guest does its part now; the rest happens at its next start), or shut it down first (qlayer desktop stop ${handle.name}).`,
  );
}
