/**
 * Verifying a desktop in its booted guest: every assigned app file hashed and compared with its
 * manifest, a difference told apart as the user's edit, a deletion or damage.
 */
import { appKey, resolveApp, type AppManifest } from './app.js';
import { idleDesktopRecord } from './desktop-guards.js';
import { desktopHandle } from './desktop-handle.js';
import { LayerError } from './errors.js';
import { operationView } from './guest-operation.js';
import { runGuestScript, shellQuote, type GuestShell } from './guest-script.js';
import { guestHomeMount, type HomeMount } from './home-disk.js'; // home disk (issue 13)
import { quiet, type Log } from './log.js';
import type { DesktopRuntime } from './runtime.js';
import type { LocatedFile } from './state.js';
import type { Store } from './store.js';

/**
 * What verify found for one app file:
 * - ok: its bytes hash to the manifest;
 * - user-changed: different, and the guest's filesystem says it was written or replaced after the
 *   assign (its mtime or inode moved): the user's own edit, kept in the user delta;
 * - user-deleted: the guest has no such file any more;
 * - damaged: different, though neither its inode nor its mtime moved: no write through the
 *   guest's filesystem explains it, so a layer is wrong (or, for apps assigned before qlayer
 *   recorded inode times, it cannot tell).
 */
export type VerifiedStatus = 'ok' | 'user-changed' | 'user-deleted' | 'damaged';

export interface VerifiedFile {
  app: string;
  path: string;
  expected: string;
  actual: string | null;
  ok: boolean;
  status: VerifiedStatus;
  /** Why a file that is not ok got its status, in the guest's terms. */
  why?: string;
}

/** The guest's inode number and mtime of each path that exists (one stat per file, missing ones skipped). */
async function guestIdentities(shell: GuestShell, paths: string[]): Promise<Map<string, { inode: number; mtime: number }>> {
  const found = new Map<string, { inode: number; mtime: number }>();
  if (!paths.length) return found;
  const script = paths.map((p) => `stat -c '%i %Y %n' ${shellQuote(p)} 2>/dev/null || true`).join('\n');
  const output = await runGuestScript(shell, `${script}\n`, 'reading the changed files\' inodes');
  for (const line of output.split('\n')) {
    const match = /^(\d+) (-?\d+) (.*)$/.exec(line.trim());
    if (match) found.set(match[3]!, { inode: Number(match[1]), mtime: Number(match[2]) });
  }
  return found;
}

/** Tell a user's edit from damage for a file whose hash differs (see VerifiedStatus). */
function classifyChanged(located: LocatedFile | undefined, now: { inode: number; mtime: number } | undefined): { status: VerifiedStatus; why: string } {
  if (now === undefined) return { status: 'user-deleted', why: 'the guest has no such file: deleted in the guest' };
  if (located?.inode === undefined || located.mtime === undefined) {
    return { status: 'damaged', why: 'its bytes differ, and this assign predates recorded inode times: qlayer cannot tell a user\'s edit from damage' };
  }
  if (now.inode !== located.inode) return { status: 'user-changed', why: `replaced in the guest (inode ${now.inode}, was ${located.inode}); the new file lives in the user delta` };
  if (now.mtime !== located.mtime) {
    return { status: 'user-changed', why: `written in the guest at ${new Date(now.mtime * 1000).toISOString()} (assigned with mtime ${new Date(located.mtime * 1000).toISOString()}); the changed blocks live in the user delta` };
  }
  return { status: 'damaged', why: 'its bytes differ, but neither its inode nor its mtime changed since the assign: no write through the guest explains it (check the layers: qlayer image check, e2fsck)' };
}

/**
 * Files under the assigned apps' folders that no assigned app has: leftovers of an app (an
 * undo that had to leave a file the user wrote into), or files the user made there. Reported,
 * never a failure.
 */
async function unknownFilesUnder(shell: GuestShell, manifests: AppManifest[]): Promise<string[]> {
  const prefixes = [...new Set(manifests.map((m) => m.prefix))];
  if (!prefixes.length) return [];
  const known = new Set(manifests.flatMap((m) => m.files.map((f) => f.path)));
  const output = await runGuestScript(shell, `find ${prefixes.map(shellQuote).join(' ')} -type f 2>/dev/null || true\n`, 'listing the app folders');
  return output.split('\n').filter((path) => path && !known.has(path)).sort();
}

export interface VerifyResult {
  files: VerifiedFile[];
  /** Files under the apps' folders that belong to no assigned app (reported, not a failure). */
  unknownFiles: string[];
  /** sha256 of each extra path asked for (null when missing): e.g. a user file to prove intact. */
  extra: Record<string, string | null>;
  /** home disk (issue 13): whether the guest mounted something at /home (absent: no home disk). */
  home?: HomeMount & { disk: string };
}

/**
 * Boot the desktop (if needed), hash every assigned app file in the guest, compare with the
 * manifests, and stop it again if it was not running before.
 */
export async function verifyDesktop(store: Store, runtime: DesktopRuntime, name: string, extraPaths: string[] = [], log: Log = quiet): Promise<VerifyResult> {
  // Under the lock from boot to stop: an assign or recompose must not change the chain under
  // the running guest, and a pending recompose must be finished before the guest may boot.
  return store.withLock(() => verifyLocked(store, runtime, name, extraPaths, log));
}

/** verifyDesktop for a caller that holds the store lock (exported for rebase.ts, issue 13). */
export async function verifyLocked(store: Store, runtime: DesktopRuntime, name: string, extraPaths: string[], log: Log): Promise<VerifyResult> {
  const state = await store.readState();
  const record = idleDesktopRecord(state, name);
  if (record.operation) {
    const view = operationView(name, record.operation);
    throw new LayerError(
      'desktop.operation-pending',
      `desktop ${name} has an unfinished ${view.kind} of ${view.apps.join(', ')}: its guest may hold placeholders that are no app yet; undo it with ${view.undo}, or do it again: ${view.finish}`,
    );
  }
  const handle = desktopHandle(store, state, name);
  const manifests = await Promise.all(record.apps.map((ref) => resolveApp(store, ref)));
  const wasRunning = await runtime.isRunning(handle);
  if (!wasRunning) {
    log(`booting ${name}`);
    await runtime.start(handle);
  }
  try {
    // home disk (issue 13): first, since a guest can answer before /home is mounted (systemd, nofail) and files under it must be read from it.
    const home = handle.home ? { disk: handle.home, ...(await guestHomeMount(runtime.shell(handle))) } : undefined;
    const files = manifests.flatMap((m) => m.files.map((f) => ({ app: appKey(m), path: f.path, expected: f.sha256 })));
    const paths = [...files.map((f) => f.path), ...extraPaths];
    const hashes = new Map<string, string>();
    if (paths.length) {
      // One sha256sum per file so that a missing file shows as missing, not as a failed batch.
      const script = paths.map((p) => `sha256sum ${shellQuote(p)} 2>/dev/null || echo "missing  ${p.replace(/["$`\\]/g, '')}"`).join('\n');
      const output = await runGuestScript(runtime.shell(handle), `${script}\n`, 'hashing app files');
      for (const line of output.split('\n')) {
        const match = /^([0-9a-f]{64}|missing)\s+(.*)$/.exec(line.trim());
        if (match) hashes.set(match[2]!, match[1]!);
      }
    }
    const hashOf = (path: string): string | null => {
      const actual = hashes.get(path);
      return actual && actual !== 'missing' ? actual : null;
    };
    const changed = files.filter((f) => hashOf(f.path) !== f.expected).map((f) => f.path);
    const identities = await guestIdentities(runtime.shell(handle), changed);
    const locatedByPath = new Map(record.files.map((f) => [f.path, f]));
    return {
      files: files.map((f): VerifiedFile => {
        const actual = hashOf(f.path);
        if (actual === f.expected) return { ...f, actual, ok: true, status: 'ok' };
        return { ...f, actual, ok: false, ...classifyChanged(locatedByPath.get(f.path), identities.get(f.path)) };
      }),
      extra: Object.fromEntries(extraPaths.map((p) => [p, hashOf(p)])),
      unknownFiles: await unknownFilesUnder(runtime.shell(handle), manifests),
      ...(home ? { home } : {}), // home disk (issue 13)
    };
  } finally {
    if (!wasRunning) {
      log(`stopping ${name}`);
      await runtime.stop(handle);
    }
  }
}
