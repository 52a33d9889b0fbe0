import { writeSync } from 'node:fs';
import { isQlayerError } from '../errors.js';

/** Options every command accepts. */
export interface CommonOptions {
  json?: boolean;
}

/**
 * Print a command's result: the JSON value with --json (always one document on stdout, so that
 * scripts can parse it), otherwise the human text.
 */
export function printResult(options: CommonOptions, value: unknown, human: () => string): void {
  if (options.json) {
    writeStdout(`${JSON.stringify(value, null, 2)}\n`);
  } else {
    const text = human();
    if (text.length > 0) writeStdout(text.endsWith('\n') ? text : `${text}\n`);
  }
}

/**
 * Write a command's output to descriptor 1 directly, without making `process.stdout`: Node builds
 * that stream on first use, and on a pipe it costs start-up time (measured on Node 24: a one-line
 * `node -e` to a pipe took 27.1 ms through process.stdout against 24.3 ms with writeSync, the
 * bare start-up 24.4). Order with earlier stream writes holds: on Linux Node writes stdout files,
 * pipes and terminals synchronously. A descriptor that would block (a non-blocking pipe someone
 * else made) hands the rest to the stream; a reader that went away ends the command as it ends a
 * C tool (SIGPIPE: 128 + 13), as bin/qlayer.js does for the stream.
 */
export function writeStdout(text: string): void {
  stdoutWriter(text);
}

let stdoutWriter: (text: string) => void = writeDescriptor;

/**
 * Where writeStdout sends a command's output: for a caller that runs the CLI in-process and keeps
 * what it prints (tests); no argument restores descriptor 1.
 */
export function setStdoutWriter(writer?: (text: string) => void): void {
  stdoutWriter = writer ?? writeDescriptor;
}

function writeDescriptor(text: string): void {
  const bytes = Buffer.from(text, 'utf8');
  let done = 0;
  try {
    while (done < bytes.length) done += writeSync(1, bytes, done, bytes.length - done);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === 'EAGAIN') process.stdout.write(bytes.subarray(done));
    else if (code === 'EPIPE') process.exit(141);
    else throw error;
  }
}

/** Print an error the way every command does, and return the exit code to use. */
export function reportError(error: unknown, json: boolean): number {
  if (isQlayerError(error)) {
    const message = oneLine(error.message);
    if (json) {
      writeStdout(`${JSON.stringify({ error: { code: error.code, message } }, null, 2)}\n`);
    }
    process.stderr.write(`qlayer: ${message}\n`);
    return error.exitCode;
  }
  const system = systemErrorText(error);
  if (system !== undefined) {
    if (json) writeStdout(`${JSON.stringify({ error: { code: system.code, message: system.message } }, null, 2)}\n`);
    process.stderr.write(`qlayer: ${system.message}\n`);
    return 1;
  }
  const message = error instanceof Error ? (error.stack ?? error.message) : String(error);
  if (json) process.stdout.write(`${JSON.stringify({ error: { code: 'internal', message: String(error) } }, null, 2)}\n`);
  process.stderr.write(`qlayer: internal error: ${message}\n`);
  return 1;
}

/**
 * An error is one line on stderr, whatever produced it: messages that quote a parser's
 * multi-line output (a YAML error's code frame) are folded, so scripts can read the line.
 */
export function oneLine(message: string): string {
  return message.replace(/\s*\n\s*/g, ' ').trim();
}

/** Progress on a terminal only (never in --json or when piped), overwriting one line. */
export function progressReporter(options: CommonOptions, label: string): (done: number, total: number) => void {
  if (options.json || !process.stderr.isTTY) return () => {};
  let lastShown = -1;
  return (done, total) => {
    const percent = total > 0 ? Math.floor((done * 100) / total) : 100;
    if (percent === lastShown) return;
    lastShown = percent;
    process.stderr.write(`\r${label} ${percent}%${percent >= 100 ? '\n' : ''}`);
  };
}

/**
 * An operating-system error (no space, file too large, permission, missing file) is the host's
 * answer, not a qlayer bug: say which call on which file failed, like qemu-img does, without a
 * stack trace. Code 'os.ENOSPC' and the like in JSON.
 */
function systemErrorText(error: unknown): { code: string; message: string } | undefined {
  if (!(error instanceof Error)) return undefined;
  const { code, syscall, path } = error as NodeJS.ErrnoException;
  if (typeof code !== 'string' || !/^E[A-Z0-9]+$/.test(code) || typeof syscall !== 'string') return undefined;
  // Node's message is "EFBIG: file too large, write": keep the description.
  const description = /^E[A-Z0-9]+: ([^,]+)/.exec(error.message)?.[1] ?? code;
  return { code: `os.${code}`, message: `${syscall}${path === undefined ? '' : ` ${path}`} failed: ${description} (${code})` };
}
