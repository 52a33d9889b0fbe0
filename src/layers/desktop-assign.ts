/**
 * Assigning apps to a desktop: allocate their placeholders in the running guest, shut it down,
 * locate the placeholders offline, recompose.
 */
import type { AllocationResult } from './allocate.js';
import { appKey, resolveApp, type AppManifest } from './app.js';
import { recordDirect } from './app-sources.js';
import { idleDesktopRecord, refuseStaging } from './desktop-guards.js';
import { guestSide, type AssignHooks } from './desktop-guest-side.js';
import { desktopRecord } from './desktop-handle.js';
import { recomposeRecorded } from './desktop-offline.js';
import { settleOperation } from './desktop-undo.js';
import { quiet, type Log } from './log.js';
import { checkPathConflicts, planAssign } from './plan.js';
import type { RecomposeReport } from './recompose.js';
import type { DesktopRuntime } from './runtime.js';
import type { StoreState } from './state.js';
import type { Store } from './store.js';

export interface AssignResult {
  apps: string[];
  /** How the placeholders were made in the guest (helper or script) and how many each way. */
  allocation: AllocationResult;
  located: number;
  report: RecomposeReport;
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
 * Assign apps: allocate their placeholders in the running desktop (started if needed), shut it
 * down, locate the placeholders offline, and recompose. The whole operation holds the store lock.
 */
export async function assignApps(store: Store, runtime: DesktopRuntime, name: string, refs: string[], log: Log = quiet, hooks: AssignHooks = {}): Promise<AssignResult> {
  return store.withLock(async () => {
    const state = await store.readState();
    refuseStaging(name, desktopRecord(state, name));
    const manifests = await Promise.all(refs.map((ref) => resolveApp(store, ref)));
    const result = await assignLocked(store, state, runtime, name, manifests, log, hooks);
    recordDirect(desktopRecord(state, name), { add: result.apps });
    await store.writeState(state);
    return result;
  });
}
