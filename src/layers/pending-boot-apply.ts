/**
 * The host half of a change made `--at-next-boot` (see pending-boot.ts): locate and recompose
 * when the desktop next starts, run by libvirt's hook or by `qlayer desktop start`. A change that
 * cannot be applied stays pending, with why, and the start goes on.
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { resolveApp, type AppManifest } from './app.js';
import { recordDirect } from './app-sources.js';
import { desktopHandle, desktopRecord } from './desktop-handle.js';
import { assertGoneOffline, locateOffline, recomposeRecorded } from './desktop-offline.js';
import { LayerError } from './errors.js';
import { quiet, type Log } from './log.js';
import { PENDING_STATUS_FILE, writeAttempt, type PendingAttempt } from './pending-boot-status.js';
import { planAssign, planUnassign } from './plan.js';
import { APPS_LINK, type RecomposeReport } from './recompose.js';
import type { DesktopRuntime } from './runtime.js';
import type { DesktopRecord, PendingBootChange, StoreState } from './state.js';
import { Store } from './store.js';

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
