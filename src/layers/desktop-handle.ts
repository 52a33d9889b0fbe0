/**
 * A desktop's record in the store state and the handle a runtime boots it by: the names every
 * other desktop module starts from.
 */
import { join } from 'node:path';
import { LayerError } from './errors.js';
import { APPS_LINK, ensureAppsLinkSync, USER_LAYER } from './recompose.js';
import type { DesktopHandle } from './runtime.js';
import type { DesktopRecord, StoreState } from './state.js';
import type { Store } from './store.js';

export function desktopRecord(state: StoreState, name: string): DesktopRecord {
  const record = state.desktops[name];
  if (!record) throw new LayerError('desktop.not-found', `no desktop named ${name} (create it with: qlayer desktop create ${name} --base BASE)`);
  return record;
}

/** Where the desktop's base image is (a record whose base is gone means a damaged state). */
export function basePathOf(store: Store, state: StoreState, record: DesktopRecord): string {
  const base = state.bases[record.base];
  if (!base) throw new LayerError('store.corrupt-state', `desktop's base ${record.base} is missing from the store`);
  return store.path(base.file);
}

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
