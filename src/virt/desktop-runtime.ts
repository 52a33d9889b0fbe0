import { join } from 'node:path';
import type { DesktopHandle, DesktopRuntime } from '../layers/runtime.js';
import type { GuestShell } from '../layers/guest-script.js';
import type { Accel } from './accel.js';
import { GuestAgent } from './agent.js';
import { bootGuest, stopDomain } from './boot.js';
import { loadFixture } from './fixture.js';
import { DEFAULT_URI, withConnection } from './libvirt.js';

export interface DesktopRuntimeOptions {
  uri?: string;
  accel: Accel;
  memoryMiB: number;
  vcpus: number;
  /** test-guest: the vm-fixtures kernel; kernel: `kernel`/`initrd`/`cmdline`; firmware: the disk's bootloader. */
  mode: 'test-guest' | 'kernel' | 'firmware';
  kernel: string | null;
  initrd: string | null;
  cmdline: string | null;
  firmware: 'bios' | 'uefi';
  /** Milliseconds. */
  bootTimeoutMs: number;
  agentTimeoutMs: number;
  shutdownTimeoutMs: number;
  /** Folder for serial logs (one per desktop). */
  logDir: string;
}

/** The libvirt domain of a desktop. */
export const desktopDomain = (desktop: Pick<DesktopHandle, 'name'>): string => `qlayer-desktop-${desktop.name}`;

/**
 * Desktops as libvirt domains: transient, named qlayer-desktop-NAME, disk = the desktop's chain
 * with every backing layer and format spelled out, the guest agent channel, a serial log in the
 * store. A started desktop outlives the qlayer process that started it.
 */
export class LibvirtDesktopRuntime implements DesktopRuntime {
  constructor(private readonly options: DesktopRuntimeOptions) {}

  private get uri(): string {
    return this.options.uri ?? DEFAULT_URI;
  }

  serialLogOf(desktop: DesktopHandle): string {
    return join(this.options.logDir, `${desktop.name}.serial.log`);
  }

  async isRunning(desktop: DesktopHandle): Promise<boolean> {
    const state = await withConnection(this.uri, (c) => c.state(desktopDomain(desktop)));
    return state !== 'absent' && state !== 'shutoff';
  }

  async start(desktop: DesktopHandle): Promise<void> {
    const { kernel, initrd, cmdline } = this.bootFiles();
    const [top, ...below] = desktop.chain;
    await bootGuest({
      name: desktopDomain(desktop),
      disk: { path: top!.path, format: top!.format, backingChain: below.map((l) => ({ path: l.path, format: l.format })) },
      ...(kernel ? { kernel } : { firmware: this.options.firmware === 'uefi' ? 'efi' : 'bios' }),
      ...(initrd ? { initrd } : {}),
      ...(cmdline ? { cmdline } : {}),
      memoryMiB: this.options.memoryMiB,
      vcpus: this.options.vcpus,
      accel: this.options.accel,
      timeoutMs: this.options.bootTimeoutMs,
      waitForAgent: true,
      serialLog: this.serialLogOf(desktop),
      uri: this.uri,
      detached: true,
    });
  }

  async stop(desktop: DesktopHandle): Promise<void> {
    // The virt layer's clean stop: agent shutdown, ACPI without an agent, fsfreeze + destroy last.
    await withConnection(this.uri, (connection) => stopDomain(connection, desktopDomain(desktop), this.options.shutdownTimeoutMs));
  }

  shell(desktop: DesktopHandle): GuestShell {
    const agent = new GuestAgent(desktopDomain(desktop), { uri: this.uri });
    const timeoutMs = this.options.agentTimeoutMs;
    return {
      exec: (path, args, options) => agent.exec(path, args, { timeoutMs, ...options }),
      writeFile: (path, data) => agent.writeFile(path, data),
    };
  }

  /** Kernel, initrd and command line for the configured boot mode (all null: firmware boot). */
  private bootFiles(): { kernel: string | null; initrd: string | null; cmdline: string | null } {
    switch (this.options.mode) {
      case 'kernel':
        return { kernel: this.options.kernel, initrd: this.options.initrd, cmdline: this.options.cmdline };
      case 'firmware':
        return { kernel: null, initrd: null, cmdline: null };
      case 'test-guest': {
        const fixture = loadFixture();
        return { kernel: fixture.kernel, initrd: fixture.initrd, cmdline: this.options.cmdline ?? fixture.images.base.cmdline };
      }
    }
  }
}

/**
 * A runtime for the vm-fixtures test guest under TCG, for tests and the benchmark: the config's
 * defaults for everything not given.
 */
export function testGuestRuntime(options: Partial<DesktopRuntimeOptions> & { logDir: string }): LibvirtDesktopRuntime {
  return new LibvirtDesktopRuntime({
    accel: 'tcg',
    memoryMiB: 256,
    vcpus: 1,
    mode: 'test-guest',
    kernel: null,
    initrd: null,
    cmdline: null,
    firmware: 'bios',
    bootTimeoutMs: 90_000,
    agentTimeoutMs: 120_000,
    shutdownTimeoutMs: 30_000,
    ...options,
  });
}
