/**
 * The refusals a desktop operation makes before it changes anything: work left unfinished on
 * the desktop, its images open in another process, a guest someone else started.
 */
import { locksOn } from '../io/in-use.js';
import { desktopRecord } from './desktop-handle.js';
import { LayerError } from './errors.js';
import type { DesktopHandle, DesktopRuntime } from './runtime.js';
import type { DesktopRecord, StoreState } from './state.js';

/** The record of a desktop that may be started or changed: one with no recompose pending. */
export function idleDesktopRecord(state: StoreState, name: string): DesktopRecord {
  const record = desktopRecord(state, name);
  if (record.recompose) {
    throw new LayerError('desktop.recompose-pending', `desktop ${name} has an unfinished recompose; finish it first: qlayer desktop recompose ${name}`);
  }
  refusePendingBoot(name, record);
  return record;
}

/**
 * Refuse a user's change to an interrupted rebase's staging desktop: its apps are the rebase's
 * to set (the rebase itself assigns through assignLocked, which does not ask).
 */
export function refuseStaging(name: string, record: DesktopRecord): void {
  if (record.stagingFor === undefined) return;
  throw new LayerError(
    'rebase.staging',
    `${name} is the staging desktop of ${record.stagingFor}'s rebase: its apps come from that rebase; finish or undo it with qlayer desktop rebase --resume ${record.stagingFor}`,
  );
}

/** Refuse to start other work on a desktop whose change waits for its next start. */
export function refusePendingBoot(name: string, record: DesktopRecord): void {
  const pending = record.pendingBoot;
  if (!pending) return;
  throw new LayerError(
    'desktop.pending-at-next-boot',
    `desktop ${name} has a pending ${pending.kind} of ${pending.refs.join(', ')} for its next start: shut it down and start it (from inside the guest, virsh, or qlayer desktop stop/start ${name}) to apply it` +
      (pending.kind === 'assign' ? `, or drop it with qlayer desktop assign --abort ${name}` : ''),
  );
}

/** Refuse offline work on a desktop whose images a guest or any other process has open. */
export async function assertNotInUse(runtime: DesktopRuntime | null, handle: DesktopHandle, what: string): Promise<void> {
  if (runtime && (await runtime.isRunning(handle))) {
    throw new LayerError('desktop.running', `${what}: desktop ${handle.name} is running; stop it first (qlayer desktop stop ${handle.name})`);
  }
  for (const layer of handle.chain.slice(0, 2)) {
    const locks = await locksOn(layer.path).catch(() => []);
    if (locks.length) throw new LayerError('desktop.in-use', `${what}: ${layer.path} is open in another process (QEMU holds locks on it)`);
  }
}

/**
 * A plain assign, update or unassign shuts the guest down. On a desktop someone started outside
 * qlayer (virsh start, virt-manager) that ends their session: refused, naming the two ways on.
 */
export async function refuseStartedOutside(runtime: DesktopRuntime, handle: DesktopHandle, verb: string): Promise<void> {
  if (!runtime.startedOutside || !(await runtime.isRunning(handle))) return;
  if (!(await runtime.startedOutside(handle))) return;
  throw new LayerError(
    'desktop.started-outside',
    `desktop ${handle.name} was started outside qlayer (virsh start, virt-manager): a plain ${verb} shuts the guest down, which would end that session. ` +
      `Use qlayer desktop ${verb} ${handle.name} APP... --at-next-boot (the guest does its part now; the rest happens at its next start), or shut it down first (qlayer desktop stop ${handle.name}).`,
  );
}
