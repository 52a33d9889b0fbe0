/**
 * Undoing an assign or update whose guest side did not finish: the placeholders it left in the
 * guest, and its record (the undo itself is guest-operation.ts; this binds it to the store).
 */
import type { RollbackResult } from './allocate.js';
import { resolveApp } from './app.js';
import { desktopHandle, desktopRecord } from './desktop-handle.js';
import { undoOperation, type UndoContext } from './guest-operation.js';
import { quiet, type Log } from './log.js';
import type { DesktopRuntime } from './runtime.js';
import type { StoreState } from './state.js';
import type { Store } from './store.js';

/** What an undo needs from the store: the desktop's record and handle, its apps, a way to save. */
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
export async function settleOperation(store: Store, state: StoreState, runtime: DesktopRuntime, name: string, log: Log): Promise<void> {
  const op = desktopRecord(state, name).operation;
  if (!op) return;
  log(`finishing the undo of an unfinished ${op.kind} of ${op.apps.join(', ')}${op.failure ? ` (${op.failure.code})` : ''}`);
  await undoOperation(undoContext(store, state, runtime, name, log));
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
