import { appKey, type AppManifest } from './app.js';
import { LayerError } from './errors.js';
import type { DesktopRecord, LocatedFile, RecomposePlan } from './state.js';

/**
 * Refuse apps whose files claim the same guest path, among themselves or with apps the desktop
 * already has. Checked before anything is allocated in the guest.
 */
export function checkPathConflicts(record: Pick<DesktopRecord, 'apps' | 'files'>, adding: AppManifest[]): void {
  const owner = new Map<string, string>();
  for (const file of record.files) owner.set(file.path, file.app);
  for (const manifest of adding) {
    const key = appKey(manifest);
    if (record.apps.some((a) => a.split('@')[0] === manifest.name)) {
      throw new LayerError('assign.already-assigned', `the desktop already has ${record.apps.find((a) => a.split('@')[0] === manifest.name)}; to update, unassign it first`);
    }
    for (const file of manifest.files) {
      const other = owner.get(file.path);
      if (other) throw new LayerError('assign.path-conflict', `${key} and ${other} both claim ${file.path}`);
      owner.set(file.path, key);
    }
  }
}

function basePlan(record: DesktopRecord): Pick<RecomposePlan, 'fromGeneration' | 'toGeneration' | 'startedAt' | 'phase' | 'attempts'> {
  return {
    phase: 'planned',
    fromGeneration: record.appsGeneration,
    toGeneration: record.appsGeneration + 1,
    startedAt: new Date().toISOString(),
    attempts: 0,
  };
}

/** The plan that adds these located placeholders to the desktop's apps. */
export function planAssign(record: DesktopRecord, manifests: AppManifest[], located: LocatedFile[]): RecomposePlan {
  checkPathConflicts(record, manifests);
  return {
    ...basePlan(record),
    apps: [...record.apps, ...manifests.map(appKey)],
    files: [...record.files, ...located],
    removedExtents: [],
    newlyAssigned: located.map((f) => f.path),
  };
}

/** The plan that removes these apps (name or name@version) from the desktop. */
export function planUnassign(record: DesktopRecord, apps: string[]): RecomposePlan {
  const removing = new Set<string>();
  for (const ref of apps) {
    const match = record.apps.find((a) => a === ref || a.split('@')[0] === ref);
    if (!match) throw new LayerError('unassign.not-assigned', `the desktop has no app ${ref} (it has: ${record.apps.join(', ') || 'none'})`);
    removing.add(match);
  }
  return {
    ...basePlan(record),
    apps: record.apps.filter((a) => !removing.has(a)),
    files: record.files.filter((f) => !removing.has(f.app)),
    removedExtents: record.files.filter((f) => removing.has(f.app)).flatMap((f) => f.extents.map((e) => ({ diskOffset: e.diskOffset, length: e.length }))),
    newlyAssigned: [],
  };
}

/**
 * The plan that replaces app `current` (name@version) by `next`, whose placeholders are located:
 * the old version's blocks were freed by the guest (they may now hold the new placeholders),
 * the new files take its place in the assignment order.
 */
export function planUpdate(record: DesktopRecord, current: string, next: AppManifest, located: LocatedFile[]): RecomposePlan {
  const removal = planUnassign(record, [current]);
  checkPathConflicts({ apps: removal.apps, files: removal.files }, [next]);
  const at = record.apps.indexOf(current);
  const apps = [...record.apps];
  apps.splice(at, 1, appKey(next));
  return {
    ...basePlan(record),
    apps,
    files: [...removal.files, ...located],
    removedExtents: removal.removedExtents,
    newlyAssigned: located.map((f) => f.path),
  };
}
