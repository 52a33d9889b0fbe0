/**
 * Run the real QEMU tools from tests: qemu-img and qemu-io are the oracle the engine must agree
 * with. Everything goes through execa with argument arrays (no shell), and failures throw with
 * the tool's stderr so a failing test says why.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';

export interface ToolResult {
  stdout: string;
  stderr: string;
  exitCode: number;
}

/** Run qemu-img with `args`; throws unless the exit code is in `okCodes` (default [0]). */
export async function qemuImg(args: string[], okCodes: number[] = [0]): Promise<ToolResult> {
  const result = await execa('qemu-img', args, { reject: false, timeout: 120_000 });
  const exitCode = result.exitCode ?? -1;
  if (!okCodes.includes(exitCode)) {
    throw new Error(`qemu-img ${args.join(' ')} exited ${exitCode}: ${result.stderr || result.stdout}`);
  }
  return { stdout: result.stdout, stderr: result.stderr, exitCode };
}

/**
 * Run qemu-io on `image` with each of `commands` as a `-c` argument. `format` defaults to qcow2;
 * pass `imageOpts` to use --image-opts (then `image` is the option string).
 */
export async function qemuIo(
  image: string,
  commands: string[],
  options: { format?: string; imageOpts?: boolean; okCodes?: number[] } = {},
): Promise<ToolResult> {
  const args: string[] = [];
  if (options.imageOpts) args.push('--image-opts');
  else args.push('-f', options.format ?? 'qcow2');
  for (const command of commands) args.push('-c', command);
  args.push(image);
  const result = await execa('qemu-io', args, { reject: false, timeout: 120_000 });
  const exitCode = result.exitCode ?? -1;
  const okCodes = options.okCodes ?? [0];
  // qemu-io exits 0 even when a -c command fails; it reports failures on stdout/stderr.
  const failed = /\b(failed|error)\b/i.test(result.stderr) || /\b(failed):/i.test(result.stdout);
  if (!okCodes.includes(exitCode) || (failed && okCodes.length === 1 && okCodes[0] === 0)) {
    throw new Error(`qemu-io ${args.join(' ')} exited ${exitCode}: ${result.stderr}${result.stdout}`);
  }
  return { stdout: result.stdout, stderr: result.stderr, exitCode };
}

/** Create an image with qemu-img create. `options` become one `-o k=v,k=v` argument. */
export async function qemuCreate(
  path: string,
  size: number | string,
  options: Record<string, string | number | boolean> = {},
  extra: { format?: string; backing?: string; backingFormat?: string } = {},
): Promise<void> {
  const args = ['create', '-q', '-f', extra.format ?? 'qcow2'];
  if (extra.backing !== undefined) args.push('-b', extra.backing, '-F', extra.backingFormat ?? 'qcow2');
  const opts = Object.entries(options).map(([k, v]) => `${k}=${typeof v === 'boolean' ? (v ? 'on' : 'off') : v}`);
  if (opts.length) args.push('-o', opts.join(','));
  args.push(path);
  if (size !== '') args.push(String(size));
  await qemuImg(args);
}

export interface CheckReport {
  exitCode: number;
  corruptions: number;
  leaks: number;
  checkErrors: number;
  raw: unknown;
}

/** `qemu-img check --output=json`; exit 0 clean, 2 corruption, 3 leaks only. Never throws on 2/3. */
export async function qemuCheck(path: string, format = 'qcow2'): Promise<CheckReport> {
  const result = await execa('qemu-img', ['check', '-f', format, '--output=json', path], { reject: false, timeout: 120_000 });
  const exitCode = result.exitCode ?? -1;
  let raw: Record<string, unknown> = {};
  try {
    raw = JSON.parse(result.stdout) as Record<string, unknown>;
  } catch {
    throw new Error(`qemu-img check ${path} exited ${exitCode} without JSON: ${result.stderr}`);
  }
  const num = (k: string): number => (typeof raw[k] === 'number' ? (raw[k] as number) : 0);
  return { exitCode, corruptions: num('corruptions'), leaks: num('leaks'), checkErrors: num('check-errors'), raw };
}

/** `qemu-img info --output=json` parsed. */
export async function qemuInfo(path: string, extraArgs: string[] = []): Promise<Record<string, unknown>> {
  const result = await qemuImg(['info', '--output=json', ...extraArgs, path]);
  return JSON.parse(result.stdout) as Record<string, unknown>;
}

/** The whole virtual disk as qemu sees it: `qemu-img convert -O raw` into a temp file, read back. */
export async function qemuReadRaw(path: string, format = 'qcow2'): Promise<Buffer> {
  const dir = await mkdtemp(join(tmpdir(), 'qlayer-raw-'));
  try {
    const out = join(dir, 'out.raw');
    await qemuImg(['convert', '-f', format, '-O', 'raw', path, out]);
    return await readFile(out);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/**
 * The disk as QEMU reads it when libvirt starts a desktop: the top image with its backing given
 * explicitly (as an explicit <backingStore> chain makes libvirt do), here the desktop's stable
 * apps.qcow2 link, whatever name the top image's header holds; the link's own backing comes from
 * its header.
 */
export async function qemuReadRawExplicit(top: string, backing: string): Promise<Buffer> {
  const spec = { driver: 'qcow2', file: { driver: 'file', filename: top }, backing: { driver: 'qcow2', file: { driver: 'file', filename: backing } } };
  return qemuReadRaw(`json:${JSON.stringify(spec)}`);
}

/** sha256 hex of the raw virtual disk as qemu sees it. */
export async function qemuRawHash(path: string, format = 'qcow2'): Promise<string> {
  return sha256(await qemuReadRaw(path, format));
}

/** `qemu-img compare -f A -F B a b`; true when identical, false when they differ. */
export async function qemuCompare(a: string, b: string, formatA = 'qcow2', formatB = 'raw'): Promise<boolean> {
  const result = await qemuImg(['compare', '-f', formatA, '-F', formatB, a, b], [0, 1]);
  return result.exitCode === 0;
}

export function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/** A fresh temp folder; call the returned cleanup in afterAll/afterEach. */
export async function tempDir(prefix = 'qlayer-test-'): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** Small deterministic PRNG (mulberry32) so random tests are reproducible from a seed. */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Integer in [min, max) from a seeded random function. */
export function randomInt(random: () => number, min: number, max: number): number {
  return min + Math.floor(random() * (max - min));
}

/** Random bytes (not seeded; use for content whose value does not matter). */
export function noise(length: number): Buffer {
  return randomBytes(length);
}

/**
 * A paused qemu-system (TCG, no display) running `image` read-write as a guest does, so that it
 * holds QEMU's image locks. Not waited for: the caller kills it (or awaits a refusal). `timeout`
 * bounds a run that is expected to fail at once.
 */
export function pausedQemu(image: string, options: { timeout?: number } = {}) {
  return execa('qemu-system-x86_64', ['-accel', 'tcg', '-m', '64', '-display', 'none', '-monitor', 'none', '-drive', `file=${image},format=qcow2`, '-S'], {
    reject: false,
    ...(options.timeout !== undefined ? { timeout: options.timeout } : {}),
  });
}
