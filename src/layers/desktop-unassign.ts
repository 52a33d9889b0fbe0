/**
 * Unassigning apps from a desktop: delete their files in the guest, shut down, check offline
 * that they are gone, recompose without them.
 */
import { removeAppFiles } from './allocate.js';
import { resolveApp } from './app.js';
import { groupsWanting, recordDirect } from './app-sources.js';
import { ensureRunning } from './desktop-boot.js';
import { assertNotInUse, idleDesktopRecord, refuseStaging, refuseStartedOutside } from './desktop-guards.js';
import { desktopHandle, desktopRecord } from './desktop-handle.js';
import { assertGoneOffline, recomposeRecorded } from './desktop-offline.js';
import { settleOperation } from './desktop-undo.js';
import { LayerError } from './errors.js';
import { quiet, type Log } from './log.js';
import { planUnassign } from './plan.js';
import type { RecomposeReport } from './recompose.js';
import type { DesktopRuntime } from './runtime.js';
import type { StoreState } from './state.js';
import type { Store } from './store.js';

export interface UnassignResult extends RecomposeReport {
  /** App files the user had deleted in the guest already: reported, not an error. */
  alreadyGone: string[];
}

/** Unassign apps: delete their files in the guest, shut down, check they are gone, recompose. */
export async function unassignApps(store: Store, runtime: DesktopRuntime, name: string, refs: string[], log: Log = quiet): Promise<UnassignResult> {
  return store.withLock(async () => {
    const state = await store.readState();
    refuseStaging(name, desktopRecord(state, name));
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
