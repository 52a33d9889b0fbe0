/**
 * What `desktop show` and `desktop list` print: a desktop's record, paths and state, with any
 * unfinished work and the commands that end it.
 */
import { join } from 'node:path';
import { desktopHandle, desktopRecord } from './desktop-handle.js';
import { operationView } from './guest-operation.js';
import { pendingBootView, type PendingBootView } from './pending-boot-status.js';
import { appsLayerName } from './recompose.js';
import type { DesktopRuntime } from './runtime.js';
import type { Store } from './store.js';

export interface DesktopView {
  name: string;
  state: 'running' | 'stopped' | 'recompose-pending';
  base: string;
  apps: string[];
  files: number;
  paths: { base: string; apps: string; user: string; home?: string };
  appsGeneration: number;
  pendingRecompose: { phase: string; apps: string[] } | null;
  /** An assign or update whose guest side did not finish: what it is and the commands that end it. */
  operation: ReturnType<typeof operationView> | null;
  /** An assign or unassign `--at-next-boot` waiting for the next start, with why the last start did not apply it. */
  pendingAtNextBoot: PendingBootView | null;
  /** A rebase that has not finished (issue 13). */
  rebase?: { phase: string; from: string; to: string } | null;
  /** This is the staging desktop of that desktop's rebase (issue 13). */
  stagingFor?: string;
  createdAt: string;
}

export async function showDesktop(store: Store, runtime: DesktopRuntime | null, name: string): Promise<DesktopView> {
  const state = await store.readState();
  const record = desktopRecord(state, name);
  const handle = desktopHandle(store, state, name);
  const running = runtime ? await runtime.isRunning(handle) : false;
  return {
    name,
    state: record.recompose ? 'recompose-pending' : running ? 'running' : 'stopped',
    base: record.base,
    apps: record.apps,
    files: record.files.length,
    paths: { base: handle.chain[2]!.path, apps: join(store.path(record.dir), appsLayerName(record.appsGeneration)), user: handle.userPath, ...(handle.home ? { home: handle.home } : {}) },
    appsGeneration: record.appsGeneration,
    pendingRecompose: record.recompose ? { phase: record.recompose.phase, apps: record.recompose.apps } : null,
    operation: record.operation ? operationView(name, record.operation) : null,
    pendingAtNextBoot: await pendingBootView(store, record),
    ...(record.rebase ? { rebase: { phase: record.rebase.phase, from: record.rebase.from, to: record.rebase.to } } : {}),
    ...(record.stagingFor !== undefined ? { stagingFor: record.stagingFor } : {}),
    createdAt: record.createdAt,
  };
}

export async function listDesktops(store: Store, runtime: DesktopRuntime | null): Promise<DesktopView[]> {
  const state = await store.readState();
  return Promise.all(Object.keys(state.desktops).sort().map((name) => showDesktop(store, runtime, name)));
}
