import type { GuestShell } from './guest-script.js';

/** What the layers need to know to run a desktop. */
export interface DesktopHandle {
  name: string;
  /** The store's id: two stores may both have a desktop NAME, and their domains must differ. */
  storeId?: string;
  /** The top of the chain QEMU opens (absolute). */
  userPath: string;
  /** Every image of the chain, top first (absolute), for the domain's explicit backing chain. */
  chain: Array<{ path: string; format: 'qcow2' | 'raw' }>;
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
}
