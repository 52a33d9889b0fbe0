import { createHash } from 'node:crypto';
import { constants, existsSync, mkdirSync } from 'node:fs';
import { copyFile, rm, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { DesktopHandle, DesktopRuntime, DesktopTemplate, ForeignDomain } from '../layers/runtime.js';
import type { GuestShell } from '../layers/guest-script.js';
import { resolveAccel, type Accel } from './accel.js';
import { GuestAgent } from './agent.js';
import { stopDomain } from './boot.js';
import { loadFixture } from './fixture.js';
import { domainFromTemplate, firstDisk, replaceFirstDiskChain, setDesktopMetadata } from './domain-edit.js';
import { buildDomainXml, diskSources, nvramPath, withHomeDisk, withNvram, xmlEscape, type DesktopMetadata, type DomainSpec } from './domain-xml.js';
import { VirtError } from './errors.js';
import { fixtureKvmProbe } from './kvm-probe.js';
import { DEFAULT_URI, withConnection, type DomainRunState, type LibvirtConnection } from './libvirt.js';

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
  /** A libvirt network for one virtio NIC of each new desktop (config desktop.network); none when null or absent. */
  network?: string | null;
  /** The display of each new desktop (config desktop.graphics); none by default. */
  graphics?: 'spice' | 'vnc' | 'none';
}

/**
 * The live-only metadata element qlayer sets on a domain it started itself. libvirt drops live
 * metadata when the guest stops, so a domain started by `virsh start` or virt-manager lacks it:
 * that is how a plain assign knows the guest is someone's session that a shutdown would end.
 */
const RUN_NS = 'https://qlayer.invalid/xmlns/run/1';

/** The desktop's entry for the domain's <metadata> (absent for a handle without a store root). */
function desktopMetadata(desktop: DesktopHandle): DesktopMetadata | undefined {
  if (desktop.storeRoot === undefined) return undefined;
  return { store: desktop.storeRoot, name: desktop.name, ...(desktop.storeId === undefined ? {} : { storeId: desktop.storeId }) };
}

/**
 * A UEFI desktop's variable store (boot entries, firmware settings), in the desktop's own folder
 * beside user.qcow2: it is the desktop's state like its disk, so it moves, is backed up and is
 * deleted with the desktop and the store, and two stores never share one (libvirt's default,
 * /var/lib/libvirt/qemu/nvram/DOMAIN_VARS.fd, is keyed by domain name only).
 */
export const NVRAM_FILE = 'nvram.fd';

/** The NVRAM file of a desktop (whether or not it boots through UEFI). */
export function desktopNvramPath(desktop: Pick<DesktopHandle, 'userPath'>): string {
  return join(dirname(desktop.userPath), NVRAM_FILE);
}

/** Where a released desktop's NVRAM file goes: beside its image, e.g. alice.qcow2 -> alice.nvram.fd. */
export function releasedNvramPath(image: string): string {
  return `${image.replace(/\.(qcow2|raw|img)$/i, '')}.nvram.fd`;
}

/** libvirt's limit on our domain names (DOMAIN_NAME_PATTERN in domain-xml.ts). */
const MAX_DOMAIN_NAME = 63;

/**
 * The libvirt domain of a desktop: qlayer-STOREID-NAME. The store id comes first so it is never
 * cut: two stores may both have a desktop called demo, and one store's commands must never
 * reach the other's guest. A name too long for libvirt is cut and given a hash of the whole.
 * Without a store id (a handle made by hand): the name alone, as qlayer before store ids.
 */
export function desktopDomain(desktop: Pick<DesktopHandle, 'name' | 'storeId' | 'domain'>): string {
  if (desktop.domain !== undefined) return desktop.domain; // an adopted VM keeps its own name
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

/** A domain found under one of this desktop's names. */
interface FoundDomain {
  name: string;
  state: DomainRunState;
}

/**
 * Desktops as persistent libvirt domains, named qlayer-STOREID-NAME (an adopted VM keeps its
 * own name), so that `virsh list --all`, virt-manager and `virsh start` see them. The disk is
 * the desktop's chain with every backing layer and format spelled out; the rest of the
 * definition is the administrator's once it exists (memory, NICs, graphics, channels): qlayer
 * rewrites only the disk's image chain, at each start and after each recompose. A desktop of an
 * older store that has no definition gets one at its first start. A started desktop outlives
 * the qlayer process that started it.
 */
export class LibvirtDesktopRuntime implements DesktopRuntime {
  constructor(private readonly options: DesktopRuntimeOptions) {}

  private get uri(): string {
    return this.options.uri ?? DEFAULT_URI;
  }

  /** This runtime with other hardware defaults for new definitions (config desktop.network/graphics). */
  withHardware(hardware: Pick<DesktopRuntimeOptions, 'network' | 'graphics'>): LibvirtDesktopRuntime {
    return new LibvirtDesktopRuntime({ ...this.options, ...hardware });
  }

  serialLogOf(desktop: DesktopHandle): string {
    return join(this.options.logDir, `${desktop.name}.serial.log`);
  }

  /**
   * This desktop's domain, checked to be this desktop's by its disk: the domain's top image
   * must be the desktop's own user.qcow2. A domain under this desktop's name on another disk
   * belongs to another store (or a copy of this one): it is never touched, and every start,
   * stop or "is it running" fails with virt.domain-conflict. The exception is a shut-off
   * definition whose disk file no longer exists: the leftover of a deleted store, which a new
   * definition replaces. Shut-off domains count only with `includeShutOff` (a start, a
   * definition update); "is it running" looks at live ones alone. A guest started by a qlayer
   * from before store ids runs under the old name, and is this desktop's only if its disk says so.
   */
  private async ownDomain(connection: LibvirtConnection, desktop: DesktopHandle, includeShutOff = false): Promise<FoundDomain | null> {
    const primary = desktopDomain(desktop);
    const names = desktop.domain !== undefined ? [primary] : [primary, legacyDesktopDomain(desktop)].filter((name, i, all) => all.indexOf(name) === i);
    for (const name of names) {
      const state = await connection.state(name);
      if (state === 'absent' || (state === 'shutoff' && !includeShutOff)) continue;
      const xml = state === 'shutoff' ? await connection.inactiveXml(name) : await connection.xml(name);
      if (xml === undefined) continue; // gone meanwhile
      const disk = diskSources(xml)[0];
      if (disk !== undefined && (await sameFile(disk, desktop.userPath))) {
        this.domains.set(desktop.userPath, name);
        return { name, state };
      }
      if (name !== primary) continue; // an old-style name another store's desktop may hold
      if (state === 'shutoff' && (disk === undefined || !existsSync(disk))) {
        await connection.undefine(name); // a definition whose store is gone: nobody's
        continue;
      }
      throw new VirtError(
        'virt.domain-conflict',
        `domain ${name} ${state === 'shutoff' ? 'is defined on' : 'runs'} ${disk ?? 'no disk'}, not desktop ${desktop.name}'s ${desktop.userPath}: it belongs to another store ` +
          `(or a copy of this one, which shares its id: give the copy its own by deleting its store-id file). qlayer leaves that guest alone.`,
      );
    }
    this.domains.delete(desktop.userPath);
    return null;
  }

  /** Domain names found by ownDomain, by user.qcow2 path (an old-style name, or the new one). */
  private readonly domains = new Map<string, string>();

  private domainOf(desktop: DesktopHandle): string {
    return this.domains.get(desktop.userPath) ?? desktopDomain(desktop);
  }

  async isRunning(desktop: DesktopHandle): Promise<boolean> {
    return (await withConnection(this.uri, (c) => this.ownDomain(c, desktop))) !== null;
  }

  /**
   * virsh start semantics: the desktop's persistent domain is (re)pointed at the handle's chain
   * and started; a desktop without a definition (an older store) is defined first with the
   * runtime's defaults. Returns once the guest agent answers; a guest that does not get there
   * is destroyed (its definition stays).
   */
  async start(desktop: DesktopHandle): Promise<void> {
    await withConnection(this.uri, async (connection) => {
      const found = await this.ownDomain(connection, desktop, true);
      if (found !== null && found.state !== 'shutoff') {
        throw new VirtError('virt.domain-exists', `desktop ${desktop.name} is already running (domain ${found.name})`);
      }
      const name = found?.name ?? desktopDomain(desktop);
      if (found === null) await connection.define(await this.defaultXml(desktop), name);
      else await this.pointAtChain(connection, name, desktop);
      await connection.startDefined(name);
      try {
        await this.markStartedHere(name);
        await new GuestAgent(name, { uri: this.uri }).waitReady(this.options.bootTimeoutMs);
      } catch (error) {
        await connection.destroy(name).catch(() => undefined);
        throw error;
      }
    });
  }

  /** Record in the running domain's live metadata that qlayer started it (see RUN_NS). */
  private async markStartedHere(name: string): Promise<void> {
    const { execa } = await import('execa');
    const element = `<run by='qlayer' pid='${process.pid}' at='${xmlEscape(new Date().toISOString())}'/>`;
    await execa('virsh', ['-c', this.uri, 'metadata', name, '--live', '--uri', RUN_NS, '--key', 'qlayer-run', '--set', element], { timeout: 30_000 });
  }

  /**
   * The desktop runs, and not because qlayer started it (`virsh start`, virt-manager, a guest
   * reboot of a domain libvirt restarted): its live XML lacks qlayer's run mark.
   */
  async startedOutside(desktop: DesktopHandle): Promise<boolean> {
    return withConnection(this.uri, async (connection) => {
      const found = await this.ownDomain(connection, desktop);
      if (found === null) return false;
      const xml = await connection.xml(found.name);
      return xml !== undefined && !xml.includes(RUN_NS);
    });
  }

  async stop(desktop: DesktopHandle): Promise<void> {
    // The virt layer's clean stop: agent shutdown, ACPI without an agent, fsfreeze + destroy last.
    await withConnection(this.uri, async (connection) => {
      const found = await this.ownDomain(connection, desktop);
      if (found !== null) await stopDomain(connection, found.name, this.options.shutdownTimeoutMs);
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

  /** Define a new desktop's domain: the template's hardware with the desktop's disk, or the runtime's defaults. */
  async define(desktop: DesktopHandle, template?: DesktopTemplate): Promise<void> {
    await withConnection(this.uri, async (connection) => {
      const name = desktopDomain(desktop);
      if ((await this.ownDomain(connection, desktop, true)) !== null) throw new VirtError('virt.domain-exists', `desktop ${desktop.name} has a domain already (${name})`);
      if (await connection.exists(name)) throw new VirtError('virt.domain-exists', `a domain named ${name} exists already`);
      let xml: string;
      if (template === undefined) xml = await this.defaultXml(desktop);
      else {
        const source = template.kind === 'xml' ? template.xml : await connection.inactiveXml(template.name);
        if (source === undefined) throw new VirtError('virt.invalid-spec', `--like ${template.kind === 'domain' ? template.name : ''}: libvirt knows no such domain`);
        // A UEFI template's NVRAM file is the template's: the desktop gets its own, in its folder.
        xml = withNvram(domainFromTemplate(source, name, this.layers(desktop)), desktopNvramPath(desktop));
        const meta = desktopMetadata(desktop);
        if (meta !== undefined) xml = setDesktopMetadata(xml, meta);
        if (desktop.home !== undefined) xml = withHomeDisk(xml, desktop.home); // home disk (issue 13)
      }
      try {
        await connection.define(xml, name);
      } catch (error) {
        const from = template === undefined ? '' : template.kind === 'xml' ? ` from the template ${template.source}` : ` like domain ${template.name}`;
        throw new VirtError('virt.start-failed', `libvirt refused the definition of desktop ${desktop.name}${from}: ${(error as Error).message.replace(/^libvirt could not define [^:]+: /, '')}`, { cause: error });
      }
    });
  }

  /** After a recompose: the definition opens the new chain, so that a `virsh start` boots it. */
  async updateDefinition(desktop: DesktopHandle): Promise<void> {
    await withConnection(this.uri, async (connection) => {
      const found = await this.ownDomain(connection, desktop, true);
      if (found === null) await connection.define(await this.defaultXml(desktop), desktopDomain(desktop));
      // A running transient guest of an older qlayer has no definition to update: its next start defines one.
      else if (await connection.isPersistent(found.name)) await this.pointAtChain(connection, found.name, desktop);
    });
  }

  /**
   * The switch of a rebase (issue 13): the definition that opens the old chain (top
   * `fromUserPath`) is pointed at the handle's chain and home disk. It may open the new chain
   * already (a rerun); it must not open anything else (another store's domain is left alone).
   */
  async moveDefinition(desktop: DesktopHandle, fromUserPath: string): Promise<void> {
    await withConnection(this.uri, async (connection) => {
      const name = desktopDomain(desktop);
      const state = await connection.state(name);
      if (state === 'absent') {
        await connection.define(await this.defaultXml(desktop), name);
        return;
      }
      if (state !== 'shutoff') throw new VirtError('virt.domain-exists', `desktop ${desktop.name} is running (domain ${name}); stop it first`);
      const xml = await connection.inactiveXml(name);
      const disk = xml === undefined ? undefined : diskSources(xml)[0];
      if (disk === undefined || !((await sameFile(disk, desktop.userPath)) || (await sameFile(disk, fromUserPath)) || !existsSync(disk))) {
        throw new VirtError('virt.domain-conflict', `domain ${name} is defined on ${disk ?? 'no disk'}, neither desktop ${desktop.name}'s old chain ${fromUserPath} nor its new one: it belongs to another store; qlayer leaves it alone`);
      }
      // A UEFI desktop's NVRAM file sits beside its chain, and the old chain's folder is deleted
      // next: the file (its boot entries and settings) is copied into the new folder first.
      const nvram = xml === undefined ? undefined : nvramPath(xml);
      const oldNvram = join(dirname(fromUserPath), NVRAM_FILE);
      const newNvram = desktopNvramPath(desktop);
      if (nvram !== undefined && nvram === oldNvram) {
        if (existsSync(oldNvram) && !existsSync(newNvram)) await copyFile(oldNvram, newNvram, constants.COPYFILE_EXCL);
        const moved = withNvram(xml!, newNvram);
        if (moved !== xml) await connection.define(moved, name);
      }
      await this.pointAtChain(connection, name, desktop);
    });
  }

  /** Forget the desktop's domain (and its NVRAM file); refused while it runs. */
  async undefine(desktop: DesktopHandle): Promise<void> {
    await withConnection(this.uri, async (connection) => {
      const found = await this.ownDomain(connection, desktop, true);
      if (found === null) return;
      if (found.state !== 'shutoff') throw new VirtError('virt.domain-exists', `desktop ${desktop.name} is running (domain ${found.name}); stop it first`);
      await connection.undefine(found.name);
    });
  }

  async describeDomain(domain: string): Promise<ForeignDomain> {
    return withConnection(this.uri, async (connection) => {
      const state = await connection.state(domain);
      if (state === 'absent') return { name: domain, exists: false, running: false, disk: undefined };
      const xml = await connection.inactiveXml(domain);
      return { name: domain, exists: true, running: state !== 'shutoff', disk: xml === undefined ? undefined : firstDisk(xml) };
    });
  }

  /** An existing shut-off VM becomes the desktop's domain: its first disk opens the chain, the rest stays (adopt). */
  async adopt(desktop: DesktopHandle): Promise<void> {
    const name = desktop.domain;
    if (name === undefined) throw new VirtError('virt.invalid-spec', `adopt needs the domain's name in the desktop handle`);
    await withConnection(this.uri, async (connection) => {
      const state = await connection.state(name);
      if (state === 'absent') throw new VirtError('virt.invalid-spec', `libvirt knows no domain ${name}`);
      if (state !== 'shutoff') throw new VirtError('virt.domain-exists', `domain ${name} is ${state}; shut it down first`);
      if (!(await connection.isPersistent(name))) throw new VirtError('virt.invalid-spec', `domain ${name} is transient: there is no definition to adopt`);
      await this.pointAtChain(connection, name, desktop);
    });
  }

  /** The desktop's shut-off domain moved onto one image (release): only its first disk changes. */
  async redefineOn(desktop: DesktopHandle, image: { path: string; format: 'qcow2' | 'raw' }): Promise<string> {
    return withConnection(this.uri, async (connection) => {
      const found = await this.ownDomain(connection, desktop, true);
      if (found === null) throw new VirtError('virt.invalid-spec', `desktop ${desktop.name} has no domain to move onto ${image.path}`);
      if (found.state !== 'shutoff') throw new VirtError('virt.domain-exists', `desktop ${desktop.name} is running (domain ${found.name}); stop it first`);
      const xml = await connection.inactiveXml(found.name);
      if (xml === undefined) throw new VirtError('virt.invalid-spec', `domain ${found.name} went away`);
      let updated = replaceFirstDiskChain(xml, [image]);
      // A UEFI desktop's NVRAM file is in its folder, which the release deletes: a copy goes
      // beside the released image (kept boot entries and settings), and the domain names it.
      let copied: string | undefined;
      const nvram = nvramPath(xml);
      if (nvram !== undefined && (await sameFile(nvram, desktopNvramPath(desktop)))) {
        const moved = releasedNvramPath(image.path);
        if (existsSync(moved)) throw new VirtError('virt.invalid-spec', `${moved} exists already; the released domain's NVRAM file goes there`);
        if (existsSync(nvram)) {
          await copyFile(nvram, moved, constants.COPYFILE_EXCL);
          copied = moved;
        }
        updated = withNvram(updated, moved);
      }
      try {
        await connection.define(updated, found.name);
      } catch (error) {
        if (copied !== undefined) await rm(copied, { force: true });
        throw error;
      }
      return found.name;
    });
  }

  private layers(desktop: DesktopHandle): Array<{ path: string; format: 'qcow2' | 'raw' }> {
    return desktop.chain.map((l) => ({ path: l.path, format: l.format }));
  }

  /** Rewrite the definition's first disk onto the handle's chain; nothing else changes (no define when nothing would). */
  private async pointAtChain(connection: LibvirtConnection, name: string, desktop: DesktopHandle): Promise<void> {
    const xml = await connection.inactiveXml(name);
    if (xml === undefined) throw new VirtError('virt.start-failed', `domain ${name} went away`);
    let updated = replaceFirstDiskChain(xml, this.layers(desktop));
    // The hook finds the store and the desktop here; a definition from before it gets it now.
    const meta = desktopMetadata(desktop);
    if (meta !== undefined) updated = setDesktopMetadata(updated, meta);
    if (desktop.home !== undefined) updated = withHomeDisk(updated, desktop.home); // home disk (issue 13): kept as a second disk
    if (updated !== xml) await connection.define(updated, name);
  }

  /** The runtime's own hardware for a desktop: what qlayer's transient domains had, plus the config's network and display. */
  private async defaultXml(desktop: DesktopHandle): Promise<string> {
    const { kernel, initrd, cmdline } = this.bootFiles();
    const accel = await resolveAccel(this.options.accel, { probe: fixtureKvmProbe(this.uri), probeKey: this.uri });
    const [top, ...below] = this.layers(desktop);
    const serialLog = this.serialLogOf(desktop);
    mkdirSync(dirname(serialLog), { recursive: true });
    const spec: DomainSpec = {
      name: desktopDomain(desktop),
      type: accel.type,
      memoryMiB: this.options.memoryMiB,
      vcpus: this.options.vcpus,
      boot: kernel
        ? { kind: 'kernel', kernel, ...(initrd ? { initrd } : {}), ...(cmdline ? { cmdline } : {}) }
        : this.options.firmware === 'uefi'
          ? { kind: 'firmware', firmware: 'efi', nvram: desktopNvramPath(desktop) }
          : { kind: 'firmware', firmware: 'bios' },
      // Discards reach the user delta: a desktop's fstrim gives its freed space back to the host
      // (as virt-install does for qcow2 disks). App extents are never free while assigned.
      // home disk (issue 13): a second virtio disk, in no chain.
      disks: [{ ...top!, backingChain: below, discard: 'unmap' }, ...(desktop.home !== undefined ? [{ path: desktop.home, format: 'qcow2' as const, backingChain: [] }] : [])],
      serialLog,
      guestAgent: true,
      ...(desktopMetadata(desktop) ? { desktop: desktopMetadata(desktop)! } : {}),
      ...(this.options.network ? { network: this.options.network } : {}),
      ...(this.options.graphics && this.options.graphics !== 'none' ? { graphics: this.options.graphics } : {}),
    };
    return buildDomainXml(spec);
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
