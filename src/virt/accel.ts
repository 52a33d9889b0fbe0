import { accessSync, constants, existsSync } from 'node:fs';
import type { DomainType } from './domain-xml.js';
import { VirtError } from './errors.js';

/** What the caller asks for: 'auto' uses KVM only when it actually runs guests. */
export type Accel = 'auto' | 'kvm' | 'tcg';

export interface KvmStatus {
  /** /dev/kvm exists. */
  present: boolean;
  /** This process can open it read-write (QEMU runs as qemu.conf's user, root on test hosts). */
  accessible: boolean;
  /**
   * The KVM module is kvm_pvm, a software nested hypervisor that cannot run ordinary guests
   * (QEMU crawls or stops with "emulation failure"): seen on this project's CI machines.
   */
  pvm: boolean;
  detail: string;
}

export function kvmStatus(): KvmStatus {
  const present = existsSync('/dev/kvm');
  let accessible = false;
  if (present) {
    try {
      accessSync('/dev/kvm', constants.R_OK | constants.W_OK);
      accessible = true;
    } catch {
      accessible = false;
    }
  }
  const pvm = existsSync('/sys/module/kvm_pvm');
  let detail: string;
  if (!present) detail = '/dev/kvm is missing (no KVM module loaded, or no hardware virtualization)';
  else if (!accessible) detail = '/dev/kvm exists but this user cannot open it read-write';
  else if (pvm) detail = '/dev/kvm is kvm_pvm, a nested software hypervisor that cannot boot ordinary guests';
  else detail = '/dev/kvm is present and accessible';
  return { present, accessible, pvm, detail };
}

export interface AccelChoice {
  type: DomainType;
  reason: string;
}

/** What a KVM probe found: did a guest make progress under KVM within the probe's time? */
export type KvmProbe = () => Promise<{ works: boolean; detail: string }>;

const probeResults = new Map<string, Promise<{ works: boolean; detail: string }>>();

/**
 * Map the requested acceleration to libvirt's domain type.
 * - 'tcg' -> 'qemu'.
 * - 'kvm' -> 'kvm'; 'virt.kvm-absent' when /dev/kvm is missing or not accessible. A KVM that is
 *   present but broken is caught by the boot itself (see bootGuest's progress timeout).
 * - 'auto' -> 'kvm' only when /dev/kvm is usable, is not kvm_pvm, and (when a probe is given) a
 *   short probe boot under KVM reached the initramfs; otherwise 'qemu'. The probe runs once per
 *   process and key.
 */
export async function resolveAccel(accel: Accel, options: { probe?: KvmProbe; probeKey?: string } = {}): Promise<AccelChoice> {
  if (accel === 'tcg') return { type: 'qemu', reason: 'accel tcg requested' };
  const status = kvmStatus();
  if (accel === 'kvm') {
    if (!status.present || !status.accessible) {
      throw new VirtError('virt.kvm-absent', `accel kvm requested, but ${status.detail}; use accel: 'tcg'`);
    }
    return { type: 'kvm', reason: `accel kvm requested (${status.detail})` };
  }
  if (accel !== 'auto') throw new VirtError('virt.invalid-spec', `accel ${String(accel)} is not one of auto, kvm, tcg`);
  if (!status.present || !status.accessible || status.pvm) return { type: 'qemu', reason: `TCG: ${status.detail}` };
  if (options.probe === undefined) return { type: 'kvm', reason: status.detail };
  const key = options.probeKey ?? 'default';
  let result = probeResults.get(key);
  if (result === undefined) {
    result = options.probe();
    probeResults.set(key, result);
    // A probe that could not run (libvirt unreachable) is not an answer: let the next call retry.
    result.catch(() => probeResults.delete(key));
  }
  const probed = await result;
  return probed.works ? { type: 'kvm', reason: `KVM probe: ${probed.detail}` } : { type: 'qemu', reason: `TCG: KVM probe failed (${probed.detail})` };
}

/** The message for a KVM guest that shows no progress: say what to do about it. */
export function kvmNoProgressMessage(name: string, ms: number): string {
  const status = kvmStatus();
  return (
    `${name} printed nothing on its serial console in ${ms} ms under KVM: this host's KVM does not run guests ` +
    `(${status.detail}). Use accel: 'tcg' (qlayer vm boot --accel tcg).`
  );
}
