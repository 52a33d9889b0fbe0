/**
 * Assigning apps to many desktops in one command. The desktops go through the usual assign
 * (allocate in the guest, shut down, locate, recompose) a few at a time, all under one hold of
 * the store lock and one shared state: each assign changes only its own desktop's record, and
 * the store writes the whole state in order. One desktop failing leaves the others going; its
 * outcome says what happened and, if its recompose was already recorded, how to finish it.
 */
import { availableParallelism, freemem } from 'node:os';
import { appKey, resolveApp } from './app.js';
import { recordDirect } from './app-sources.js';
import { assignLocked, type AssignResult } from './desktop-assign.js';
import { refuseStaging } from './desktop-guards.js';
import { LayerError } from './errors.js';
import type { DesktopRuntime } from './runtime.js';
import type { Store } from './store.js';
import { pool } from './pool.js';

export interface FleetOutcome {
  desktop: string;
  status: 'assigned' | 'skipped' | 'failed';
  /** Why it was skipped or how it failed. */
  reason?: string;
  code?: string;
  /** Set when a recompose was recorded and did not finish: the command that finishes it. */
  resume?: string;
  result?: AssignResult;
  elapsedMs: number;
}

export interface FleetOptions {
  /** Desktops at once (default: defaultParallelism). */
  parallel?: number;
  /** Progress of one desktop. */
  log?: (desktop: string, message: string) => void;
}

/**
 * How many desktops to assign at once on this host: one per core (a guest running the
 * allocation keeps one busy), and no more than free memory holds guests of `guestMemoryMiB`
 * with room for QEMU itself.
 */
export function defaultParallelism(guestMemoryMiB: number): number {
  const byMemory = Math.floor(freemem() / ((guestMemoryMiB + 256) * 1024 * 1024));
  return Math.max(1, Math.min(availableParallelism(), byMemory));
}

/**
 * Assign `refs` to each desktop in `names` ('all': every desktop in the store). A desktop that
 * already has one of the apps is skipped when 'all' was asked for, and fails otherwise.
 */
export async function assignToDesktops(store: Store, runtime: DesktopRuntime, names: string[] | 'all', refs: string[], options: FleetOptions = {}): Promise<FleetOutcome[]> {
  return store.withLock(async () => {
    const state = await store.readState();
    const desktops = names === 'all' ? Object.keys(state.desktops).sort() : [...new Set(names)];
    const unknown = desktops.filter((d) => !state.desktops[d]);
    if (unknown.length) throw new LayerError('desktop.not-found', `no desktop named ${unknown.join(', ')} (qlayer desktop list shows them)`);
    if (desktops.length === 0) throw new LayerError('desktop.not-found', 'the store has no desktops');
    const manifests = await Promise.all(refs.map((ref) => resolveApp(store, ref)));
    const parallel = options.parallel ?? 1;
    if (!Number.isInteger(parallel) || parallel < 1) throw new LayerError('fleet.bad-parallel', `--parallel must be a whole number of at least 1, not ${parallel}`);

    return pool(desktops, parallel, async (desktop): Promise<FleetOutcome> => {
      const started = Date.now();
      const log = (message: string): void => options.log?.(desktop, message);
      const has = manifests.map((m) => state.desktops[desktop]!.apps.find((a) => a.split('@')[0] === m.name)).filter((a): a is string => a !== undefined);
      // An interrupted rebase's staging desktop gets its apps from that rebase: --all passes it
      // by, a list that names it fails there (refuseStaging).
      const stagingFor = state.desktops[desktop]!.stagingFor;
      if (names === 'all' && stagingFor !== undefined) {
        return { desktop, status: 'skipped', reason: `the staging desktop of ${stagingFor}'s rebase (qlayer desktop rebase ${stagingFor} --resume finishes it)`, elapsedMs: 0 };
      }
      if (names === 'all' && has.length) {
        return { desktop, status: 'skipped', reason: `already has ${has.join(', ')}`, elapsedMs: 0 };
      }
      try {
        refuseStaging(desktop, state.desktops[desktop]!);
        const result = await assignLocked(store, state, runtime, desktop, manifests, log);
        recordDirect(state.desktops[desktop]!, { add: result.apps });
        await store.writeState(state);
        log(`assigned ${manifests.map(appKey).join(', ')}`);
        return { desktop, status: 'assigned', result, elapsedMs: Date.now() - started };
      } catch (error) {
        const pending = state.desktops[desktop]?.recompose;
        const outcome: FleetOutcome = {
          desktop,
          status: 'failed',
          reason: error instanceof Error ? error.message : String(error),
          elapsedMs: Date.now() - started,
        };
        const code = (error as { code?: unknown }).code;
        if (typeof code === 'string') outcome.code = code;
        if (pending) outcome.resume = `qlayer desktop recompose ${desktop}`;
        log(`failed: ${outcome.reason}`);
        return outcome;
      }
    });
  });
}
