/**
 * Files to remove if the process is interrupted (SIGINT, SIGTERM, SIGHUP) while it writes them:
 * a half-written convert output or base import is not an image, and a store lock left behind
 * would only be found stale by the next run. Node's default on these signals is to exit at once
 * without running `finally` blocks, so the removal must happen in a signal handler.
 *
 * The handlers exist only while something is registered. After removing the files the signal
 * is raised again with the default action, so the exit status still says "killed by SIGINT"
 * (130 in a shell), unless some other part of the process listens for it and decides itself.
 * SIGKILL cannot be caught: whoever writes such a file also sweeps leftovers on the next run.
 */
import { rmSync } from 'node:fs';

const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

/** Path -> how many registrations hold it (the same file may be registered by two layers). */
const registered = new Map<string, number>();
let installed = false;

function onSignal(signal: NodeJS.Signals): void {
  for (const path of registered.keys()) {
    try {
      rmSync(path, { force: true, recursive: true });
    } catch {
      // Best effort: the process is going away, and the next run sweeps what is left.
    }
  }
  registered.clear();
  uninstall();
  if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
}

function install(): void {
  if (installed) return;
  for (const signal of SIGNALS) process.on(signal, onSignal);
  installed = true;
}

function uninstall(): void {
  if (!installed) return;
  for (const signal of SIGNALS) process.off(signal, onSignal);
  installed = false;
}

/**
 * Remove `path` if the process is interrupted before the returned function is called. Call it
 * once the file is complete (or already removed); calling it twice is harmless.
 */
export function removeOnInterrupt(path: string): () => void {
  registered.set(path, (registered.get(path) ?? 0) + 1);
  install();
  let done = false;
  return () => {
    if (done) return;
    done = true;
    const count = (registered.get(path) ?? 1) - 1;
    if (count > 0) registered.set(path, count);
    else registered.delete(path);
    if (registered.size === 0) uninstall();
  };
}
