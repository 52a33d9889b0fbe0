/**
 * Start one harness domain on a disk chain and wait until its guest agent answers: the moment
 * a test can use the VM. Every harness VM needs the agent (exec, files, clean stop), so a guest
 * without one is an error that says so, with the console's last lines for the reason.
 */
import { bootGuest, type RunningGuest } from '../virt/boot.js';
import type { DiskLayer } from '../virt/domain-xml.js';
import { VirtError } from '../virt/errors.js';
import { tail } from '../virt/serial.js';
import { TestingError } from './errors.js';
import type { ResolvedOptions } from './options.js';

export interface StartSpec {
  name: string;
  /** Top first: the writable overlay, then every read-only layer below it. */
  chain: DiskLayer[];
  serialLog: string;
  options: ResolvedOptions;
}

export async function startGuest(spec: StartSpec): Promise<RunningGuest> {
  const { options } = spec;
  const [top, ...below] = spec.chain;
  if (top === undefined) throw new TestingError('testing.bad-option', 'no disk to boot');
  const started = Date.now();
  const guest = await bootGuest({
    name: spec.name,
    disk: { path: top.path, format: top.format, backingChain: below },
    ...(options.boot.kind === 'kernel'
      ? { kernel: options.boot.kernel, ...(options.boot.initrd ? { initrd: options.boot.initrd } : {}), ...(options.boot.cmdline ? { cmdline: options.boot.cmdline } : {}) }
      : { firmware: options.boot.firmware }),
    memoryMiB: options.memoryMiB,
    vcpus: options.vcpus,
    accel: options.accel,
    timeoutMs: options.timeoutMs,
    serialLog: spec.serialLog,
    ...(options.uri === undefined ? {} : { uri: options.uri }),
  });
  try {
    await waitForAgent(guest, Math.max(1000, options.timeoutMs - (Date.now() - started)), options.timeoutMs);
    return guest;
  } catch (error) {
    await guest.destroy().catch(() => undefined);
    throw error;
  }
}

/**
 * Ping the agent until it answers; stop early (with the console) if the guest stops. The message
 * names the caller's whole timeout (`totalMs`), which is what the user set, not what was left.
 */
async function waitForAgent(guest: RunningGuest, timeoutMs: number, totalMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const state = await guest.state();
    if (state === 'absent' || state === 'shutoff' || state === 'crashed') {
      throw new TestingError('testing.guest-stopped', `${guest.name} stopped (${state}) before its guest agent answered${consoleTail(guest.serial)}`);
    }
    try {
      await guest.agent.ping(Math.max(1, Math.min(3, Math.ceil((deadline - Date.now()) / 1000))));
      return;
    } catch (error) {
      if (!(error instanceof VirtError)) throw error;
    }
    if (Date.now() >= deadline) {
      throw new TestingError(
        'testing.no-agent',
        `${guest.name}: no guest agent answered within ${Math.round(totalMs / 1000)} s. The image must run qemu-guest-agent on the ` +
          `virtio channel org.qemu.guest_agent.0 (Debian: apt install qemu-guest-agent), or the guest did not finish booting ` +
          `(raise timeoutSec under TCG)${consoleTail(guest.serial)}`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 250));
  }
}

export function consoleTail(text: string, lines = 20): string {
  return text.trim() === '' ? '\n(the serial console printed nothing)' : `\nlast console lines:\n${tail(text, lines)}`;
}
