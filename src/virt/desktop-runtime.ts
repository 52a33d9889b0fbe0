import { createHash } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { DesktopHandle, DesktopRuntime } from '../layers/runtime.js';
import type { GuestShell } from '../layers/guest-script.js';
import type { Accel } from './accel.js';
import { GuestAgent } from './agent.js';
import { bootGuest, stopDomain } from './boot.js';
import { loadFixture } from './fixture.js';
import { diskSources } from './domain-xml.js';
import { VirtError } from './errors.js';
import { DEFAULT_URI, withConnection, type LibvirtConnection } from './libvirt.js';

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

/** libvirt's limit on our domain names (DOMAIN_NAME_PATTERN in domain-xml.ts). */
const MAX_DOMAIN_NAME = 63;

/**
 * The libvirt domain of a desktop: qlayer-STOREID-NAME. The store id comes first so it is never
 * cut: two stores may both have a desktop called demo, and one store's commands must never
 * reach the other's guest. A name too long for libvirt is cut and given a hash of the whole.
 * Without a store id (a handle made by hand): the name alone, as qlayer before store ids.
 */
export function desktopDomain(desktop: Pick<DesktopHandle, 'name' | 'storeId'>): string {
  if (desktop.storeId === undefined) return legacyDesktopDomain(desktop);
  const full = `qlayer-${desktop.storeId}-${desktop.name}`;
  if (full.length <= MAX_DOMAIN_NAME) return full;
  const hash = createHash('sha256').update(desktop.name).digest('hex').slice(0, 8);
  return `${full.slice(0, MAX_DOMAIN_NAME - hash.length - 1)}-${hash}`;
}

/** The name qlayer gave desktop domains before stores had ids; such a guest may still run. */
export const legacyDesktopDomain = (desktop: Pick<DesktopHandle, 'name'>): string => `qlayer-desktop-${desktop.name}`;

/** Same file: same path, or the same inode under another name (a symlinked store folder). */
async function sameFile(a: string, b: string): Promise<boolean> {
  if (a === b) return true;
  const [x, y] = await Promise.all([stat(a).catch(() => null), stat(b).catch(() => null)]);
  return x !== null && y !== null && x.dev === y.dev && x.ino === y.ino;
}

/**
 * Desktops as libvirt domains: transient, named qlayer-STOREID-NAME, disk = the desktop's chain
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

  /**
   * The running domain of this desktop, checked to be this desktop's by its disk: the domain's
   * top image must be the desktop's own user.qcow2. A domain under this desktop's name that runs
   * another disk belongs to another store (or a copy of this one): it is never touched, and
   * every start, stop or "is it running" fails with virt.domain-conflict. A guest started by a
   * qlayer from before store ids runs under the old name, and is this desktop's only if its
   * disk says so.
   */
  private async ownDomain(connection: LibvirtConnection, desktop: DesktopHandle): Promise<string | null> {
    const primary = desktopDomain(desktop);
    const names = [primary, legacyDesktopDomain(desktop)].filter((name, i, all) => all.indexOf(name) === i);
    for (const name of names) {
      const state = await connection.state(name);
      if (state === 'absent' || state === 'shutoff') continue;
      const xml = await connection.xml(name);
      if (xml === undefined) continue; // gone meanwhile
      const disk = diskSources(xml)[0];
      if (disk !== undefined && (await sameFile(disk, desktop.userPath))) {
        this.domains.set(desktop.userPath, name);
        return name;
      }
      if (name !== primary) continue; // an old-style name another store's desktop may hold
      throw new VirtError(
        'virt.domain-conflict',
        `domain ${name} runs ${disk ?? 'no disk'}, not desktop ${desktop.name}'s ${desktop.userPath}: it belongs to another store ` +
          `(or a copy of this one, which shares its id: give the copy its own by deleting its store-id file). qlayer leaves that guest alone.`,
      );
    }
    this.domains.delete(desktop.userPath);
    return null;
  }

  /** Domain names found running by ownDomain, by user.qcow2 path (an old-style name, or the new one). */
  private readonly domains = new Map<string, string>();

  private domainOf(desktop: DesktopHandle): string {
    return this.domains.get(desktop.userPath) ?? desktopDomain(desktop);
  }

  async isRunning(desktop: DesktopHandle): Promise<boolean> {
    return (await withConnection(this.uri, (c) => this.ownDomain(c, desktop))) !== null;
  }

  async start(desktop: DesktopHandle): Promise<void> {
    // A conflict is refused here, before bootGuest would find the name taken and say less.
    if (await withConnection(this.uri, (c) => this.ownDomain(c, desktop))) {
      throw new VirtError('virt.domain-exists', `desktop ${desktop.name} is already running (domain ${this.domainOf(desktop)})`);
    }
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
    await withConnection(this.uri, async (connection) => {
      const name = await this.ownDomain(connection, desktop);
      if (name !== null) await stopDomain(connection, name, this.options.shutdownTimeoutMs);
    });
  }

  shell(desktop: DesktopHandle): GuestShell {
    const agent = new GuestAgent(this.domainOf(desktop), { uri: this.uri });
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
