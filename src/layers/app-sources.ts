/**
 * Where a desktop's apps come from: its own assignments (directApps) and its groups. Shared by
 * the desktop commands, which keep directApps up to date, and the group rollouts, which never
 * touch it.
 */
import type { DesktopRecord, StoreState } from './state.js';

export const appName = (key: string): string => key.split('@')[0]!;

/** The apps assigned to the desktop itself (every app, in a store from before groups). */
export function directApps(record: DesktopRecord): string[] {
  return record.directApps ?? record.apps;
}

/** The groups of `desktop` that carry an app of this name, by group name. */
export function groupsWanting(state: StoreState, desktop: string, app: string): string[] {
  return Object.entries(state.groups ?? {})
    .filter(([, group]) => group.desktops.includes(desktop) && group.apps.some((key) => appName(key) === appName(app)))
    .map(([name]) => name);
}

/** What a desktop should have: its own apps, then its groups' (a group's version wins over its own). */
export function wantedApps(state: StoreState, desktop: string): string[] {
  const byName = new Map<string, string>();
  for (const key of directApps(state.desktops[desktop]!)) byName.set(appName(key), key);
  for (const group of Object.values(state.groups ?? {})) {
    if (group.desktops.includes(desktop)) for (const key of group.apps) byName.set(appName(key), key);
  }
  return [...byName.values()];
}

/** After a direct command: the desktop's own apps, where it tells them apart (it is in a group). */
export function recordDirect(record: DesktopRecord, change: { add?: string[]; remove?: string[] }): void {
  if (!record.directApps) return;
  const removing = new Set((change.remove ?? []).map(appName));
  const adding = change.add ?? [];
  const addingNames = new Set(adding.map(appName));
  record.directApps = [...record.directApps.filter((key) => !removing.has(appName(key)) && !addingNames.has(appName(key))), ...adding];
}
