import { randomBytes } from 'node:crypto';
import { accessSync, constants, mkdirSync, rmSync, statSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { kvmNoProgressMessage, kvmStatus, resolveAccel, type Accel, type KvmProbe } from './accel.js';
import { GuestAgent, agentErrorWords, type ExecResult } from './agent.js';
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
  /**
   * UEFI only: the guest's NVRAM file (made from OVMF's template when missing). Default: beside
   * the serial log (NAME.nvram.fd), because libvirt leaves a transient domain's
   * /var/lib/libvirt/qemu/nvram/NAME_VARS.fd behind when the domain goes.
   */
  nvram?: string;
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

/** One way of stopping the guest that stopDomain tried, in order. */
export interface ShutdownStep {
  /**
   * agent: qemu-ga's guest-shutdown; systemctl: `systemctl poweroff` through guest-exec (needs
   * no logind/dbus); guest-poweroff: a guest without systemd syncs, remounts / read-only and
   * powers off through guest-exec; acpi: the ACPI power button; fsfreeze + destroy: the last resort.
   */
  how: 'agent' | 'systemctl' | 'guest-poweroff' | 'acpi' | 'fsfreeze' | 'destroy';
  ok: boolean;
  /** What happened, in the guest's (or libvirt's) own words when a step failed. */
  detail: string;
  ms: number;
}

export interface ShutdownResult {
  /**
   * How the guest stopped: agent (guest-shutdown), systemctl or guest-poweroff (through
   * guest-exec after guest-shutdown failed), acpi, destroyed (forced off at the deadline), or
   * it was already off.
   */
  how: 'agent' | 'systemctl' | 'guest-poweroff' | 'acpi' | 'destroyed' | 'already-off';
  ms: number;
  /** Every way tried, in order, with why each one that failed did. */
  steps: ShutdownStep[];
  /** Set when the guest was destroyed: what that means for its disk. */
  warning?: string;
}

/** Receives every stopDomain result in this process (the CLI prints them; tests record them). */
export type ShutdownListener = (domain: string, result: ShutdownResult) => void;
const shutdownListeners = new Set<ShutdownListener>();

/** Observe every stop made by stopDomain in this process; returns the function that stops observing. */
export function observeShutdowns(listener: ShutdownListener): () => void {
  shutdownListeners.add(listener);
  return () => shutdownListeners.delete(listener);
}

/** One line for people: how the guest stopped and, when a step failed, why. */
export function describeShutdown(result: ShutdownResult): string {
  const failed = result.steps.filter((s) => !s.ok && s.how !== 'fsfreeze' && s.how !== 'destroy');
  const why = failed.map((s) => `${s.how} failed: ${s.detail}`).join('; ');
  return `${result.how} in ${(result.ms / 1000).toFixed(1)} s${why ? ` (${why})` : ''}${result.warning ? `; ${result.warning}` : ''}`;
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
    if (this.closed) return { how: 'already-off', ms: 0, steps: [] };
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
 * Stop a domain cleanly if it can, for sure in any case, and say how. In order:
 * 1. the agent's guest-shutdown (the test guest syncs, remounts / read-only and powers off; a
 *    distribution runs its shutdown);
 * 2. if the agent reports a failure (a systemd guest without dbus or logind: "Failed to connect
 *    to bus"), `systemctl poweroff` through guest-exec, which talks to systemd directly; on a
 *    guest without systemd, sync + read-only remount + `poweroff -f`;
 * 3. without an agent, or when that failed too, the ACPI power button;
 * 4. only at the deadline (`timeoutMs` from the start): freeze the filesystems through the
 *    agent (ext4 is then clean, nothing to replay) and destroy the domain.
 * A step that fails moves on at once; only a step the guest accepted is waited for. Each step
 * is in the result's `steps`, with the guest's own words when it failed.
 */
export async function stopDomain(connection: LibvirtConnection, name: string, timeoutMs = 30_000): Promise<ShutdownResult> {
  const started = Date.now();
  const deadline = started + timeoutMs;
  const steps: ShutdownStep[] = [];
  const step = (how: ShutdownStep['how'], ok: boolean, detail: string, since: number): void => {
    steps.push({ how, ok, detail: oneLine(detail), ms: Date.now() - since });
  };
  const result = (how: ShutdownResult['how'], warning?: string): ShutdownResult => {
    const r: ShutdownResult = { how, ms: Date.now() - started, steps, ...(warning === undefined ? {} : { warning }) };
    for (const listener of shutdownListeners) {
      try {
        listener(name, r);
      } catch {
        // an observer's failure is not the stop's
      }
    }
    return r;
  };
  const off = async (): Promise<boolean> => {
    const state = await connection.state(name);
    return state === 'absent' || state === 'shutoff';
  };
  const waitOff = async (until: number): Promise<boolean> => {
    for (;;) {
      if (await off()) return true;
      if (Date.now() >= until) return false;
      await sleep(100);
    }
  };
  const stillRunning = (what: string, since: number): string => `${what}, but ${name} was still running after ${((Date.now() - since) / 1000).toFixed(1)} s`;
  if (await off()) return result('already-off');
  const agent = new GuestAgent(name, { uri: connection.uri });
  const agentUp = await agentAnswers(connection, agent, name, timeoutMs);

  let tryAcpi = true;
  if (agentUp) {
    // 1. guest-shutdown.
    let t = Date.now();
    let accepted = false;
    try {
      await agent.shutdown();
      accepted = true;
    } catch (error) {
      if (await off()) return result('agent'); // it went down while the reply was lost
      step('agent', false, `guest-shutdown: ${agentErrorWords(error)}`, t);
    }
    if (accepted) {
      if (await waitOff(deadline)) {
        step('agent', true, 'guest-shutdown: the guest powered off', t);
        return result('agent');
      }
      step('agent', false, stillRunning('guest-shutdown was accepted', t), t);
      tryAcpi = false; // the time is up
    } else {
      // 2. The guest's own power-off through guest-exec.
      t = Date.now();
      const way = await guestPowerOff(agent);
      const failedAgent = steps.at(-1);
      if (way.shutdownWords !== undefined && failedAgent?.how === 'agent') failedAgent.detail += ` (shutdown says: ${way.shutdownWords})`;
      if (way.started) {
        if (await waitOff(deadline)) {
          step(way.how, true, way.detail, t);
          return result(way.how);
        }
        step(way.how, false, stillRunning(way.detail, t), t);
        tryAcpi = false;
      } else {
        if (await off()) return result(way.how);
        step(way.how, false, way.detail, t);
      }
    }
  }
  if (tryAcpi && Date.now() < deadline) {
    // 3. ACPI: nothing tells whether the guest listens; wait for it until the deadline.
    const t = Date.now();
    let sent = true;
    try {
      await connection.requestShutdown(name);
    } catch (error) {
      sent = false;
      step('acpi', false, `the ACPI request failed: ${messageOf(error)}`, t);
    }
    if (sent) {
      if (await waitOff(deadline)) {
        step('acpi', true, `${agentUp ? 'after the agent failed, ' : 'no guest agent; '}the guest powered off on ACPI`, t);
        return result('acpi');
      }
      step('acpi', false, `no response to the ACPI power button within ${((Date.now() - t) / 1000).toFixed(1)} s${agentUp ? '' : ' (no guest agent answered)'}`, t);
    }
  }
  if (await off()) return result(steps.at(-1)?.how === 'acpi' ? 'acpi' : 'agent');
  // 4. Last resort: make the filesystems consistent if the agent still answers, then pull the plug.
  let t = Date.now();
  let frozen = false;
  try {
    const count = await agent.fsfreeze();
    frozen = true;
    step('fsfreeze', true, `froze ${count} filesystem(s): nothing left to replay`, t);
  } catch (error) {
    step('fsfreeze', false, `could not freeze the filesystems: ${agentErrorWords(error)}`, t);
  }
  t = Date.now();
  await connection.destroy(name);
  step('destroy', true, `forced off after ${((Date.now() - started) / 1000).toFixed(1)} s`, t);
  return result(
    'destroyed',
    frozen
      ? 'forced off after the filesystems were frozen; the next recompose still checks the filesystem (it refuses one whose journal needs recovery)'
      : 'forced off without a freeze: the disk is as after a power cut; the next recompose checks the filesystem and refuses one whose journal needs recovery (boot the desktop once to replay it)',
  );
}

/**
 * Step 2: the guest powers itself off through guest-exec. A systemd guest (/run/systemd/system)
 * runs `systemctl poweroff`, which as root talks to systemd over its private socket, without
 * dbus or logind; another guest syncs, remounts / read-only (ext4 empties its journal) and runs
 * `poweroff -f`, and if the remount fails nothing is powered off (the caller moves on).
 */
async function guestPowerOff(agent: GuestAgent): Promise<{ how: 'systemctl' | 'guest-poweroff'; started: boolean; detail: string; shutdownWords?: string }> {
  let systemd: boolean;
  let shutdownWords: string | undefined;
  try {
    // qemu-ga only says "child process has failed to shutdown" (it sends the child's output to
    // /dev/null). To hear shutdown's own words, ask it for a dry run (-k: a wall message only,
    // scheduled through logind like the real one), cancelled at once if it works.
    const probe = await agent.exec(
      '/bin/sh',
      ['-c', '[ -d /run/systemd/system ] && command -v systemctl >/dev/null || exit 3; words=$(shutdown -k +1 2>&1 >/dev/null) && shutdown -c >/dev/null 2>&1; printf %s "$words"'],
      { timeoutMs: 15_000 },
    );
    systemd = probe.exitCode === 0;
    const words = probe.stdout.trim();
    if (systemd && words !== '') shutdownWords = oneLine(words);
  } catch (error) {
    return { how: 'guest-poweroff', started: false, detail: `guest-exec: ${agentErrorWords(error)}` };
  }
  const done = <T extends { how: 'systemctl' | 'guest-poweroff'; started: boolean; detail: string }>(r: T): T & { shutdownWords?: string } => (shutdownWords === undefined ? r : { ...r, shutdownWords });
  return done(await runPowerOff(agent, systemd));
}

async function runPowerOff(agent: GuestAgent, systemd: boolean): Promise<{ how: 'systemctl' | 'guest-poweroff'; started: boolean; detail: string }> {
  const how = systemd ? 'systemctl' : 'guest-poweroff';
  const [path, args, what] = systemd
    ? ['systemctl', ['poweroff'], 'systemctl poweroff']
    : ['/bin/sh', ['-c', 'sync && mount -o remount,ro / && sync && exec poweroff -f'], 'sync, read-only remount, poweroff -f'];
  let pid: number;
  try {
    pid = await agent.spawn(path, args);
  } catch (error) {
    return { how, started: false, detail: `${what}: ${agentErrorWords(error)}` };
  }
  // It either exits at once with a failure, or the guest goes down (and the agent with it).
  const deadline = Date.now() + 10_000;
  for (let delay = 20; Date.now() < deadline; delay = Math.min(500, delay * 2)) {
    let status: ExecResult | null;
    try {
      status = await agent.execStatus(pid);
    } catch {
      return { how, started: true, detail: `${what}: the guest went down` };
    }
    if (status !== null) {
      if (status.exitCode === 0) return { how, started: true, detail: `${what} exited 0` };
      const words = (status.stderr || status.stdout).trim();
      return { how, started: false, detail: `${what} exited ${status.exitCode}${words ? `: ${words}` : ''}` };
    }
    await sleep(delay);
  }
  return { how, started: true, detail: `${what} still running after 10 s` };
}

const oneLine = (text: string): string => text.replace(/\s*\n\s*/g, ' / ').trim();

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
        ? options.firmware === 'efi'
          ? { kind: 'firmware', firmware: 'efi', nvram: resolve(options.nvram ?? serialLog.replace(/(\.serial)?\.log$/, '') + '.nvram.fd') }
          : { kind: 'firmware', firmware: options.firmware ?? 'bios' }
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
