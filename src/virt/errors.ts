import { QlayerError } from '../errors.js';

/**
 * Stable codes of the libvirt layer. Scripts match on them (`--json` prints `error.code`), so a
 * code never changes meaning; new situations get new codes.
 */
export type VirtErrorCode =
  | 'virt.binding-missing' // the optional @unraid/libvirt binding is not installed or does not load
  | 'virt.libvirt-unreachable' // cannot connect to the libvirt URI (libvirtd not running, bad socket)
  | 'virt.virsh-missing' // virsh (libvirt-clients) is not installed
  | 'virt.kernel-missing' // the kernel or initrd file for a direct kernel boot does not exist
  | 'virt.image-unreadable' // a disk image does not exist or cannot be opened with the needed access
  | 'virt.invalid-spec' // a domain spec field is out of range or malformed (names the field)
  | 'virt.domain-exists' // a domain with this name exists and is not a stale qlayer domain
  | 'virt.domain-conflict' // a desktop's domain name is taken by a domain that runs another disk (another store's)
  | 'virt.start-failed' // libvirt refused to define or start the domain
  | 'virt.boot-timeout' // the serial marker did not appear in time
  | 'virt.guest-stopped' // the guest powered off or crashed before the marker appeared
  | 'virt.guest-paused' // QEMU paused the guest (e.g. a KVM emulation failure)
  | 'virt.kvm-absent' // accel kvm asked for, but /dev/kvm is missing or not accessible
  | 'virt.kvm-not-working' // KVM is present, but a guest makes no progress under it
  | 'virt.shutdown-timeout' // the guest did not power off in time (it was then destroyed)
  | 'virt.agent-unavailable' // the guest agent did not answer (not started, not connected)
  | 'virt.agent-error' // the guest agent answered a command with an error
  | 'virt.agent-timeout' // a guest agent command or guest-exec did not finish in time
  | 'virt.fixture-missing' // the test guest was not built (vm-fixtures/build.sh)
  | 'virt.hook-foreign' // a libvirt hook file that is not qlayer's is where qlayer's would go
  | 'virt.hook-no-dir' // the libvirt hooks folder does not exist (libvirt not installed)
  | 'virt.bad-uri'; // libvirt.uri cannot work with this store (see src/virt/uri.ts)

/** Every error the libvirt layer raises on purpose. */
export class VirtError extends QlayerError {
  declare readonly code: VirtErrorCode;
  constructor(code: VirtErrorCode, message: string, options?: { cause?: unknown; exitCode?: number }) {
    super(code, message, options);
  }
}

/** The message of an unknown thrown value (libvirt errors are plain objects with `message`). */
export function messageOf(error: unknown): string {
  if (error instanceof Error) return error.message;
  if (typeof error === 'object' && error !== null && 'message' in error) return String((error as { message: unknown }).message);
  return String(error);
}
