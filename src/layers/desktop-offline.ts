/**
 * The host's side of a change, on the stopped desktop's chain: reading the guest filesystem
 * offline (locate the placeholders, check deleted files are gone) and running the recorded
 * recompose plan.
 */
import { openChain } from '../chain/chain.js';
import { openGuestFilesystem } from '../fs/index.js';
import { payloadPath, type AppManifest } from './app.js';
import { assertNotInUse } from './desktop-guards.js';
import { basePathOf, desktopHandle, desktopRecord } from './desktop-handle.js';
import { LayerError } from './errors.js';
import { locatePlaceholders, recheckAssigned, type RecheckedFiles } from './locate.js';
import { quiet, type Log } from './log.js';
import { runRecompose, type RecomposeReport } from './recompose.js';
import type { DesktopHandle, DesktopRuntime } from './runtime.js';
import type { LocatedFile, StoreState } from './state.js';
import type { Store } from './store.js';

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
