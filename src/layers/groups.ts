/**
 * Groups of desktops and their rollouts. A desktop's apps are its own (directApps) plus the apps
 * of every group it belongs to; a rollout brings each member to that set with the usual
 * operations (assign, update for another version of an app it has, unassign for an app nothing
 * wants any more), a few members at a time, under one hold of the store lock.
 *
 * A member that is running when the rollout reaches it is not shut down under its user: it is
 * left pending in the group, and the next rollout of the group (`qlayer group rollout G`, or any
 * group command) does it. Rolling out again when nothing changed does nothing.
 */
import { appKey, resolveApp, type AppManifest } from './app.js';
import { appName, wantedApps } from './app-sources.js';
import { assignLocked } from './desktop-assign.js';
import { desktopHandle } from './desktop-handle.js';
import { unassignLocked } from './desktop-unassign.js';
import { updateLocked } from './desktop-update.js';
import { LayerError } from './errors.js';
import { checkName } from './names.js';
import type { DesktopRuntime } from './runtime.js';
import type { GroupRecord, StoreState } from './state.js';
import type { Store } from './store.js';
import { pool } from './pool.js';
import { describeLoss, rebaseLocked, rebaseLossIn } from './rebase.js';

export interface RolloutOutcome {
  desktop: string;
  status: 'changed' | 'unchanged' | 'pending' | 'failed';
  added: string[];
  updated: string[];
  removed: string[];
  reason?: string;
  code?: string;
  elapsedMs: number;
}

export interface RolloutOptions {
  parallel?: number;
  log?: (desktop: string, message: string) => void;
}

function groupsOf(state: StoreState): Record<string, GroupRecord> {
  state.groups ??= {};
  return state.groups;
}

function groupRecord(state: StoreState, name: string): GroupRecord {
  const group = groupsOf(state)[name];
  if (!group) throw new LayerError('group.not-found', `no group named ${name} (create it with: qlayer group create ${name})`);
  return group;
}

export async function createGroup(store: Store, name: string): Promise<GroupRecord> {
  checkName('group', name);
  return store.withLock(async () => {
    const state = await store.readState();
    if (state.desktops[name]) throw new LayerError('group.name-taken', `${name} is already a desktop's name; a group needs a name of its own`);
    if (groupsOf(state)[name]) throw new LayerError('group.exists', `a group named ${name} exists already`);
    const group: GroupRecord = { desktops: [], apps: [], pending: [], createdAt: new Date().toISOString() };
    groupsOf(state)[name] = group;
    await store.writeState(state);
    return group;
  });
}

/** Bring one stopped desktop to its wanted apps; the caller holds the lock. */
async function converge(store: Store, state: StoreState, runtime: DesktopRuntime, desktop: string, log: (message: string) => void): Promise<Omit<RolloutOutcome, 'desktop' | 'elapsedMs'>> {
  const record = state.desktops[desktop]!;
  const wanted = wantedApps(state, desktop);
  const wantedByName = new Map(wanted.map((key) => [appName(key), key]));
  const haveByName = new Map(record.apps.map((key) => [appName(key), key]));
  const removed = record.apps.filter((key) => !wantedByName.has(appName(key)));
  const updated = wanted.filter((key) => haveByName.has(appName(key)) && haveByName.get(appName(key)) !== key);
  const added = wanted.filter((key) => !haveByName.has(appName(key)));
  if (!removed.length && !updated.length && !added.length) return { status: 'unchanged', added, updated, removed };
  // The desktop's own apps (directApps) are not changed here: only what its groups bring.
  if (removed.length) await unassignLocked(store, state, runtime, desktop, removed, log);
  for (const key of updated) await updateLocked(store, state, runtime, desktop, key, log);
  if (added.length) {
    const manifests: AppManifest[] = await Promise.all(added.map((key) => resolveApp(store, key)));
    await assignLocked(store, state, runtime, desktop, manifests, log);
  }
  return { status: 'changed', added, updated, removed };
}

/**
 * Bring every member of `name` (or only `only`) to its wanted apps. Members that run are left
 * pending in the group; the others go `parallel` at a time.
 */
async function rolloutLocked(store: Store, state: StoreState, runtime: DesktopRuntime, name: string, options: RolloutOptions, only?: string[]): Promise<RolloutOutcome[]> {
  const group = groupRecord(state, name);
  const members = only ?? [...new Set([...group.desktops, ...group.pending.filter((d) => group.desktops.includes(d))])];
  return pool(members, options.parallel ?? 1, async (desktop): Promise<RolloutOutcome> => {
    const started = Date.now();
    const log = (message: string): void => options.log?.(desktop, message);
    if (await runtime.isRunning(desktopHandle(store, state, desktop))) {
      if (!group.pending.includes(desktop)) group.pending.push(desktop);
      await store.writeState(state);
      log(`running: left pending; the next rollout of ${name} does it once it is stopped`);
      return { desktop, status: 'pending', added: [], updated: [], removed: [], reason: `running; left pending: qlayer group rollout ${name}`, elapsedMs: 0 };
    }
    try {
      const outcome = await converge(store, state, runtime, desktop, log);
      group.pending = group.pending.filter((d) => d !== desktop);
      await store.writeState(state);
      return { desktop, ...outcome, elapsedMs: Date.now() - started };
    } catch (error) {
      const code = (error as { code?: unknown }).code;
      log(`failed: ${(error as Error).message}`);
      return {
        desktop,
        status: 'failed',
        added: [],
        updated: [],
        removed: [],
        reason: (error as Error).message,
        ...(typeof code === 'string' ? { code } : {}),
        elapsedMs: Date.now() - started,
      };
    }
  });
}

/** Change a group under the lock, then roll the change out. */
async function changeAndRollOut(
  store: Store,
  runtime: DesktopRuntime,
  name: string,
  options: RolloutOptions,
  change: (state: StoreState, group: GroupRecord) => Promise<string[] | undefined>,
): Promise<RolloutOutcome[]> {
  return store.withLock(async () => {
    const state = await store.readState();
    const group = groupRecord(state, name);
    const only = await change(state, group);
    await store.writeState(state);
    return rolloutLocked(store, state, runtime, name, options, only);
  });
}

/** Add desktops to a group; they get its apps (rolled out to them only). */
export function addToGroup(store: Store, runtime: DesktopRuntime, name: string, desktops: string[], options: RolloutOptions = {}): Promise<RolloutOutcome[]> {
  return changeAndRollOut(store, runtime, name, options, async (state, group) => {
    for (const desktop of desktops) {
      if (!state.desktops[desktop]) throw new LayerError('desktop.not-found', `no desktop named ${desktop}`);
      // From now on the desktop's own apps are told apart from its groups'.
      state.desktops[desktop]!.directApps ??= [...state.desktops[desktop]!.apps];
      if (!group.desktops.includes(desktop)) group.desktops.push(desktop);
    }
    return [...new Set([...desktops, ...group.pending])];
  });
}

/** Give the group these app versions (replacing other versions of the same apps) and roll out. */
export function groupAssign(store: Store, runtime: DesktopRuntime, name: string, refs: string[], options: RolloutOptions = {}): Promise<RolloutOutcome[]> {
  return changeAndRollOut(store, runtime, name, options, async (_state, group) => {
    const keys = (await Promise.all(refs.map((ref) => resolveApp(store, ref)))).map(appKey);
    group.apps = [...group.apps.filter((key) => !keys.some((k) => appName(k) === appName(key))), ...keys];
    return undefined;
  });
}

/** Take apps (by name) out of the group and roll out: members drop them unless they are their own. */
export function groupUnassign(store: Store, runtime: DesktopRuntime, name: string, apps: string[], options: RolloutOptions = {}): Promise<RolloutOutcome[]> {
  return changeAndRollOut(store, runtime, name, options, async (_state, group) => {
    const names = apps.map((a) => appName(a));
    const missing = names.filter((n) => !group.apps.some((key) => appName(key) === n));
    if (missing.length) throw new LayerError('group.not-assigned', `group ${name} has no app ${missing.join(', ')} (it has: ${group.apps.join(', ') || 'none'})`);
    group.apps = group.apps.filter((key) => !names.includes(appName(key)));
    return undefined;
  });
}

/** Roll the group out again: pending members and any that drifted. */
export function rollOutGroup(store: Store, runtime: DesktopRuntime, name: string, options: RolloutOptions = {}): Promise<RolloutOutcome[]> {
  return changeAndRollOut(store, runtime, name, options, async () => undefined);
}

export function listGroups(state: StoreState): Array<{ name: string } & GroupRecord> {
  return Object.entries(state.groups ?? {}).map(([name, group]) => ({ name, ...group }));
}

// ---------------------------------------------------------------- group rebase (issue 13)

export interface GroupRebaseOutcome {
  desktop: string;
  status: 'rebased' | 'unchanged' | 'pending' | 'failed';
  from?: string;
  reason?: string;
  code?: string;
  elapsedMs: number;
}

/**
 * Rebase every member of the group onto `base`, `parallel` at a time, under one hold of the
 * lock. A running member is left pending (group.rebase.pending) and done by the next
 * `group rebase` once stopped; members on `base` already are unchanged, so a rerun only does
 * what is left. Without `yes` nothing changes: the error lists what each member would lose.
 */
export async function groupRebase(store: Store, runtime: DesktopRuntime, name: string, base: string, options: RolloutOptions & { yes?: boolean } = {}): Promise<GroupRebaseOutcome[]> {
  return store.withLock(async () => {
    const state = await store.readState();
    const group = groupRecord(state, name);
    if (!state.bases[base]) throw new LayerError('base.not-found', `no base named ${base} (import one with: qlayer base import ${base} IMAGE)`);
    const members = [...group.desktops];
    if (!options.yes) {
      const losses = [];
      for (const desktop of members) {
        if (state.desktops[desktop]!.base === base && !state.desktops[desktop]!.rebase) continue;
        try {
          losses.push(describeLoss(await rebaseLossIn(store, state, runtime, desktop, base)));
        } catch (error) {
          if ((error as { code?: string }).code !== 'desktop.running') throw error;
          losses.push(`${desktop} is running: it would be left pending until it is stopped`);
        }
      }
      throw new LayerError('rebase.needs-yes', `${losses.length ? losses.join('\n') : `every member of ${name} is on ${base} already`}\nnothing was changed; run again with --yes to rebase`);
    }
    group.rebase = { base, pending: group.rebase?.base === base ? group.rebase.pending.filter((d) => group.desktops.includes(d)) : [] };
    await store.writeState(state);
    const tracked = group.rebase;
    return pool(members, options.parallel ?? 1, async (desktop): Promise<GroupRebaseOutcome> => {
      const started = Date.now();
      const log = (message: string): void => options.log?.(desktop, message);
      const from = state.desktops[desktop]!.base;
      if (from !== base || state.desktops[desktop]!.rebase) {
        if (await runtime.isRunning(desktopHandle(store, state, desktop))) {
          if (!tracked.pending.includes(desktop)) tracked.pending.push(desktop);
          await store.writeState(state);
          log(`running: left pending; the next qlayer group rebase ${name} --base ${base} does it once it is stopped`);
          return { desktop, status: 'pending', from, reason: `running; left pending: qlayer group rebase ${name} --base ${base} --yes`, elapsedMs: 0 };
        }
      }
      try {
        const result = await rebaseLocked(store, state, runtime, desktop, base, { yes: true, unchangedIfOn: true, log });
        tracked.pending = tracked.pending.filter((d) => d !== desktop);
        await store.writeState(state);
        log(result.unchanged ? `on ${base} already` : `rebased from ${result.from} to ${base}`);
        return { desktop, status: result.unchanged ? 'unchanged' : 'rebased', from: result.from, elapsedMs: Date.now() - started };
      } catch (error) {
        const code = (error as { code?: unknown }).code;
        log(`failed: ${(error as Error).message}`);
        return { desktop, status: 'failed', from, reason: (error as Error).message, ...(typeof code === 'string' ? { code } : {}), elapsedMs: Date.now() - started };
      }
    });
  });
}
