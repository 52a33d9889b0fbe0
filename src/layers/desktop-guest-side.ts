/**
 * The guest-side steps an assign and an update share: the operation recorded, the guest started
 * if needed, placeholders allocated, the guest shut down and the placeholders located offline,
 * with everything undone if a step fails.
 */
import { allocatePlaceholders, checkGuestSpace, createdBeforeFailure, type AllocationResult } from './allocate.js';
import { appKey, type AppManifest } from './app.js';
import { assertAgentAnswers, ensureRunning } from './desktop-boot.js';
import { assertNotInUse, refuseStartedOutside } from './desktop-guards.js';
import { desktopHandle, desktopRecord } from './desktop-handle.js';
import { locateOffline } from './desktop-offline.js';
import { undoContext } from './desktop-undo.js';
import { failAndUndo, newOperation } from './guest-operation.js';
import type { Log } from './log.js';
import type { DesktopHandle, DesktopRuntime } from './runtime.js';
import type { LocatedFile, StoreState } from './state.js';
import type { Store } from './store.js';

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
export async function guestSide(
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
