/**
 * Who owns a harness VM, and where its files live. Every VM gets a folder under the workspace
 * root (its overlay, serial log, snapshots, private store) with an owner.json naming the test
 * process; the libvirt domain carries the same owner in its <metadata> (bootGuest writes it).
 * A later boot() or reap() removes what belongs to processes that no longer run: a test runner
 * killed with SIGKILL never runs its cleanup, and its domains would otherwise run forever.
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { processAlive, processStartTime, sameProcessAlive } from '../io/process.js';

/** Harness domains and folders are named qlayer-test-<12 hex>: unique across processes and files. */
export const TEST_DOMAIN_PREFIX = 'qlayer-test-';

export interface OwnerRecord {
  pid: number;
  host: string;
  /** Field 22 of /proc/PID/stat: with the pid, names one process (pids are reused). */
  processStart: string | null;
  /** When the VM was made (ISO time), for people reading the file. */
  created: string;
}

/** $QLAYER_TESTING_DIR, else <tmp>/qlayer-testing: shared by every test process on the host, so one reaps another's leftovers. */
export function workspaceRoot(): string {
  return process.env['QLAYER_TESTING_DIR'] ?? join(tmpdir(), 'qlayer-testing');
}

export function newVmName(): string {
  return `${TEST_DOMAIN_PREFIX}${randomBytes(6).toString('hex')}`;
}

/** Make the VM's folder and record its owner before anything else goes into it. */
export function makeVmDir(name: string): string {
  const dir = join(workspaceRoot(), name);
  mkdirSync(dir, { recursive: true, mode: 0o755 });
  const owner: OwnerRecord = { pid: process.pid, host: hostname(), processStart: processStartTime(process.pid), created: new Date().toISOString() };
  writeFileSync(join(dir, 'owner.json'), `${JSON.stringify(owner)}\n`);
  return dir;
}

export function readOwner(dir: string): OwnerRecord | null {
  try {
    const owner = JSON.parse(readFileSync(join(dir, 'owner.json'), 'utf8')) as OwnerRecord;
    return Number.isInteger(owner.pid) && typeof owner.host === 'string' ? owner : null;
  } catch {
    return null;
  }
}

/** Does the recorded owner still run? Records of another host are never judged (true). */
export function ownerAlive(owner: OwnerRecord): boolean {
  if (owner.host !== hostname()) return true;
  return sameProcessAlive(owner.pid, owner.processStart);
}

/** Clock ticks per second of /proc/PID/stat times (USER_HZ: 100 on every Linux ABI Node runs on). */
const USER_HZ = 100;

function bootTimeMs(): number | null {
  try {
    const btime = /^btime (\d+)$/m.exec(readFileSync('/proc/stat', 'latin1'))?.[1];
    return btime === undefined ? null : Number(btime) * 1000;
  } catch {
    return null;
  }
}

/**
 * The owner in a domain's <metadata> records a pid and the time the domain was made (ISO), not
 * the process's start ticks. A live pid whose process started after that time is another
 * process that reused the pid: the owner is gone. (2 s of slack for clock granularity.)
 */
export function domainOwnerAlive(owner: { pid: number; host: string; started: string }): boolean {
  if (owner.host !== hostname()) return true;
  if (!processAlive(owner.pid)) return false;
  const ticks = processStartTime(owner.pid);
  const boot = bootTimeMs();
  const started = Date.parse(owner.started);
  if (ticks === null || boot === null || Number.isNaN(started)) return true;
  return boot + (Number(ticks) * 1000) / USER_HZ <= started + 2000;
}
