import { LayerError } from './errors.js';

/** What the layers need of a running guest: run a program and get its output (the guest agent). */
export interface GuestShell {
  exec(path: string, args: string[], options?: { input?: string | Buffer; timeoutMs?: number }): Promise<{ exitCode: number; stdout: string; stderr: string }>;
}

/** Quote for POSIX sh: single quotes, with embedded quotes closed and escaped. */
export function shellQuote(value: string): string {
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

/** Exit codes our guest scripts use to say why they refused. */
export const GUEST_EXIT = { exists: 3, stillPresent: 4 } as const;

/**
 * Run a POSIX sh script in the guest, fed on stdin so that no argument-length limit applies.
 * Works on busybox and on full desktops alike: only sh, head, mkdir, chmod, chown, rm, sync.
 */
export async function runGuestScript(guest: GuestShell, script: string, what: string, timeoutMs?: number): Promise<string> {
  const result = await guest.exec('/bin/sh', ['-s'], timeoutMs === undefined ? { input: script } : { input: script, timeoutMs });
  if (result.exitCode === 0) return result.stdout;
  const detail = (result.stderr || result.stdout).trim().split('\n').slice(-5).join('\n');
  if (result.exitCode === GUEST_EXIT.exists) {
    throw new LayerError('allocate.path-exists', `${what}: the guest already has ${detail}; refusing to overwrite it`);
  }
  if (result.exitCode === GUEST_EXIT.stillPresent) {
    throw new LayerError('unassign.still-present', `${what}: ${detail}`);
  }
  throw new LayerError('guest.script-failed', `${what} failed in the guest (exit ${result.exitCode}): ${detail}`);
}
