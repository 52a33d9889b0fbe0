import type { GuestShell } from './guest-script.js';

/** What the layers need to know to run a desktop. */
export interface DesktopHandle {
  name: string;
  /** The store's id: two stores may both have a desktop NAME, and their domains must differ. */
  storeId?: string;
  /** The store's root folder (absolute): recorded in the domain's metadata for libvirt's QEMU hook. */
  storeRoot?: string;
  /** The top of the chain QEMU opens (absolute). */
  userPath: string;
  /** Every image of the chain, top first (absolute), for the domain's explicit backing chain. */
  chain: Array<{ path: string; format: 'qcow2' | 'raw' }>;
  /** The domain this desktop runs as when it is not the runtime's own name for it (an adopted VM keeps its name). */
  domain?: string;
  /** The desktop's home disk (absolute; qcow2, no backing file): a second disk beside the chain. */
  home?: string;
}

/** The hardware of a new desktop's domain: another domain's (`--like`), or a domain XML document (`--xml`). */
export type DesktopTemplate = { kind: 'domain'; name: string } | { kind: 'xml'; xml: string; source: string };

/** A domain that is not a desktop yet, as `desktop adopt` needs to judge it. */
export interface ForeignDomain {
  name: string;
  exists: boolean;
  running: boolean;
  /** The first disk (device=disk): libvirt's type (file, block, network, volume), and the image and format of a file disk. */
  disk: { type: string | undefined; file: string | undefined; format: string | undefined } | undefined;
}

/**
 * How desktops run. The layers never talk to libvirt themselves: the virtualisation layer above
 * them implements this (src/virt/desktop-runtime.ts), and tests or other hypervisors can too.
 */
export interface DesktopRuntime {
  isRunning(desktop: DesktopHandle): Promise<boolean>;
  /** Boot the desktop and return once its guest agent answers. */
  start(desktop: DesktopHandle): Promise<void>;
  /** Stop it cleanly: filesystems synced and clean (no journal to replay), then the domain gone. */
  stop(desktop: DesktopHandle): Promise<void>;
  /** A shell into the running guest (the guest agent). */
  shell(desktop: DesktopHandle): GuestShell;
  /**
   * The desktop runs and was not started by qlayer (virsh start, virt-manager): someone's
   * session, which a plain assign must not end by shutting the guest down. Optional: a runtime
   * without it counts every running desktop as qlayer's.
   */
  startedOutside?(desktop: DesktopHandle): Promise<boolean>;

  // Persistent definitions (optional: a runtime without them runs desktops as it likes).
  /** Define the new desktop's domain (hardware from `template`, or the runtime's defaults). */
  define?(desktop: DesktopHandle, template?: DesktopTemplate): Promise<void>;
  /**
   * Make the desktop's definition open the handle's chain (only the disk's image chain changes;
   * defined first if it has none). Called after each recompose, so that a start from outside
   * qlayer (virsh start, virt-manager) boots the new apps generation.
   */
  updateDefinition?(desktop: DesktopHandle): Promise<void>;
  /** Forget the desktop's domain (with its NVRAM); refused while it runs. */
  undefine?(desktop: DesktopHandle): Promise<void>;
  /**
   * Point the desktop's (shut-off) definition, which opens the chain whose top is `fromUserPath`,
   * at the handle's new chain and home disk, every other setting kept: the switch of a rebase.
   * Nothing to do when it opens the new chain already (a rerun after a crash).
   */
  moveDefinition?(desktop: DesktopHandle, fromUserPath: string): Promise<void>;
  /** What `desktop adopt` needs to know of a domain. */
  describeDomain?(domain: string): Promise<ForeignDomain>;
  /** Redefine the shut-off domain `desktop.domain` (not yet this desktop's) on the desktop's chain, keeping all its other settings: `desktop adopt`. */
  adopt?(desktop: DesktopHandle): Promise<void>;
  /** Redefine the desktop's (shut-off) domain on an image other than its chain: `desktop release`. Returns the domain's name. */
  redefineOn?(desktop: DesktopHandle, image: { path: string; format: 'qcow2' | 'raw' }): Promise<string>;
}

/** Passes every call to another runtime; extend it to observe or change one step (tests, bench). */
export class DelegatingRuntime implements DesktopRuntime {
  constructor(protected readonly inner: DesktopRuntime) {}
  isRunning(desktop: DesktopHandle): Promise<boolean> {
    return this.inner.isRunning(desktop);
  }
  start(desktop: DesktopHandle): Promise<void> {
    return this.inner.start(desktop);
  }
  stop(desktop: DesktopHandle): Promise<void> {
    return this.inner.stop(desktop);
  }
  shell(desktop: DesktopHandle): GuestShell {
    return this.inner.shell(desktop);
  }
  // The optional hooks pass through when the inner runtime has them, and do nothing when not.
  async startedOutside(desktop: DesktopHandle): Promise<boolean> {
    return (await this.inner.startedOutside?.(desktop)) ?? false;
  }
  async define(desktop: DesktopHandle, template?: DesktopTemplate): Promise<void> {
    await this.inner.define?.(desktop, template);
  }
  async updateDefinition(desktop: DesktopHandle): Promise<void> {
    await this.inner.updateDefinition?.(desktop);
  }
  async undefine(desktop: DesktopHandle): Promise<void> {
    await this.inner.undefine?.(desktop);
  }
  async moveDefinition(desktop: DesktopHandle, fromUserPath: string): Promise<void> {
    await this.inner.moveDefinition?.(desktop, fromUserPath);
  }
  async describeDomain(domain: string): Promise<ForeignDomain> {
    if (!this.inner.describeDomain) throw new Error('this runtime cannot look at other domains');
    return this.inner.describeDomain(domain);
  }
  async adopt(desktop: DesktopHandle): Promise<void> {
    if (!this.inner.adopt) throw new Error('this runtime keeps no domain definitions');
    await this.inner.adopt(desktop);
  }
  async redefineOn(desktop: DesktopHandle, image: { path: string; format: 'qcow2' | 'raw' }): Promise<string> {
    if (!this.inner.redefineOn) throw new Error('this runtime keeps no domain definitions');
    return this.inner.redefineOn(desktop, image);
  }
}
