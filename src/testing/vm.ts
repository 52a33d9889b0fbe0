/**
 * A running test VM: the object boot() returns. Commands go through the guest agent, the
 * console is the serial log file QEMU writes, and the disk is a throwaway overlay in the VM's
 * own folder. close() destroys the domain at once (nothing on the overlay is worth a clean
 * shutdown) and deletes the folder.
 */
import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { loadExeca } from '../io/external-program.js';
import { RunningGuest } from '../virt/boot.js';
import type { DiskLayer } from '../virt/domain-xml.js';
import { VirtError } from '../virt/errors.js';
import { DEFAULT_URI, LibvirtConnection } from '../virt/libvirt.js';
import { SerialLog, findLine } from '../virt/serial.js';
import { register, touch, type CommandRecord, type DiagnosticsSource } from './diagnostics.js';
import { cloneFile } from './disk.js';
import { TestingError } from './errors.js';
import type { ResolvedOptions } from './options.js';
import { consoleTail, startGuest } from './start.js';

export interface ExecResult {
  exitCode: number;
  stdout: string;
  stderr: string;
}

export interface ExecOptions {
  /** Kill the command and fail after this long (default: boot's execTimeoutSec, 120). */
  timeoutSec?: number;
  /** Bytes for the command's stdin. */
  input?: string | Buffer;
}

/**
 * How restore() brings a snapshot back.
 * - 'memory': the snapshot holds the guest's memory too (libvirt save); restore loads it and the
 *   guest runs on from that instant, no boot.
 * - 'disk': the snapshot holds the disk only (taken with the filesystems frozen); restore boots
 *   the guest again on that disk.
 * bench/testing.ts measures both; 'memory' is the default because it restores faster under TCG.
 */
export type SnapshotMode = 'memory' | 'disk';

/** A disk state (and with 'memory', the running guest's memory) to come back to. */
export class VmSnapshot {
  /** @internal */
  constructor(
    readonly vm: string,
    readonly id: number,
    readonly mode: SnapshotMode,
    /** @internal the copy of the VM's top layer */
    readonly disk: string,
    /** @internal libvirt's save file ('memory' only) */
    readonly memory: string | null,
  ) {}
}

const HISTORY = 50;
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** `sh -c` commands appear in errors and reports by their text; keep one line of it. */
const oneLine = (text: string, max = 200): string => {
  const flat = text.replace(/\s*\n\s*/g, ' ⏎ ');
  return flat.length > max ? `${flat.slice(0, max)}…` : flat;
};

export class Vm implements DiagnosticsSource, AsyncDisposable {
  /** @internal */ lastUsed = 0;
  private guest: RunningGuest | null;
  private log: SerialLog;
  /** Console text of earlier runs of this VM (before a restore), which QEMU's new run truncated. */
  private serialBefore = '';
  private finalSerial: string | null = null;
  private readonly commands: CommandRecord[] = [];
  private closing: Promise<void> | null = null;
  private snapshots = 0;
  private readonly domainType: RunningGuest['domainType'];

  /** @internal use boot() */
  constructor(
    /** The libvirt domain name (unique: qlayer-test-<12 hex>). */
    readonly name: string,
    /** The VM's folder: overlay, serial log, snapshots. Deleted by close(). */
    readonly dir: string,
    /** The image the VM runs on (read only). */
    readonly image: string,
    /** Top first: the throwaway overlay, then the read-only layers. */
    private readonly chain: DiskLayer[],
    private readonly serialFile: string,
    private readonly options: ResolvedOptions,
    guest: RunningGuest,
    readonly snapshotMode: SnapshotMode,
    composeLog: string[],
  ) {
    this.guest = guest;
    this.domainType = guest.domainType;
    this.log = new SerialLog(serialFile);
    for (const line of composeLog) this.record(`apps: ${line}`, Date.now(), 'ok');
    register(this);
  }

  /** The writable overlay this VM's guest writes to. */
  get overlay(): string {
    return this.chain[0]!.path;
  }

  private get uri(): string {
    return this.options.uri ?? DEFAULT_URI;
  }

  private running(what: string): RunningGuest {
    touch(this);
    if (this.guest === null) throw new TestingError('testing.closed', `${what}: VM ${this.name} is closed`);
    return this.guest;
  }

  private record(command: string, started: number, outcome: string): void {
    this.commands.push({ command, at: new Date(started).toISOString().slice(11, 23), ms: Date.now() - started, outcome });
    if (this.commands.length > HISTORY) this.commands.splice(0, this.commands.length - HISTORY);
  }

  /** The last agent commands, oldest first (also attached to failed tests by qlayer/testing/vitest). */
  history(): CommandRecord[] {
    return [...this.commands];
  }

  /** Everything the serial console printed so far, across restores. */
  serialLog(): string {
    if (this.finalSerial !== null) return this.finalSerial;
    return this.serialBefore + this.log.text();
  }

  /** Run a shell command (`/bin/sh -c`) in the guest; a non-zero exit is a result, not an error. */
  async exec(command: string, options: ExecOptions = {}): Promise<ExecResult> {
    const guest = this.running('exec');
    const timeoutMs = options.timeoutSec === undefined ? this.options.execTimeoutMs : options.timeoutSec * 1000;
    const started = Date.now();
    try {
      const r = await guest.agent.exec('/bin/sh', ['-c', command], { timeoutMs, ...(options.input === undefined ? {} : { input: options.input }) });
      this.record(`exec ${oneLine(command)}`, started, r.exitCode === 0 ? 'exit 0' : `exit ${r.exitCode}${r.stderr.trim() ? `; stderr: ${oneLine(r.stderr.trim())}` : ''}`);
      return { exitCode: r.exitCode, stdout: r.stdout, stderr: r.stderr };
    } catch (error) {
      if (error instanceof VirtError && error.code === 'virt.agent-timeout' && /\(pid (\d+)\) still running/.test(error.message)) {
        const pid = /\(pid (\d+)\)/.exec(error.message)![1]!;
        // Leave nothing running that the next command could trip over: the shell and its children.
        await guest.agent.exec('/bin/sh', ['-c', `pkill -9 -P ${pid}; kill -9 ${pid}`], { timeoutMs: 10_000 }).catch(() => undefined);
        this.record(`exec ${oneLine(command)}`, started, `timed out after ${timeoutMs / 1000} s (killed)`);
        throw new TestingError(
          'testing.command-timeout',
          `${this.name}: ${JSON.stringify(oneLine(command))} was still running after ${timeoutMs / 1000} s, so it was killed; ` +
            `if it is meant to run that long, pass { timeoutSec }`,
          { cause: error },
        );
      }
      this.record(`exec ${oneLine(command)}`, started, `error: ${(error as Error).message}`);
      throw await this.explain(error, `exec ${JSON.stringify(oneLine(command))}`);
    }
  }

  /** Run a command that must succeed; its stdout. Throws with the exit code, stdout and stderr otherwise. */
  async succeed(command: string, options: ExecOptions = {}): Promise<string> {
    const r = await this.exec(command, options);
    if (r.exitCode !== 0) throw new TestingError('testing.command-failed', commandFailed(this.name, command, r));
    return r.stdout;
  }

  /** Retry a command until it exits 0 (its stdout), or fail after timeoutSec (default 60) with its last output. */
  async waitUntilSucceeds(command: string, options: { timeoutSec?: number; intervalMs?: number } = {}): Promise<string> {
    const timeoutMs = (options.timeoutSec ?? 60) * 1000;
    const deadline = Date.now() + timeoutMs;
    let last: ExecResult | Error | undefined;
    for (;;) {
      const left = Math.max(1000, deadline - Date.now());
      try {
        const r = await this.exec(command, { timeoutSec: left / 1000 });
        if (r.exitCode === 0) return r.stdout;
        last = r;
      } catch (error) {
        if (!(error instanceof TestingError) || error.code !== 'testing.command-timeout') throw error;
        last = error;
      }
      if (Date.now() >= deadline) {
        const detail = last instanceof Error ? last.message : commandFailed(this.name, command, last!);
        throw new TestingError('testing.wait-timeout', `${this.name}: ${JSON.stringify(oneLine(command))} did not succeed within ${timeoutMs / 1000} s; last attempt:\n${detail}`);
      }
      await sleep(options.intervalMs ?? 500);
    }
  }

  /**
   * Wait until the serial console shows `pattern`; the line it is on. Searches everything the
   * console printed (or from character `after`, e.g. `vm.serialLog().length` taken earlier).
   */
  async waitForConsole(pattern: string | RegExp, options: { timeoutSec?: number; after?: number } = {}): Promise<string> {
    const guest = this.running('waitForConsole');
    const timeoutMs = (options.timeoutSec ?? 60) * 1000;
    const deadline = Date.now() + timeoutMs;
    const started = Date.now();
    const what = typeof pattern === 'string' ? JSON.stringify(pattern) : String(pattern);
    let nextStateCheck = 0;
    for (;;) {
      const found = findLine(this.serialLog().slice(options.after ?? 0), pattern);
      if (found !== undefined) {
        this.record(`waitForConsole ${what}`, started, 'found');
        return found;
      }
      if (Date.now() >= nextStateCheck) {
        nextStateCheck = Date.now() + 1000;
        const state = await guest.state();
        if (state === 'absent' || state === 'shutoff' || state === 'crashed') {
          this.record(`waitForConsole ${what}`, started, `guest stopped (${state})`);
          throw new TestingError('testing.guest-stopped', `${this.name} stopped (${state}) before its console showed ${what}${consoleTail(this.serialLog())}`);
        }
      }
      if (Date.now() >= deadline) {
        this.record(`waitForConsole ${what}`, started, 'timed out');
        throw new TestingError('testing.console-timeout', `${this.name}: the console did not show ${what} within ${timeoutMs / 1000} s${consoleTail(this.serialLog())}`);
      }
      await sleep(100);
    }
  }

  /** Write a guest file (created or replaced). */
  async writeFile(path: string, data: string | Buffer, options: { mode?: number } = {}): Promise<void> {
    const guest = this.running('writeFile');
    const bytes = typeof data === 'string' ? Buffer.from(data) : data;
    const started = Date.now();
    try {
      await guest.agent.writeFile(path, bytes, options.mode === undefined ? {} : { mode: options.mode });
      this.record(`writeFile ${path} (${bytes.length} bytes)`, started, 'ok');
    } catch (error) {
      this.record(`writeFile ${path} (${bytes.length} bytes)`, started, `error: ${(error as Error).message}`);
      throw await this.explain(error, `writeFile ${path}`);
    }
  }

  /** Read a guest file as UTF-8 text. */
  async readFile(path: string): Promise<string>;
  /** Read a guest file's bytes. */
  async readFile(path: string, encoding: 'buffer'): Promise<Buffer>;
  async readFile(path: string, encoding?: 'buffer'): Promise<string | Buffer> {
    const guest = this.running('readFile');
    const started = Date.now();
    try {
      const bytes = await guest.agent.readFile(path);
      this.record(`readFile ${path}`, started, `${bytes.length} bytes`);
      return encoding === 'buffer' ? bytes : bytes.toString('utf8');
    } catch (error) {
      this.record(`readFile ${path}`, started, `error: ${(error as Error).message}`);
      throw await this.explain(error, `readFile ${path}`);
    }
  }

  /** Capture the disk state (and with snapshotMode 'memory', the guest's memory) to restore() later. */
  async snapshot(): Promise<VmSnapshot> {
    const guest = this.running('snapshot');
    const id = ++this.snapshots;
    const dir = join(this.dir, 'snapshots', String(id));
    mkdirSync(dir, { recursive: true });
    const disk = join(dir, 'disk.qcow2');
    const started = Date.now();
    if (this.snapshotMode === 'memory') {
      // libvirt's save stops the guest and writes its memory; the disk is then quiet and flushed,
      // so a copy of the overlay belongs to exactly that instant. Then the guest resumes from it.
      const memory = join(dir, 'memory.save');
      await this.virsh(['save', this.name, memory]);
      await this.forget(guest);
      await cloneFile(this.overlay, disk);
      await this.resume(memory);
      this.record(`snapshot ${id} (memory)`, started, 'ok');
      return new VmSnapshot(this.name, id, 'memory', disk, memory);
    }
    // Disk only: frozen filesystems are clean on the virtual disk (no journal to replay) and
    // QEMU has flushed its own metadata, so the overlay's bytes are a bootable state.
    await guest.agent.fsfreeze();
    try {
      await cloneFile(this.overlay, disk);
    } finally {
      await guest.agent.fsthaw().catch(() => undefined);
    }
    this.record(`snapshot ${id} (disk)`, started, 'ok');
    return new VmSnapshot(this.name, id, 'disk', disk, null);
  }

  /** Bring back a snapshot's disk state (and memory) and have the guest running on it again. */
  async restore(snapshot: VmSnapshot): Promise<void> {
    const guest = this.running('restore');
    if (!(snapshot instanceof VmSnapshot) || snapshot.vm !== this.name) {
      throw new TestingError('testing.snapshot-foreign', `restore: that snapshot belongs to ${snapshot?.vm ?? 'nothing'}, not ${this.name}`);
    }
    const started = Date.now();
    await guest.destroy();
    await this.forget(guest);
    await cloneFile(snapshot.disk, this.overlay);
    if (snapshot.memory !== null) await this.resume(snapshot.memory);
    else this.guest = await startGuest({ name: this.name, chain: this.chain, serialLog: this.serialFile, options: this.options });
    this.record(`restore ${snapshot.id} (${snapshot.mode})`, started, 'ok');
  }

  /** Destroy the domain and delete the overlay and snapshots. Calling it again does nothing. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      touch(this);
      const guest = this.guest;
      this.finalSerial = this.serialLog();
      this.guest = null;
      try {
        await guest?.destroy();
      } finally {
        rmSync(this.dir, { recursive: true, force: true });
      }
    })();
    return this.closing;
  }

  /** `await using vm = await boot(...)` closes the VM at the end of the block. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /** Keep the console text of the run that is ending; the next QEMU truncates the file. */
  private async forget(guest: RunningGuest): Promise<void> {
    this.serialBefore += this.log.text();
    this.log = new SerialLog(this.serialFile);
    this.guest = null;
    await guest.destroy().catch(() => undefined);
  }

  /** Start the domain again from a libvirt save file and wait for its agent. */
  private async resume(memory: string): Promise<void> {
    await this.virsh(['restore', memory]);
    const connection = await LibvirtConnection.open(this.uri);
    this.guest = new RunningGuest(this.name, this.domainType, this.serialFile, false, connection, Date.now());
    await this.guest.agent.waitReady(Math.min(this.options.timeoutMs, 60_000));
  }

  private async virsh(args: string[]): Promise<void> {
    const { execa } = await loadExeca();
    const r = await execa('virsh', ['-c', this.uri, ...args], { reject: false, timeout: this.options.timeoutMs });
    if (r.exitCode !== 0) throw new VirtError('virt.start-failed', `virsh ${args[0]} for ${this.name} failed: ${(r.stderr || r.stdout).trim()}`);
  }

  /** An agent failure because the guest is gone says so, with the console. */
  private async explain(error: unknown, what: string): Promise<unknown> {
    if (!(error instanceof VirtError) || this.guest === null) return error;
    const state = await this.guest.state().catch(() => 'absent' as const);
    if (state === 'absent' || state === 'shutoff' || state === 'crashed') {
      return new TestingError('testing.guest-stopped', `${what}: ${this.name} is no longer running (${state})${consoleTail(this.serialLog())}`, { cause: error });
    }
    return error;
  }
}

function commandFailed(name: string, command: string, r: ExecResult): string {
  const block = (label: string, text: string): string => `--- ${label} ---\n${text.trimEnd() === '' ? '(empty)' : text.trimEnd()}`;
  return `${name}: command failed with exit code ${r.exitCode}: ${oneLine(command)}\n${block('stdout', r.stdout)}\n${block('stderr', r.stderr)}`;
}
