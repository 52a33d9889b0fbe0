import { closeSync, openSync, readSync, fstatSync } from 'node:fs';

/** The test guest's serial line format: `QLAYER: <event> [args...]` (vm-fixtures/README.md). */
export const SERIAL_PREFIX = 'QLAYER: ';
export const BOOT_MARKER = 'QLAYER: booted';
export const READY_MARKER = 'QLAYER: ready';

export interface SerialEvent {
  event: string;
  args: string[];
  line: string;
}

/**
 * The QLAYER lines of a serial log, in order. The prefix may follow other text on the same line
 * (a kernel message can interleave), so it is searched within each line.
 */
export function parseSerialEvents(text: string): SerialEvent[] {
  const events: SerialEvent[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.replace(/\r$/, '');
    const at = line.indexOf(SERIAL_PREFIX);
    if (at < 0) continue;
    const [event, ...args] = line.slice(at + SERIAL_PREFIX.length).trim().split(/\s+/);
    if (event === undefined || event === '') continue;
    events.push({ event, args, line: line.slice(at) });
  }
  return events;
}

/** The `sha256 <hex> <path>` lines as a map path -> hex (`missing <path>` maps to null). */
export function parseSha256Events(text: string): Map<string, string | null> {
  const result = new Map<string, string | null>();
  for (const { event, args } of parseSerialEvents(text)) {
    if (event === 'sha256' && args.length >= 2) result.set(args.slice(1).join(' '), args[0] ?? '');
    if (event === 'missing' && args.length >= 1) result.set(args.join(' '), null);
  }
  return result;
}

/** The last `lines` lines of a text, for error messages. */
export function tail(text: string, lines = 20): string {
  const all = text.replace(/\r/g, '').trimEnd().split('\n');
  return all.slice(-lines).join('\n');
}

/**
 * Incremental reader of a serial log file that QEMU appends to. It polls the file (inotify on a
 * file written by another process is not reliable on every filesystem, and polling every 50 ms
 * costs nothing next to a TCG boot).
 */
export class SerialLog {
  private content = '';
  private offset = 0;

  constructor(readonly path: string) {}

  /** Everything the guest has printed so far. */
  text(): string {
    let fd: number;
    try {
      fd = openSync(this.path, 'r');
    } catch {
      return this.content; // not created yet
    }
    try {
      const size = fstatSync(fd).size;
      if (size < this.offset) {
        // Truncated: a new run of the domain started writing it again.
        this.offset = 0;
        this.content = '';
      }
      if (size > this.offset) {
        const chunk = Buffer.alloc(size - this.offset);
        const read = readSync(fd, chunk, 0, chunk.length, this.offset);
        this.offset += read;
        // latin1 never fails on a partial UTF-8 sequence; the protocol is ASCII.
        this.content += chunk.subarray(0, read).toString('latin1');
      }
    } finally {
      closeSync(fd);
    }
    return this.content;
  }

  /** The line that contains `pattern` (a substring or a regex), or undefined. */
  find(pattern: string | RegExp): string | undefined {
    return findLine(this.text(), pattern);
  }

  /**
   * Wait until the log shows `pattern`; returns the line that contains it. `check` runs between
   * polls and may throw to abort the wait (e.g. the domain stopped); it is awaited at most every
   * `checkEveryMs`.
   */
  async waitFor(
    pattern: string | RegExp,
    options: { timeoutMs: number; check?: () => Promise<void>; checkEveryMs?: number; onTimeout: () => Error },
  ): Promise<string> {
    const deadline = Date.now() + options.timeoutMs;
    const checkEvery = options.checkEveryMs ?? 250;
    let lastCheck = 0;
    for (;;) {
      const line = this.find(pattern);
      if (line !== undefined) return line;
      const now = Date.now();
      if (now >= deadline) throw options.onTimeout();
      if (options.check !== undefined && now - lastCheck >= checkEvery) {
        lastCheck = now;
        await options.check();
        // The guest may have printed the marker and stopped between our read and the check.
        const late = this.find(pattern);
        if (late !== undefined) return late;
      }
      await new Promise((resolve) => setTimeout(resolve, Math.min(50, Math.max(1, deadline - Date.now()))));
    }
  }
}

export function findLine(text: string, pattern: string | RegExp): string | undefined {
  let index: number;
  if (typeof pattern === 'string') {
    index = text.indexOf(pattern);
  } else {
    const flags = pattern.flags.replace(/[gy]/g, '');
    const match = new RegExp(pattern.source, flags).exec(text);
    index = match === null ? -1 : match.index;
  }
  if (index < 0) return undefined;
  const start = text.lastIndexOf('\n', index) + 1;
  const end = text.indexOf('\n', index);
  return text.slice(start, end < 0 ? undefined : end).replace(/\r$/, '');
}
