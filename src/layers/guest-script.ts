import { LayerError } from './errors.js';

/** What the layers need of a running guest: run a program and get its output, write a file (the guest agent). */
export interface GuestShell {
  exec(path: string, args: string[], options?: { input?: string | Buffer; timeoutMs?: number }): Promise<{ exitCode: number; stdout: string; stderr: string }>;
  /** Create or truncate `path` in the guest with these bytes (mode is the agent's; set it with exec). */
  writeFile(path: string, data: Buffer): Promise<void>;
}

/** Quote for POSIX sh: single quotes, with embedded quotes closed and escaped. */
export function shellQuote(value: string): string {
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

/**
 * Exit codes our guest scripts and native/guest-alloc.c use to say why they refused or failed.
 * badInput is the helper's own (a manifest it cannot parse: a host/helper version mismatch).
 */
export const GUEST_EXIT = { exists: 3, stillPresent: 4, noSpace: 5, badInput: 6 } as const;

/**
 * Run a POSIX sh script in the guest, fed on stdin so that no argument-length limit applies.
 * Works on busybox and on full desktops alike: only sh, head, mkdir, chmod, chown, rm, sync.
 */
export async function runGuestScript(guest: GuestShell, script: string, what: string, timeoutMs?: number): Promise<string> {
  const result = await guest.exec('/bin/sh', ['-s'], timeoutMs === undefined ? { input: script } : { input: script, timeoutMs });
  return checkGuestResult(result, what);
}

/** The stdout of a guest program that exited 0; otherwise the LayerError its exit code stands for. */
export function checkGuestResult(result: { exitCode: number; stdout: string; stderr: string }, what: string): string {
  if (result.exitCode === 0) return result.stdout;
  const detail = (result.stderr || result.stdout).trim().split('\n').slice(-5).join('\n');
  if (result.exitCode === GUEST_EXIT.exists) {
    throw new LayerError('allocate.path-exists', `${what}: the guest already has ${detail}; refusing to overwrite it`);
  }
  if (result.exitCode === GUEST_EXIT.noSpace) {
    throw new LayerError('allocate.no-space', `${what}: the guest filesystem is full: ${detail}`);
  }
  if (result.exitCode === GUEST_EXIT.stillPresent) {
    throw new LayerError('unassign.still-present', `${what}: ${detail}`);
  }
  throw new LayerError('guest.script-failed', `${what} failed in the guest (exit ${result.exitCode}): ${detail}`);
}
