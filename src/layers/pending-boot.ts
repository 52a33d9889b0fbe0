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
 *
 * This module is the guest half and its undo; pending-boot-apply.ts is the host half, and
 * pending-boot-status.ts what `desktop show` reports of a change still waiting.
 */
import { allocatePlaceholders, checkGuestSpace, createdBeforeFailure, removeAppFiles, type AllocationResult, type RollbackResult } from './allocate.js';
import { appKey, resolveApp } from './app.js';
import { groupsWanting } from './app-sources.js';
import { refusePendingBoot, refuseStaging } from './desktop-guards.js';
import { desktopHandle, desktopRecord } from './desktop-handle.js';
import { undoContext } from './desktop-undo.js';
import { LayerError } from './errors.js';
import { failAndUndo, newOperation, undoOperation } from './guest-operation.js';
import { quiet, type Log } from './log.js';
import { checkPathConflicts, planUnassign } from './plan.js';
import type { DesktopHandle, DesktopRuntime } from './runtime.js';
import type { DesktopRecord } from './state.js';
import type { Store } from './store.js';

/** The guest must be running, and started by qlayer or anyone: allocation needs the guest, not a restart. */
async function requireRunning(runtime: DesktopRuntime, handle: DesktopHandle, name: string, verb: string): Promise<void> {
  if (!(await runtime.isRunning(handle))) {
    throw new LayerError('desktop.not-running', `${verb} --at-next-boot needs desktop ${name} running (the guest does its part now); it is not: ${verb} without --at-next-boot works on a stopped desktop`);
  }
}

function checkIdle(name: string, record: DesktopRecord): void {
  refuseStaging(name, record);
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
