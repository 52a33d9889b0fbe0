/**
 * What a desktop's pending change (`--at-next-boot`, see pending-boot.ts) looks like from
 * outside: the view `desktop show` prints, and the file beside the desktop's images that says
 * why the last start did not apply it.
 */
import { readFile, rename, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { DesktopRecord } from './state.js';
import type { Store } from './store.js';

/** The file beside the desktop's images that says why the last start did not apply the change. */
export const PENDING_STATUS_FILE = 'pending-boot.json';

/** Why a start did not apply a pending change. */
export interface PendingAttempt {
  at: string;
  /** Who tried: libvirt's hook, or `qlayer desktop start`. */
  by: 'hook' | 'qlayer';
  code: string;
  reason: string;
  /** The request this attempt was about (a later request is a new change). */
  requestedAt: string;
}

export interface PendingBootView {
  kind: 'assign' | 'unassign';
  apps: string[];
  requestedAt: string;
  /** Why the last start did not apply it; null when no start has tried yet. */
  lastAttempt: Omit<PendingAttempt, 'requestedAt'> | null;
}

export async function pendingBootView(store: Store, record: DesktopRecord): Promise<PendingBootView | null> {
  const pending = record.pendingBoot;
  if (!pending) return null;
  const attempt = await readAttempt(store, record);
  return {
    kind: pending.kind,
    apps: pending.refs,
    requestedAt: pending.requestedAt,
    lastAttempt: attempt && attempt.requestedAt === pending.requestedAt ? { at: attempt.at, by: attempt.by, code: attempt.code, reason: attempt.reason } : null,
  };
}

async function readAttempt(store: Store, record: DesktopRecord): Promise<PendingAttempt | null> {
  const text = await readFile(join(store.path(record.dir), PENDING_STATUS_FILE), 'utf8').catch(() => null);
  if (text === null) return null;
  try {
    return JSON.parse(text) as PendingAttempt;
  } catch {
    return null; // half-written by a killed hook: as if no attempt was recorded
  }
}

export async function writeAttempt(desktopDir: string, attempt: PendingAttempt): Promise<void> {
  const target = join(desktopDir, PENDING_STATUS_FILE);
  const temporary = `${target}.${process.pid}.tmp`;
  await writeFile(temporary, `${JSON.stringify(attempt, null, 2)}\n`);
  await rename(temporary, target);
}
