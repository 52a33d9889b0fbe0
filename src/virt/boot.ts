import { randomBytes } from 'node:crypto';
import { accessSync, constants, mkdirSync, rmSync, statSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { kvmNoProgressMessage, kvmStatus, resolveAccel, type Accel, type KvmProbe } from './accel.js';
import { GuestAgent } from './agent.js';
import { fixtureKvmProbe } from './kvm-probe.js';
import { buildDomainXml, DOMAIN_NAME_PATTERN, hasAgentChannel, type DiskLayer, type DiskSpec, type DomainSpec, type DomainType } from './domain-xml.js';
import { VirtError, messageOf } from './errors.js';
import { DEFAULT_URI, DOMAIN_PREFIX, LibvirtConnection, processAlive, type DomainRunState } from './libvirt.js';
import { SerialLog, parseSerialEvents, tail, type SerialEvent } from './serial.js';

export interface BootOptions {
  /** Domain name, or a suffix for `qlayer-`; random when omitted. */
  name?: string;
  /** The disk: the top image of a qcow2 chain (path), or a full spec with an explicit backing chain. */
  disk: string | DiskSpec;
  /** More disks after the first (vdb, vdc, ...), e.g. a read-only disk holding files to copy in. */
  extraDisks?: DiskSpec[];
  /** Direct kernel boot when given; otherwise firmware boot from the disk. */
  kernel?: string;
  initrd?: string;
  cmdline?: string;
  /** Firmware for a boot without kernel: default 'bios'. */
  firmware?: 'bios' | 'efi';
  memoryMiB?: number;
  vcpus?: number;
  accel?: Accel;
  /** How long to wait for `until` (default 60 s). */
  timeoutMs?: number;
  /** Serial marker to wait for before bootGuest returns (substring or regex); none by default. */
  until?: string | RegExp;
  /** Also wait until the guest agent answers a ping (within timeoutMs). */
  waitForAgent?: boolean;
  /** Host file for the serial console; a file under the OS temp folder when omitted. */
  serialLog?: string;
  uri?: string;
  /** define + start instead of a transient domain (it is undefined again when stopped by us). */
  persistent?: boolean;
  /** Under KVM, how long a kernel boot may print nothing before it counts as not working (default 15 s). */
  kvmProgressMs?: number;
  /**
   * A long-lived guest (a desktop) that outlives this process: no owner pid is recorded, so
   * stale-domain cleanup never mistakes it for the leftover of a dead run, and the returned
   * guest is already detached (connection closed; find and stop it by name, see stopDomain).
   */
  detached?: boolean;
  /** The probe accel 'auto' runs once per process when KVM looks usable; default: a diskless boot of the test guest (see kvm-probe.ts). */
  kvmProbe?: KvmProbe;
  /** Extra XML-level options. */
  machine?: string;
  network?: string;
  vnc?: boolean;
}

export interface ShutdownResult {
  /** How the guest stopped: its own agent-driven power-off, ACPI, a destroy, or it was already off. */
  how: 'agent' | 'acpi' | 'destroyed' | 'already-off';
  ms: number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Guests this process started and has not stopped: destroyAllGuests() stops them on a signal. */
const live = new Set<RunningGuest>();

/** A running domain started by bootGuest. */
export class RunningGuest {
  readonly agent: GuestAgent;
  private readonly log: SerialLog;
  private closed = false;

  constructor(
    readonly name: string,
    readonly domainType: DomainType,
    readonly serialLog: string,
    readonly persistent: boolean,
    private readonly connection: LibvirtConnection,
    readonly startedAt: number,
  ) {
    this.agent = new GuestAgent(name, { uri: connection.uri });
    this.log = new SerialLog(serialLog);
    live.add(this);
  }

  get uri(): string {
    return this.connection.uri;
  }

  /** The serial output so far. */
  get serial(): string {
    return this.log.text();
  }

  /** The QLAYER lines so far. */
  events(): SerialEvent[] {
    return parseSerialEvents(this.serial);
  }

  async state(): Promise<DomainRunState> {
    if (this.closed) return 'absent';
    return this.connection.state(this.name);
  }

  /**
   * Wait for a serial marker. Fails early with 'virt.guest-stopped' when the guest powers off or
   * crashes first, 'virt.guest-paused' when QEMU pauses it, 'virt.boot-timeout' after timeoutMs;
   * each message ends with the last serial lines. The guest keeps running on failure: the caller
   * decides (bootGuest destroys it).
   */
  async waitFor(pattern: string | RegExp, timeoutMs: number): Promise<string> {
    const what = typeof pattern === 'string' ? JSON.stringify(pattern) : String(pattern);
    return this.log.waitFor(pattern, {
      timeoutMs,
      check: async () => {
        const state = await this.state();
        if (state === 'absent' || state === 'shutoff' || state === 'crashed') {
          throw new VirtError('virt.guest-stopped', `${this.name} stopped (${state}) before its serial showed ${what}${this.serialTail()}`);
        }
        if (state === 'paused') {
          throw new VirtError('virt.guest-paused', `${this.name} was paused by QEMU before its serial showed ${what} (under KVM this is an emulation failure: try accel: 'tcg')${this.serialTail()}`);
        }
      },
      onTimeout: () => new VirtError('virt.boot-timeout', `${this.name}: no ${what} on the serial console within ${timeoutMs} ms${this.serialTail()}`),
    });
  }

  /** Wait until the domain is off; true when it is, false on timeout. */
  async waitForShutoff(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const state = await this.state();
      if (state === 'absent' || state === 'shutoff') return true;
      if (Date.now() >= deadline) return false;
      await sleep(100);
    }
  }

  /**
   * Stop the guest cleanly if it can, for sure in any case (see stopDomain), then forget it
   * (undefined too when persistent).
   */
  async shutdown(options: { timeoutMs?: number } = {}): Promise<ShutdownResult> {
    if (this.closed) return { how: 'already-off', ms: 0 };
    try {
      const result = await stopDomain(this.connection, this.name, options.timeoutMs ?? 30_000);
      await this.finish();
      return result;
    } catch (error) {
      await this.destroy().catch(() => undefined);
      throw error;
    }
  }

  /**
   * Leave the guest running and let go of it: close the libvirt connection. For desktops that
   * outlive this process (they are found again by name).
   */
  async detach(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    live.delete(this);
    await this.connection.close();
  }

  /** Power off at once and forget the domain (undefined too when persistent). Idempotent. */
  async destroy(): Promise<void> {
    if (this.closed) return;
    try {
      await this.connection.remove(this.name);
    } finally {
      await this.finish();
    }
  }

  private async finish(): Promise<void> {
    if (this.closed) return;
    try {
      if (this.persistent) await this.connection.remove(this.name);
    } finally {
      this.closed = true;
      live.delete(this);
      await this.connection.close();
    }
  }

  serialTail(lines = 15): string {
    const text = this.serial;
    return text.trim() === '' ? '\n(the serial console printed nothing)' : `\nlast serial lines:\n${tail(text, lines)}`;
  }
}

/**
 * Stop a domain cleanly if it can, for sure in any case: guest-shutdown through the agent (the
 * test guest syncs, remounts / read-only and powers off; a desktop shuts down normally); without
 * an agent, an ACPI request (at most 10 s); if it is still running at the deadline, freeze the
 * filesystems through the agent (ext4 is then clean, nothing to replay) and destroy it.
 */
export async function stopDomain(connection: LibvirtConnection, name: string, timeoutMs = 30_000): Promise<ShutdownResult> {
  const started = Date.now();
  const result = (how: ShutdownResult['how']): ShutdownResult => ({ how, ms: Date.now() - started });
  const off = async (): Promise<boolean> => {
    const state = await connection.state(name);
    return state === 'absent' || state === 'shutoff';
  };
  const waitOff = async (ms: number): Promise<boolean> => {
    const deadline = Date.now() + ms;
    for (;;) {
      if (await off()) return true;
      if (Date.now() >= deadline) return false;
      await sleep(100);
    }
  };
  if (await off()) return result('already-off');
  const agent = new GuestAgent(name, { uri: connection.uri });
  const agentUp = await agentAnswers(connection, agent, name, timeoutMs);
  if (agentUp) {
    await agent.shutdown().catch(() => undefined);
    if (await waitOff(timeoutMs)) return result('agent');
  } else {
    await connection.requestShutdown(name).catch(() => undefined);
    if (await waitOff(Math.min(timeoutMs, 10_000))) return result('acpi');
  }
  // Last resort: make the filesystems consistent if the agent still answers, then pull the plug.
  await agent.fsfreeze().catch(() => undefined);
  await connection.destroy(name);
  return result('destroyed');
}

/**
 * Whether to stop through the agent: when the domain has an agent channel, give the agent time
 * to answer (a loaded TCG host can take seconds per virsh round trip, and one short ping made CI
 * fall back to ACPI); without a channel, go straight to ACPI.
 */
async function agentAnswers(connection: LibvirtConnection, agent: GuestAgent, name: string, timeoutMs: number): Promise<boolean> {
  const xml = await connection.xml(name).catch(() => undefined);
  if (xml !== undefined && !hasAgentChannel(xml)) return false;
  try {
    await agent.waitReady(Math.min(10_000, Math.max(3000, timeoutMs / 3)));
    return true;
  } catch {
    return false;
  }
}

/** Destroy every guest this process started and has not stopped (for signal handlers). */
export async function destroyAllGuests(): Promise<void> {
  await Promise.all([...live].map((guest) => guest.destroy().catch(() => undefined)));
}

export function domainName(name: string | undefined): string {
  const full = name === undefined ? `${DOMAIN_PREFIX}${randomBytes(4).toString('hex')}` : name.startsWith(DOMAIN_PREFIX) ? name : `${DOMAIN_PREFIX}${name}`;
  if (!DOMAIN_NAME_PATTERN.test(full)) throw new VirtError('virt.invalid-spec', `domain name ${JSON.stringify(full)} must match ${DOMAIN_NAME_PATTERN}`);
  return full;
}

function checkReadable(path: string, code: 'virt.kernel-missing' | 'virt.image-unreadable', what: string, writable = false): void {
  let isFile = false;
  try {
    isFile = statSync(path).isFile();
  } catch {
    throw new VirtError(code, `${what} ${path} does not exist`);
  }
  if (!isFile) throw new VirtError(code, `${what} ${path} is not a regular file`);
  try {
    accessSync(path, writable ? constants.R_OK | constants.W_OK : constants.R_OK);
  } catch {
    throw new VirtError(code, `${what} ${path} is not ${writable ? 'readable and writable' : 'readable'} by this user`);
  }
}

function normalizeDisk(disk: string | DiskSpec): DiskSpec {
  const spec: DiskSpec = typeof disk === 'string' ? { path: disk, format: 'qcow2' } : { ...disk };
  spec.path = resolve(spec.path);
  if (spec.backingChain !== undefined) spec.backingChain = spec.backingChain.map((layer: DiskLayer) => ({ ...layer, path: resolve(layer.path) }));
  return spec;
}

/** Does a libvirt start error point at a disk image rather than at the domain as a whole? */
function blamesImage(message: string, disk: DiskSpec): boolean {
  const paths = [disk.path, ...(disk.backingChain ?? []).map((l) => l.path)];
  return paths.some((p) => message.includes(p)) || /Cannot access storage file|Could not open|Image is not in|backing/i.test(message);
}

/**
 * Boot a guest through libvirt and return it running. Checks the kernel, initrd and images
 * before asking libvirt (clearer errors), removes a stale qlayer domain of the same name, starts
 * the domain (transient unless `persistent`), and when `until` is given waits for that serial
 * marker. On any failure the domain is destroyed before the error propagates: a failed boot
 * never leaves a domain behind.
 */
export async function bootGuest(options: BootOptions): Promise<RunningGuest> {
  const name = domainName(options.name);
  const disk = normalizeDisk(options.disk);
  const kernel = options.kernel === undefined ? undefined : resolve(options.kernel);
  const initrd = options.initrd === undefined ? undefined : resolve(options.initrd);
  if (kernel !== undefined) checkReadable(kernel, 'virt.kernel-missing', 'kernel');
  if (initrd !== undefined) checkReadable(initrd, 'virt.kernel-missing', 'initrd');
  if (kernel === undefined && initrd !== undefined) throw new VirtError('virt.invalid-spec', 'an initrd needs a kernel (direct kernel boot)');
  checkReadable(disk.path, 'virt.image-unreadable', 'disk image', !disk.readOnly);
  for (const layer of disk.backingChain ?? []) checkReadable(layer.path, 'virt.image-unreadable', 'backing image');

  const uri = options.uri ?? DEFAULT_URI;
  const accel = await resolveAccel(options.accel ?? 'auto', { probe: options.kvmProbe ?? fixtureKvmProbe(uri), probeKey: uri });
  const serialLog = resolve(options.serialLog ?? join(tmpdir(), 'qlayer-serial', `${name}.log`));
  mkdirSync(dirname(serialLog), { recursive: true });

  const spec: DomainSpec = {
    name,
    type: accel.type,
    memoryMiB: options.memoryMiB ?? 256,
    vcpus: options.vcpus ?? 1,
    boot:
      kernel === undefined
        ? { kind: 'firmware', firmware: options.firmware ?? 'bios' }
        : { kind: 'kernel', kernel, ...(initrd === undefined ? {} : { initrd }), ...(options.cmdline === undefined ? {} : { cmdline: options.cmdline }) },
    disks: [disk, ...(options.extraDisks ?? []).map(normalizeDisk)],
    serialLog,
    guestAgent: true,
    ...(options.detached ? {} : { owner: { pid: process.pid, host: hostname(), started: new Date().toISOString() } }),
    ...(options.machine === undefined ? {} : { machine: options.machine }),
    ...(options.network === undefined ? {} : { network: options.network }),
    ...(options.vnc === undefined ? {} : { vnc: options.vnc }),
  };
  const xml = buildDomainXml(spec);

  const connection = await LibvirtConnection.open(uri);
  let guest: RunningGuest | undefined;
  let attempted = false; // from here on, a domain of this name is ours to remove
  try {
    const existing = (await connection.listQlayerDomains()).find((d) => d.name === name);
    if (existing !== undefined || (await connection.exists(name))) {
      const stale = existing?.owner !== undefined && existing.owner.host === hostname() && !processAlive(existing.owner.pid);
      if (!stale) throw new VirtError('virt.domain-exists', `a domain named ${name} already exists${existing?.owner ? ` (started by pid ${existing.owner.pid})` : ''}; pick another name or remove it (qlayer vm cleanup)`);
      await connection.remove(name);
    }
    rmSync(serialLog, { force: true }); // never read a previous run's output
    const startedAt = Date.now();
    attempted = true;
    try {
      if (options.persistent) await connection.defineAndStart(xml, name);
      else await connection.createTransient(xml, name);
    } catch (error) {
      await connection.remove(name).catch(() => undefined);
      if (error instanceof VirtError && accel.type === 'kvm' && /\bkvm\b|MSR|emulation failure/i.test(error.message)) {
        // e.g. kvm_pvm here: "failed to set MSR 0x10a" and an assertion in QEMU's kvm.c.
        throw new VirtError('virt.kvm-not-working', `${name} could not start under KVM (${kvmStatus().detail}); use accel: 'tcg'. libvirt said: ${messageOf(error)}`, { cause: error });
      }
      if (error instanceof VirtError && blamesImage(error.message, disk)) {
        throw new VirtError('virt.image-unreadable', `libvirt could not open the disk of ${name} (${disk.path}): ${messageOf(error).replace(/^libvirt could not (start|define) [^:]+: /, '')}`, { cause: error });
      }
      throw error;
    }
    guest = new RunningGuest(name, accel.type, serialLog, options.persistent ?? false, connection, startedAt);
    const timeoutMs = options.timeoutMs ?? 60_000;
    if (options.until !== undefined) {
      if (accel.type === 'kvm' && kernel !== undefined) {
        // A KVM that cannot run guests (kvm_pvm, broken nesting) shows no output at all: say so early.
        const progressMs = Math.min(options.kvmProgressMs ?? 15_000, timeoutMs);
        const firstOutput = guest.waitFor(/\S/, progressMs).catch((error: unknown) => {
          if (error instanceof VirtError && error.code === 'virt.boot-timeout') throw new VirtError('virt.kvm-not-working', kvmNoProgressMessage(name, progressMs));
          throw error;
        });
        await firstOutput;
      }
      await guest.waitFor(options.until, Math.max(1, timeoutMs - (Date.now() - startedAt)));
    }
    if (options.waitForAgent) await guest.agent.waitReady(Math.max(1000, timeoutMs - (Date.now() - startedAt)));
    if (options.detached) await guest.detach();
    return guest;
  } catch (error) {
    if (guest !== undefined) await guest.destroy().catch(() => undefined);
    else {
      if (attempted) await connection.remove(name).catch(() => undefined);
      await connection.close();
    }
    throw error;
  }
}

/** Boot, run `body`, and always stop the guest (shutdown, destroy as last resort). */
export async function withGuest<T>(options: BootOptions, body: (guest: RunningGuest) => Promise<T>, shutdownTimeoutMs = 30_000): Promise<T> {
  const guest = await bootGuest(options);
  try {
    return await body(guest);
  } finally {
    await guest.shutdown({ timeoutMs: shutdownTimeoutMs }).catch(() => guest.destroy());
  }
}
