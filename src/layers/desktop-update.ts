/**
 * Updating an app to another version in one guest session: the old version's files deleted and
 * the new one's placeholders allocated in one boot, then one shutdown and one recompose.
 */
import { removeAppFiles } from './allocate.js';
import { appKey, resolveApp } from './app.js';
import { recordDirect } from './app-sources.js';
import type { AssignResult } from './desktop-assign.js';
import { idleDesktopRecord, refuseStaging } from './desktop-guards.js';
import { guestSide, type AssignHooks } from './desktop-guest-side.js';
import { desktopRecord } from './desktop-handle.js';
import { assertGoneOffline, recomposeRecorded } from './desktop-offline.js';
import { settleOperation } from './desktop-undo.js';
import { LayerError } from './errors.js';
import { quiet, type Log } from './log.js';
import { checkPathConflicts, planUnassign, planUpdate } from './plan.js';
import type { DesktopRuntime } from './runtime.js';
import type { StoreState } from './state.js';
import type { Store } from './store.js';

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
    refuseStaging(name, desktopRecord(state, name));
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
