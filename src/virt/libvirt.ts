import { existsSync } from 'node:fs';
import { hostname } from 'node:os';
import type { Domain, Hypervisor } from '@unraid/libvirt';
import { execa } from 'execa';
import { diskSources, parseOwner } from './domain-xml.js';
import { VirtError, messageOf } from './errors.js';

export const DEFAULT_URI = 'qemu:///system';

/** Every domain qlayer starts is named with this prefix; cleanup touches nothing else. */
export const DOMAIN_PREFIX = 'qlayer-';

export type DomainRunState = 'running' | 'blocked' | 'paused' | 'shutdown' | 'shutoff' | 'crashed' | 'pmsuspended' | 'nostate' | 'absent';

// virDomainState, in order (libvirt's public enum).
const STATES: DomainRunState[] = ['nostate', 'running', 'blocked', 'paused', 'shutdown', 'shutoff', 'crashed', 'pmsuspended'];

export interface QlayerDomainInfo {
  name: string;
  state: DomainRunState;
  persistent: boolean;
  /** Who started it (from the domain's <metadata>), if recorded. */
  owner?: { pid: number; host: string; started: string };
}

type Binding = typeof import('@unraid/libvirt');
let bindingPromise: Promise<Binding> | undefined;

/** Load the optional N-API binding once, with a clear error when it is missing. */
async function loadBinding(): Promise<Binding> {
  bindingPromise ??= import('@unraid/libvirt').catch((error: unknown) => {
    bindingPromise = undefined;
    throw new VirtError(
      'virt.binding-missing',
      `the libvirt binding @unraid/libvirt does not load (${messageOf(error)}); install it with npm install (it needs libvirt-dev to build)`,
      { cause: error },
    );
  });
  return bindingPromise;
}

function isNotFound(error: unknown): boolean {
  return /Domain not found|no domain with matching/i.test(messageOf(error));
}

function isNotRunning(error: unknown): boolean {
  return /domain is not running|not running/i.test(messageOf(error));
}

async function withTimeout<T>(promise: Promise<T>, ms: number, onTimeout: () => Error): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(onTimeout()), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Is a process with this pid alive on this host? (EPERM means it exists but is not ours.) */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * One connection to libvirt through @unraid/libvirt. Methods take domain names (not handles), so
 * a domain that disappeared in between (a transient guest that powered off) reads as 'absent'
 * rather than as a stale handle.
 */
export class LibvirtConnection {
  private constructor(
    readonly uri: string,
    private readonly hypervisor: Hypervisor,
  ) {}

  /** Connect; fails fast with 'virt.libvirt-unreachable' naming the URI and the usual fix. */
  static async open(uri: string = DEFAULT_URI, timeoutMs = 15_000): Promise<LibvirtConnection> {
    const { Hypervisor } = await loadBinding();
    const hypervisor = new Hypervisor({ uri });
    const unreachable = (detail: string, cause?: unknown): VirtError =>
      new VirtError(
        'virt.libvirt-unreachable',
        `cannot connect to libvirt at ${uri}: ${detail}. Is libvirtd running? (scripts/setup-host.sh starts virtlogd and libvirtd)`,
        cause === undefined ? undefined : { cause },
      );
    try {
      await withTimeout(hypervisor.connectOpen(), timeoutMs, () => unreachable(`no answer in ${timeoutMs} ms`));
    } catch (error) {
      if (error instanceof VirtError) throw error;
      throw unreachable(messageOf(error), error);
    }
    return new LibvirtConnection(uri, hypervisor);
  }

  async close(): Promise<void> {
    try {
      await this.hypervisor.connectClose();
    } catch {
      // Closing a connection whose daemon went away is not worth an error.
    }
  }

  private async lookup(name: string): Promise<Domain | undefined> {
    try {
      return await this.hypervisor.domainLookupByName(name);
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw new VirtError('virt.libvirt-unreachable', `libvirt lookup of ${name} failed: ${messageOf(error)}`, { cause: error });
    }
  }

  async exists(name: string): Promise<boolean> {
    return (await this.lookup(name)) !== undefined;
  }

  async state(name: string): Promise<DomainRunState> {
    const domain = await this.lookup(name);
    if (domain === undefined) return 'absent';
    try {
      const info = await this.hypervisor.domainGetInfo(domain);
      return STATES[info.state] ?? 'nostate';
    } catch (error) {
      if (isNotFound(error)) return 'absent';
      throw new VirtError('virt.libvirt-unreachable', `libvirt state of ${name} failed: ${messageOf(error)}`, { cause: error });
    }
  }

  async xml(name: string): Promise<string | undefined> {
    const domain = await this.lookup(name);
    if (domain === undefined) return undefined;
    try {
      return await this.hypervisor.domainGetXMLDesc(domain);
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw error;
    }
  }

  /** Start a transient domain: it vanishes from libvirt when it stops. */
  async createTransient(xml: string, name: string): Promise<void> {
    try {
      await this.hypervisor.domainCreateXML(xml);
    } catch (error) {
      throw new VirtError('virt.start-failed', `libvirt could not start ${name}: ${messageOf(error)}`, { cause: error });
    }
  }

  /** Define a persistent domain and start it; a start failure undefines it again. */
  async defineAndStart(xml: string, name: string): Promise<void> {
    let domain: Domain;
    try {
      domain = await this.hypervisor.domainDefineXML(xml);
    } catch (error) {
      throw new VirtError('virt.start-failed', `libvirt could not define ${name}: ${messageOf(error)}`, { cause: error });
    }
    try {
      await this.hypervisor.domainCreate(domain);
    } catch (error) {
      await this.hypervisor.domainUndefine(domain).catch(() => undefined);
      throw new VirtError('virt.start-failed', `libvirt could not start ${name}: ${messageOf(error)}`, { cause: error });
    }
  }

  /**
   * The domain's persistent definition as `virsh dumpxml --inactive --security-info` gives it:
   * the document to edit and define again. Without SECURE, a VNC or SPICE password would be
   * dropped from the definition by the round trip.
   */
  async inactiveXml(name: string): Promise<string | undefined> {
    const { DomainGetXMLDescFlags } = await loadBinding();
    const domain = await this.lookup(name);
    if (domain === undefined) return undefined;
    try {
      return await this.hypervisor.domainGetXMLDesc(domain, DomainGetXMLDescFlags.INACTIVE | DomainGetXMLDescFlags.SECURE);
    } catch (error) {
      if (isNotFound(error)) return undefined;
      throw new VirtError('virt.libvirt-unreachable', `libvirt XML of ${name} failed: ${messageOf(error)}`, { cause: error });
    }
  }

  /** Is the domain persistent (defined), as opposed to transient or absent? */
  async isPersistent(name: string): Promise<boolean> {
    const domain = await this.lookup(name);
    if (domain === undefined) return false;
    const { ConnectListAllDomainsFlags } = await loadBinding();
    for (const persistent of await this.hypervisor.connectListAllDomains(ConnectListAllDomainsFlags.PERSISTENT)) {
      if ((await this.hypervisor.domainGetName(persistent)) === name) return true;
    }
    return false;
  }

  /**
   * Define (or redefine) a persistent domain. libvirt's own words go into the error: a template
   * or an edited definition it rejects says why in them.
   */
  async define(xml: string, name: string): Promise<void> {
    try {
      await this.hypervisor.domainDefineXML(xml);
    } catch (error) {
      throw new VirtError('virt.start-failed', `libvirt could not define ${name}: ${messageOf(error)}`, { cause: error });
    }
  }

  /** Start a defined domain (virsh start). */
  async startDefined(name: string): Promise<void> {
    const domain = await this.lookup(name);
    if (domain === undefined) throw new VirtError('virt.start-failed', `libvirt could not start ${name}: no such domain is defined`);
    try {
      await this.hypervisor.domainCreate(domain);
    } catch (error) {
      throw new VirtError('virt.start-failed', `libvirt could not start ${name}: ${messageOf(error)}`, { cause: error });
    }
  }

  /**
   * Undefine a shut-off persistent domain with its NVRAM file (virsh undefine --nvram; the
   * binding's undefine takes no flags, and a UEFI domain without the flag is refused).
   */
  async undefine(name: string): Promise<void> {
    if (!(await this.exists(name))) return;
    const result = await execa('virsh', ['-c', this.uri, 'undefine', '--nvram', name], { reject: false, stdin: 'ignore' });
    if (result.exitCode === 0) return;
    const words = `${result.stderr}`.replace(/^error:\s*/gm, '').trim();
    if (/Domain not found|failed to get domain/i.test(words)) return;
    if ((result as { code?: string }).code === 'ENOENT') throw new VirtError('virt.virsh-missing', 'virsh is not installed (Debian package libvirt-clients)');
    throw new VirtError('virt.libvirt-unreachable', `libvirt could not undefine ${name}: ${words}`);
  }

  /** Ask the guest to shut down; libvirt uses the guest agent when one is connected, else ACPI. */
  async requestShutdown(name: string): Promise<void> {
    const domain = await this.lookup(name);
    if (domain === undefined) return;
    try {
      await this.hypervisor.domainShutdown(domain);
    } catch (error) {
      if (isNotFound(error) || isNotRunning(error)) return;
      throw new VirtError('virt.libvirt-unreachable', `libvirt shutdown of ${name} failed: ${messageOf(error)}`, { cause: error });
    }
  }

  /** Power off at once (no-op when absent or already off). */
  async destroy(name: string): Promise<void> {
    const domain = await this.lookup(name);
    if (domain === undefined) return;
    try {
      await this.hypervisor.domainDestroy(domain);
    } catch (error) {
      if (isNotFound(error) || isNotRunning(error)) return;
      throw new VirtError('virt.libvirt-unreachable', `libvirt destroy of ${name} failed: ${messageOf(error)}`, { cause: error });
    }
  }

  /**
   * Destroy, then undefine if persistent: afterwards libvirt knows no domain of this name.
   * Through undefine() (virsh undefine --nvram): the binding's flagless undefine refuses a UEFI
   * domain, and a stale UEFI desktop must go like any other.
   */
  async remove(name: string): Promise<void> {
    await this.destroy(name);
    await this.undefine(name);
  }

  /** qlayer's domains (named qlayer-…), running or defined. */
  async listQlayerDomains(): Promise<QlayerDomainInfo[]> {
    const { ConnectListAllDomainsFlags } = await loadBinding();
    const persistent = new Set<string>();
    for (const domain of await this.hypervisor.connectListAllDomains(ConnectListAllDomainsFlags.PERSISTENT)) {
      persistent.add(await this.hypervisor.domainGetName(domain));
    }
    const result: QlayerDomainInfo[] = [];
    for (const domain of await this.hypervisor.connectListAllDomains()) {
      let name: string;
      try {
        name = await this.hypervisor.domainGetName(domain);
        if (!name.startsWith(DOMAIN_PREFIX)) continue;
        const info = await this.hypervisor.domainGetInfo(domain);
        const owner = parseOwner(await this.hypervisor.domainGetXMLDesc(domain));
        result.push({ name, state: STATES[info.state] ?? 'nostate', persistent: persistent.has(name), ...(owner ? { owner } : {}) });
      } catch (error) {
        if (!isNotFound(error)) throw error; // it went away while we listed: not ours to report
      }
    }
    return result.sort((a, b) => a.name.localeCompare(b.name));
  }

  /**
   * Whether a domain's first disk is a file that exists. A desktop's persistent domain is shut
   * off between uses and carries no owner: it is kept while its user.qcow2 exists, and counts as
   * a leftover once its store (say, a test's folder) is gone.
   */
  private async hasDiskFile(name: string): Promise<boolean> {
    const xml = await this.inactiveXml(name).catch(() => undefined);
    const disk = xml === undefined ? undefined : diskSources(xml)[0];
    return disk !== undefined && existsSync(disk);
  }

  /**
   * Remove qlayer domains left behind by processes that died (their owner pid on this host is
   * gone). With `all`, remove every qlayer- domain, including ones without an owner record.
   */
  async cleanupStale(options: { all?: boolean } = {}): Promise<string[]> {
    const removed: string[] = [];
    const host = hostname();
    for (const info of await this.listQlayerDomains()) {
      const stale =
        options.all === true ||
        (info.owner !== undefined && info.owner.host === host && !processAlive(info.owner.pid)) ||
        (info.owner === undefined && info.state === 'shutoff' && !(await this.hasDiskFile(info.name)));
      if (!stale) continue;
      await this.remove(info.name);
      removed.push(info.name);
    }
    return removed;
  }
}

/** Run `body` with a connection that is closed afterwards, whatever happens. */
export async function withConnection<T>(uri: string | undefined, body: (connection: LibvirtConnection) => Promise<T>): Promise<T> {
  const connection = await LibvirtConnection.open(uri ?? DEFAULT_URI);
  try {
    return await body(connection);
  } finally {
    await connection.close();
  }
}
