import { loadExeca } from '../io/external-program.js';
import { DEFAULT_URI } from './libvirt.js';
import { VirtError } from './errors.js';

/**
 * The QEMU guest agent of a running domain, reached through `virsh qemu-agent-command`.
 *
 * Why virsh and not the channel's socket: libvirt itself connects to the agent's virtio-serial
 * socket (it uses the agent for shutdown and fsfreeze, and tracks whether it is connected), and
 * the socket takes one client. The npm binding has no agent call. virsh with the command as an
 * argument returns a real exit status and the bare JSON reply; piping commands into virsh's
 * stdin instead echoes them and exits 0 even when a command fails (checked with libvirt 9).
 * An argument is limited to 128 KiB (MAX_ARG_STRLEN), so every command built here stays under
 * MAX_COMMAND_BYTES: file writes go in chunks, and a large exec input is staged as a file first.
 */

/** Keep each JSON command below the kernel's 128 KiB limit for one argument. */
const MAX_COMMAND_BYTES = 112 * 1024;
/** Raw bytes per guest-file-write: 48 KiB becomes 64 KiB of base64. */
const WRITE_CHUNK = 48 * 1024;
/** Bytes per guest-file-read (qemu-ga allows up to 48 MB; virsh's stdout has no limit). */
const READ_CHUNK = 4 * 1024 * 1024;
/** exec input above this is written to a guest file and redirected, not passed as input-data. */
const MAX_INLINE_INPUT = 60 * 1024;

export interface ExecResult {
  /** The exit status; when the program was killed by a signal, 128 + signal (like a shell). */
  exitCode: number;
  /** The signal that killed it, if any. */
  signal?: number;
  stdout: string;
  stderr: string;
  stdoutBytes: Buffer;
  stderrBytes: Buffer;
  /** qemu-ga keeps at most 16 MB of each stream. */
  truncated: boolean;
}

export interface ExecOptions {
  input?: string | Buffer;
  /** Wall-clock limit for the program, default 60 s. */
  timeoutMs?: number;
  /** Environment, as NAME=value strings (the agent's own environment otherwise). */
  env?: string[];
}

export interface GuestAgentOptions {
  uri?: string;
  /** The virsh binary, default 'virsh' from PATH. */
  virsh?: string;
  /** Seconds libvirt waits for one agent reply, default 10. */
  commandTimeoutS?: number;
}

interface GuestExecStatus {
  exited: boolean;
  exitcode?: number;
  signal?: number;
  'out-data'?: string;
  'err-data'?: string;
  'out-truncated'?: boolean;
  'err-truncated'?: boolean;
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

/** Quote for POSIX sh (what every guest has). */
export function shQuote(value: string): string {
  return `'${value.replace(/'/g, `'\\''`)}'`;
}

export class GuestAgent {
  readonly uri: string;
  private readonly virsh: string;
  private readonly commandTimeoutS: number;

  constructor(
    readonly domain: string,
    options: GuestAgentOptions = {},
  ) {
    this.uri = options.uri ?? DEFAULT_URI;
    this.virsh = options.virsh ?? 'virsh';
    this.commandTimeoutS = options.commandTimeoutS ?? 10;
  }

  /** Send one agent command and return its `return` value. */
  async command<T = unknown>(execute: string, args?: Record<string, unknown>, options: { timeoutS?: number } = {}): Promise<T> {
    const message = JSON.stringify(args === undefined ? { execute } : { execute, arguments: args });
    if (Buffer.byteLength(message) > MAX_COMMAND_BYTES) {
      throw new VirtError('virt.invalid-spec', `agent command ${execute} is ${Buffer.byteLength(message)} bytes, over the ${MAX_COMMAND_BYTES}-byte limit of one virsh argument`);
    }
    const timeoutS = options.timeoutS ?? this.commandTimeoutS;
    // libvirt runs one agent command at a time per domain and answers "not available for now"
    // (without sending anything) while another is in flight: retry those for a moment.
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.commandOnce<T>(execute, message, timeoutS);
      } catch (error) {
        if (attempt >= 10 || !(error instanceof VirtError) || !/not available for now/i.test(error.message)) throw error;
        await sleep(100 * (attempt + 1));
      }
    }
  }

  private async commandOnce<T>(execute: string, message: string, timeoutS: number): Promise<T> {
    let result;
    try {
      const { execa } = await loadExeca();
      result = await execa(this.virsh, ['-c', this.uri, 'qemu-agent-command', this.domain, '--timeout', String(timeoutS), message], {
        reject: false,
        timeout: (timeoutS + 10) * 1000,
        stripFinalNewline: true,
      });
    } catch (error) {
      throw new VirtError('virt.virsh-missing', `cannot run ${this.virsh} for the guest agent (install libvirt-clients): ${String(error)}`, { cause: error });
    }
    if ((result as { code?: string }).code === 'ENOENT') {
      throw new VirtError('virt.virsh-missing', `${this.virsh} is not installed (libvirt-clients); the guest agent is reached through it`);
    }
    if (result.exitCode !== 0 || result.timedOut) {
      const detail = (result.stderr || result.stdout || (result.timedOut ? 'virsh timed out' : `exit ${result.exitCode}`)).replace(/^error: /gm, '').trim();
      throw classifyAgentError(this.domain, execute, detail);
    }
    let reply: unknown;
    try {
      reply = JSON.parse(result.stdout);
    } catch {
      throw new VirtError('virt.agent-error', `agent ${execute} on ${this.domain}: unreadable reply ${JSON.stringify(result.stdout.slice(0, 200))}`);
    }
    if (typeof reply === 'object' && reply !== null && 'error' in reply) {
      throw new VirtError('virt.agent-error', `agent ${execute} on ${this.domain}: ${JSON.stringify((reply as { error: unknown }).error)}`);
    }
    return (reply as { return: T }).return;
  }

  /** guest-ping: succeeds when the agent answers. */
  async ping(timeoutS = 3): Promise<void> {
    await this.command('guest-ping', undefined, { timeoutS });
  }

  /** Ping until the agent answers (it starts seconds after the domain); 'virt.agent-unavailable' on timeout. */
  async waitReady(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let last: unknown;
    for (;;) {
      try {
        await this.ping(Math.max(1, Math.min(3, Math.ceil((deadline - Date.now()) / 1000))));
        return;
      } catch (error) {
        last = error;
        // A stopped domain will not grow an agent.
        if (error instanceof VirtError && /Domain not found|failed to get domain|domain is not running/i.test(error.message)) throw error;
      }
      if (Date.now() >= deadline) {
        throw new VirtError('virt.agent-unavailable', `the guest agent of ${this.domain} did not answer within ${timeoutMs} ms (last: ${last instanceof Error ? last.message : String(last)})`, { cause: last });
      }
      await sleep(200);
    }
  }

  /** guest-info: the agent's version and the commands it supports. */
  async info(): Promise<{ version: string; commands: Array<{ name: string; enabled: boolean }> }> {
    const info = await this.command<{ version: string; supported_commands: Array<{ name: string; enabled: boolean }> }>('guest-info');
    return { version: info.version, commands: info.supported_commands.map(({ name, enabled }) => ({ name, enabled })) };
  }

  /**
   * Run a program in the guest (guest-exec, then guest-exec-status until it exits) and capture
   * its output. A non-zero exit is a result, not an error; a program still running after
   * `timeoutMs` is an 'virt.agent-timeout' error.
   */
  async exec(path: string, args: string[] = [], options: ExecOptions = {}): Promise<ExecResult> {
    const input = options.input === undefined ? undefined : Buffer.isBuffer(options.input) ? options.input : Buffer.from(options.input);
    if (input !== undefined && input.length > MAX_INLINE_INPUT) {
      // Too big for one agent command: stage it as a file and let sh redirect it.
      const staged = `/tmp/.qlayer-input-${process.pid}-${Date.now()}-${Math.random().toString(36).slice(2, 8)}`;
      await this.writeFile(staged, input);
      const wrapper = 'f=$1; shift; "$@" < "$f"; rc=$?; rm -f "$f"; exit $rc';
      const { input: _dropped, ...rest } = options;
      return this.exec('/bin/sh', ['-c', wrapper, 'sh', staged, path, ...args], rest);
    }
    const pid = await this.spawn(path, args, options);
    const timeoutMs = options.timeoutMs ?? 60_000;
    const deadline = Date.now() + timeoutMs;
    let delay = 10;
    for (;;) {
      const result = await this.execStatus(pid);
      if (result !== null) return result;
      if (Date.now() >= deadline) {
        throw new VirtError('virt.agent-timeout', `${path} ${args.join(' ')} (pid ${pid}) still running in ${this.domain} after ${timeoutMs} ms`);
      }
      await sleep(delay);
      delay = Math.min(200, delay * 2);
    }
  }

  /**
   * Start a program in the guest (guest-exec) and return its pid at once, for execStatus. For a
   * program that may take the agent down with it (a power-off), where exec's polling would fail.
   */
  async spawn(path: string, args: string[] = [], options: Pick<ExecOptions, 'input' | 'env'> = {}): Promise<number> {
    const request: Record<string, unknown> = { path, arg: args, 'capture-output': true };
    if (options.input !== undefined) request['input-data'] = (Buffer.isBuffer(options.input) ? options.input : Buffer.from(options.input)).toString('base64');
    if (options.env !== undefined) request['env'] = options.env;
    const { pid } = await this.command<{ pid: number }>('guest-exec', request);
    return pid;
  }

  /** guest-exec-status of a spawned program: its result once it exited, null while it runs. */
  async execStatus(pid: number): Promise<ExecResult | null> {
    const status = await this.command<GuestExecStatus>('guest-exec-status', { pid });
    if (!status.exited) return null;
    const stdoutBytes = Buffer.from(status['out-data'] ?? '', 'base64');
    const stderrBytes = Buffer.from(status['err-data'] ?? '', 'base64');
    const signal = status.signal;
    const result: ExecResult = {
      exitCode: status.exitcode ?? (signal !== undefined ? 128 + signal : -1),
      stdout: stdoutBytes.toString('utf8'),
      stderr: stderrBytes.toString('utf8'),
      stdoutBytes,
      stderrBytes,
      truncated: Boolean(status['out-truncated'] || status['err-truncated']),
    };
    if (signal !== undefined) result.signal = signal;
    return result;
  }

  /** Run a POSIX sh script; throws 'virt.agent-error' with its stderr unless it exits 0. */
  async sh(script: string, options: ExecOptions & { what?: string } = {}): Promise<string> {
    const { what, ...execOptions } = options;
    const result = await this.exec('/bin/sh', ['-c', script], execOptions);
    if (result.exitCode !== 0) {
      const detail = (result.stderr || result.stdout).trim().split('\n').slice(-5).join('\n');
      throw new VirtError('virt.agent-error', `${what ?? script.slice(0, 80)} failed in ${this.domain} (exit ${result.exitCode}): ${detail}`);
    }
    return result.stdout;
  }

  /** Write a file (created or truncated) through guest-file-*, then set its mode if given. */
  async writeFile(path: string, data: string | Buffer, options: { mode?: number } = {}): Promise<void> {
    const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data);
    const handle = await this.command<number>('guest-file-open', { path, mode: 'w' });
    try {
      for (let offset = 0; offset < bytes.length; offset += WRITE_CHUNK) {
        const chunk = bytes.subarray(offset, offset + WRITE_CHUNK);
        const { count } = await this.command<{ count: number }>('guest-file-write', { handle, 'buf-b64': chunk.toString('base64') });
        if (count !== chunk.length) throw new VirtError('virt.agent-error', `short write to ${path} in ${this.domain}: ${count} of ${chunk.length} bytes at ${offset}`);
      }
      await this.command('guest-file-flush', { handle });
    } finally {
      await this.command('guest-file-close', { handle }).catch(() => undefined);
    }
    // guest-file-open creates files 0666 whatever the umask: set the mode explicitly.
    if (options.mode !== undefined) await this.chmod(path, options.mode);
  }

  /** Read a whole file through guest-file-*; refuses files over `maxBytes` (default 256 MiB). */
  async readFile(path: string, options: { maxBytes?: number } = {}): Promise<Buffer> {
    const maxBytes = options.maxBytes ?? 256 * 1024 * 1024;
    const handle = await this.command<number>('guest-file-open', { path, mode: 'r' });
    const chunks: Buffer[] = [];
    let total = 0;
    try {
      for (;;) {
        const reply = await this.command<{ count: number; 'buf-b64': string; eof: boolean }>('guest-file-read', { handle, count: READ_CHUNK }, { timeoutS: 60 });
        const chunk = Buffer.from(reply['buf-b64'], 'base64');
        total += chunk.length;
        if (total > maxBytes) throw new VirtError('virt.agent-error', `${path} in ${this.domain} is larger than ${maxBytes} bytes`);
        chunks.push(chunk);
        if (reply.eof || reply.count === 0) break;
      }
    } finally {
      await this.command('guest-file-close', { handle }).catch(() => undefined);
    }
    return Buffer.concat(chunks);
  }

  /** sync(1) in the guest: everything written so far reaches the virtual disk. */
  async sync(): Promise<void> {
    await this.sh('sync', { what: 'sync' });
  }

  async mkdirP(path: string, mode?: number): Promise<void> {
    await this.sh(`mkdir -p -- ${shQuote(path)}${mode === undefined ? '' : ` && chmod ${octal(mode)} -- ${shQuote(path)}`}`, { what: `mkdir -p ${path}` });
  }

  /**
   * Create (or replace) a file of exactly `size` bytes filled with real zero writes: `head -c`
   * from /dev/zero, never fallocate, whose unwritten extents read as zeros whatever the disk holds.
   */
  async createZeroFile(path: string, size: number, options: { timeoutMs?: number } = {}): Promise<void> {
    if (!Number.isSafeInteger(size) || size < 0) throw new VirtError('virt.invalid-spec', `zero file size ${size} is not a non-negative integer`);
    await this.sh(`head -c ${size} /dev/zero > ${shQuote(path)}`, { what: `zero-fill ${path}`, timeoutMs: options.timeoutMs ?? 600_000 });
  }

  async chmod(path: string, mode: number): Promise<void> {
    await this.sh(`chmod ${octal(mode)} -- ${shQuote(path)}`, { what: `chmod ${path}` });
  }

  async chown(path: string, uid: number | string, gid: number | string): Promise<void> {
    await this.sh(`chown ${shQuote(`${uid}:${gid}`)} -- ${shQuote(path)}`, { what: `chown ${path}` });
  }

  async remove(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    await this.sh(`rm -f${options.recursive ? 'r' : ''} -- ${shQuote(path)}`, { what: `rm ${path}` });
  }

  /** The sha256 of a guest file as the guest reads it (sha256sum). */
  async sha256(path: string): Promise<string> {
    const out = await this.sh(`sha256sum -- ${shQuote(path)}`, { what: `sha256sum ${path}`, timeoutMs: 600_000 });
    const hex = /^([0-9a-f]{64})\s/.exec(out)?.[1];
    if (hex === undefined) throw new VirtError('virt.agent-error', `sha256sum ${path} in ${this.domain} printed ${JSON.stringify(out.slice(0, 120))}`);
    return hex;
  }

  /** guest-fsfreeze-freeze: flush and freeze every filesystem; returns how many were frozen. */
  async fsfreeze(): Promise<number> {
    return this.command<number>('guest-fsfreeze-freeze', undefined, { timeoutS: 60 });
  }

  async fsthaw(): Promise<number> {
    return this.command<number>('guest-fsfreeze-thaw', undefined, { timeoutS: 60 });
  }

  async fsfreezeStatus(): Promise<'thawed' | 'frozen'> {
    return this.command<'thawed' | 'frozen'>('guest-fsfreeze-status');
  }

  /** sync and remount a filesystem read-only: ext4 commits and empties its journal. */
  async remountReadOnly(mountPoint = '/'): Promise<void> {
    await this.sh(`sync && mount -o remount,ro ${shQuote(mountPoint)}`, { what: `remount ${mountPoint} read-only` });
  }

  /**
   * guest-shutdown. The agent usually dies with the guest before it can reply; that is success.
   * Returns once the command is delivered, not when the guest is off.
   */
  async shutdown(mode: 'powerdown' | 'halt' | 'reboot' = 'powerdown'): Promise<void> {
    try {
      await this.command('guest-shutdown', { mode }, { timeoutS: 10 });
    } catch (error) {
      if (error instanceof VirtError && /End of file from agent|disappeared|not running|Domain not found/i.test(error.message)) return;
      throw error;
    }
  }
}

/**
 * The words of an agent or libvirt failure without qlayer's framing: the agent's `desc` when the
 * reply carries one ({"class":"GenericError","desc":"..."}), else the message after "agent CMD on DOMAIN: ".
 */
export function agentErrorWords(error: unknown): string {
  const message = error instanceof Error ? error.message : String(error);
  const desc = /"desc"\s*:\s*"((?:[^"\\]|\\.)*)"/.exec(message)?.[1];
  if (desc !== undefined) {
    try {
      return JSON.parse(`"${desc}"`) as string;
    } catch {
      return desc;
    }
  }
  return message
    .replace(/^agent \S+ on \S+: /, '')
    .replace(/^internal error: unable to execute QEMU agent command '[^']*': /, '')
    .trim();
}

function octal(mode: number): string {
  return (mode & 0o7777).toString(8).padStart(4, '0');
}

function classifyAgentError(domain: string, execute: string, detail: string): VirtError {
  const message = `agent ${execute} on ${domain}: ${detail}`;
  if (/Failed to connect socket|failed to connect to the hypervisor/i.test(detail)) return new VirtError('virt.libvirt-unreachable', message);
  if (/didn't respond|timed out|timeout/i.test(detail)) return new VirtError('virt.agent-timeout', message);
  if (/not responding|not connected|not available|not configured|Domain not found|failed to get domain|not running|End of file|disappeared/i.test(detail)) {
    return new VirtError('virt.agent-unavailable', message);
  }
  return new VirtError('virt.agent-error', message);
}
