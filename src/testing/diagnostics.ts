/**
 * What a failed test should show about its VMs: each one's serial console and its last agent
 * commands. VMs record into one registry on globalThis (not module state), so the vitest helper
 * sees the same VMs even when a test runner loads qlayer/testing and qlayer/testing/vitest as
 * separate module instances. A closed VM stays in the registry with its console text: with
 * `await using`, the VM is closed before the test's failure hooks run.
 */
import { tail } from '../virt/serial.js';

export interface CommandRecord {
  /** What was asked, e.g. `exec uname -r` or `writeFile /tmp/x (4 bytes)`. */
  command: string;
  at: string;
  ms: number;
  /** `exit 0`, `exit 1; stderr: ...`, or `error: ...`. */
  outcome: string;
}

export interface DiagnosticsSource {
  readonly name: string;
  serialLog(): string;
  history(): CommandRecord[];
  /** The registry's sequence number of this VM's last use (see touch()). */
  lastUsed: number;
}

interface Registry {
  seq: number;
  vms: DiagnosticsSource[];
}

const KEY = Symbol.for('qlayer.testing.diagnostics');
/** Enough for any one test; older, closed VMs are forgotten first. */
const MAX_VMS = 64;

function registry(): Registry {
  const store = globalThis as unknown as Record<symbol, Registry | undefined>;
  return (store[KEY] ??= { seq: 0, vms: [] });
}

export function register(vm: DiagnosticsSource): void {
  const r = registry();
  r.vms.push(vm);
  if (r.vms.length > MAX_VMS) r.vms.splice(0, r.vms.length - MAX_VMS);
  touch(vm);
}

/** Mark a VM as used now: a test that fails after this point reports it. */
export function touch(vm: DiagnosticsSource): void {
  vm.lastUsed = ++registry().seq;
}

/** The current sequence number: VMs used after it are the ones a test "has". */
export function mark(): number {
  return registry().seq;
}

export function usedSince(seq: number): DiagnosticsSource[] {
  return registry().vms.filter((vm) => vm.lastUsed > seq);
}

/** One VM's report: the last console lines and agent commands, as plain text. */
export function describeVm(vm: DiagnosticsSource, options: { serialLines?: number; commands?: number } = {}): string {
  const serial = vm.serialLog();
  const commands = vm.history().slice(-(options.commands ?? 10));
  const lines = [`=== qlayer VM ${vm.name} ===`, `--- serial console (last ${options.serialLines ?? 50} lines) ---`];
  lines.push(serial.trim() === '' ? '(the serial console printed nothing)' : tail(serial, options.serialLines ?? 50));
  lines.push(`--- last agent commands (${commands.length}) ---`);
  if (commands.length === 0) lines.push('(none)');
  for (const c of commands) lines.push(`${c.at} ${c.command} -> ${c.outcome} (${c.ms} ms)`);
  return lines.join('\n');
}
