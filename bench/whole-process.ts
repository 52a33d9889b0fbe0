/**
 * Benchmark section "whole process": what a user feels at the shell. Each run spawns the command
 * as a child process and times it from spawn to exit (stdout read to the end), for qlayer
 * (`node bin/qlayer.js ...` on the Node that runs the bench) and for the reference (qemu-img, or
 * a bare `node -e ''` for start-up). The other sections time qlayer's engine in-process; these
 * rows add Node's start-up, loading qlayer's code and writing the output. Times are the median of
 * at least 20 runs (10 for the large map and check), runs alternating between the two tools.
 *
 * Two converts run as a user would: 1 GiB of half data and holes to qcow2, and a fragmented 8 GiB
 * qcow2 (20,000 scattered 4 KiB writes) to raw, each checked with qemu-img compare.
 *
 * The fragmented image is the size by default, 64 GiB with 200,000 scattered clusters
 * (qemu-io builds it in about two minutes, 13 GB on disk); QLAYER_BENCH_FRAG_CLUSTERS=20000 makes
 * a smaller one.
 */
import { spawn } from 'node:child_process';
import { stat, symlink } from 'node:fs/promises';
import { join } from 'node:path';
import { registerBenchSection, type BenchCase, type BenchContext } from './harness.js';

/** The launcher a user runs (this file is compiled to dist/bench/). */
const QLAYER_BIN = join(import.meta.dirname, '..', '..', 'bin', 'qlayer.js');
const FRAG_CLUSTERS = Number(process.env.QLAYER_BENCH_FRAG_CLUSTERS ?? 200_000);

interface Finished {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Run a command to its exit, collecting its output (the caller times the whole of it). */
function run(command: string, args: string[], input?: string): Promise<Finished> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, { stdio: [input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
    const stdout: Buffer[] = [];
    const stderr: Buffer[] = [];
    child.stdout!.on('data', (chunk: Buffer) => stdout.push(chunk));
    child.stderr!.on('data', (chunk: Buffer) => stderr.push(chunk));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout: Buffer.concat(stdout).toString('utf8'), stderr: Buffer.concat(stderr).toString('utf8') }));
    if (input !== undefined) child.stdin!.end(input);
  });
}

/** Run and require an exit code of 0; returns stdout. */
async function ok(command: string, args: string[], input?: string): Promise<string> {
  const result = await run(command, args, input);
  if (result.code !== 0) throw new Error(`${command} ${args.join(' ')} exited ${result.code}: ${result.stderr.trim()}`);
  return result.stdout;
}

const qlayer = (args: string[]): Promise<string> => ok(process.execPath, [QLAYER_BIN, ...args]);
const qemuImg = (args: string[]): Promise<string> => ok('qemu-img', args);
const f = (ctx: BenchContext, name: string): string => join(ctx.dir, name);

async function exists(path: string): Promise<boolean> {
  return stat(path).then(() => true, () => false);
}

/** A 64 MiB image with 1 MiB written: what `image info` is typically run on. */
async function smallImage(ctx: BenchContext): Promise<void> {
  const path = f(ctx, 'small.qcow2');
  if (await exists(path)) return;
  await qemuImg(['create', '-q', '-f', 'qcow2', path, '64M']);
  await ok('qemu-io', ['-f', 'qcow2', path], 'write -P 7 1M 1M\nquit\n');
}

/**
 * 64 GiB, FRAG_CLUSTERS clusters written in scattered order (host order != guest order), as
 * bench/qcow2-ops.ts builds it. QLAYER_BENCH_FRAG_IMAGE=PATH uses (and keeps) an image built so
 * before, linked in: building it takes minutes.
 */
async function fragmentedImage(ctx: BenchContext): Promise<void> {
  const path = f(ctx, 'frag.qcow2');
  if (await exists(path)) return;
  const prebuilt = process.env.QLAYER_BENCH_FRAG_IMAGE;
  if (prebuilt) {
    await symlink(prebuilt, path);
    return;
  }
  await qemuImg(['create', '-q', '-f', 'qcow2', path, '64G']);
  const writes: string[] = [];
  // 7919 is odd, so i * 7919 mod 2^20 visits distinct 64 KiB clusters for i < 2^20.
  for (let i = 0; i < FRAG_CLUSTERS; i += 1) writes.push(`write -P ${i % 250} ${((i * 7919) % 1048576) * 64}k ${i % 5 === 0 ? '64k' : '4k'}`);
  await ok('qemu-io', ['-f', 'qcow2', path], `${writes.join('\n')}\nquit\n`);
}

/** 1 GiB raw, half of it data (1 MiB of bytes, then a 1 MiB hole, 512 times). */
async function halfDataRaw(ctx: BenchContext): Promise<void> {
  const path = f(ctx, 'half.raw');
  if (await exists(path)) return;
  await ok('truncate', ['-s', '1G', path]);
  const writes: string[] = [];
  for (let i = 0; i < 512; i += 1) writes.push(`write -P ${(i % 250) + 1} ${i * 2}M 1M`);
  await ok('qemu-io', ['-f', 'raw', path], `${writes.join('\n')}\nquit\n`);
}

/** 8 GiB qcow2 with 20,000 scattered 4 KiB writes (the fragmented convert input). */
async function scatteredImage(ctx: BenchContext): Promise<void> {
  const path = f(ctx, 'scattered.qcow2');
  if (await exists(path)) return;
  await qemuImg(['create', '-q', '-f', 'qcow2', path, '8G']);
  const writes: string[] = [];
  // 131,071 is prime to 2^21 (the 4 KiB blocks of 8 GiB): distinct, scattered offsets.
  for (let i = 0; i < 20_000; i += 1) writes.push(`write -P ${(i % 250) + 1} ${((i * 131_071) % 2_097_152) * 4}k 4k`);
  await ok('qemu-io', ['-f', 'qcow2', path], `${writes.join('\n')}\nquit\n`);
}

/** Allocated bytes of a file (stat %b * 512), for the sparse-output comparison. */
async function allocatedBytes(path: string): Promise<number> {
  return Number((await ok('stat', ['-c', '%b', path])).trim()) * 512;
}

/** Remove the outputs of both tools before each timed run (unlinking is not the convert's cost). */
function removing(...names: string[]) {
  return async (ctx: BenchContext): Promise<void> => {
    for (const name of names) await ok('rm', ['-f', f(ctx, name)]);
  };
}

/** Same JSON, object keys in any order. */
function sameJson(ours: unknown, theirs: unknown): boolean {
  const canonical = (value: unknown): unknown =>
    Array.isArray(value)
      ? value.map(canonical)
      : value !== null && typeof value === 'object'
        ? Object.fromEntries(Object.keys(value).sort().map((key) => [key, canonical((value as Record<string, unknown>)[key])]))
        : value;
  return JSON.stringify(canonical(ours)) === JSON.stringify(canonical(theirs));
}

const clusters = FRAG_CLUSTERS.toLocaleString('en-US');

/**
 * A whole-process convert of `input` with both tools (outputs named after it), checked with
 * qemu-img compare (and check, for a qcow2 output), and with the output's allocated blocks
 * (stat %b) within 5 % of qemu-img's: zero runs stay out as qemu-img leaves them (-S 4k).
 */
function convertCase(spec: { name: string; setup: (ctx: BenchContext) => Promise<void>; input: string; from: 'raw' | 'qcow2'; to: 'raw' | 'qcow2' }): BenchCase {
  const stem = spec.input.replace(/\.[a-z0-9]+$/, '');
  const ours = `${stem}-ours.${spec.to}`;
  const theirs = `${stem}-theirs.${spec.to}`;
  const args = (ctx: BenchContext, output: string): string[] => ['convert', '-f', spec.from, '-O', spec.to, f(ctx, spec.input), f(ctx, output)];
  return {
    name: spec.name,
    setup: spec.setup,
    reset: removing(ours, theirs),
    minRuns: 10,
    statistic: 'median',
    async reference(ctx) {
      await qemuImg(args(ctx, theirs));
    },
    async qlayer(ctx) {
      await qlayer(['image', ...args(ctx, ours)]);
    },
    async verify(ctx) {
      // The timed runs' outputs may be gone (reset runs before each): make both again, untimed.
      await removing(ours, theirs)(ctx);
      await qemuImg(args(ctx, theirs));
      await qlayer(['image', ...args(ctx, ours)]);
      await qemuImg(['compare', '-q', '-f', spec.from, '-F', spec.to, f(ctx, spec.input), f(ctx, ours)]);
      if (spec.to === 'qcow2') await qemuImg(['check', '-q', f(ctx, ours)]);
      const mine = await allocatedBytes(f(ctx, ours));
      const reference = await allocatedBytes(f(ctx, theirs));
      if (reference > 0 && Math.abs(mine - reference) / reference > 0.05) throw new Error(`${spec.to} output allocates ${mine} bytes, qemu-img's ${reference}`);
    },
  };
}

/** The same report from qemu-img and qlayer on the fragmented image, compared by `same`. */
function jsonCase(spec: { name: string; theirs: (path: string) => string[]; ours: (path: string) => string[]; same: (ours: string, theirs: string) => boolean }): BenchCase {
  return {
    name: spec.name,
    setup: fragmentedImage,
    minRuns: 10,
    statistic: 'median',
    async reference(ctx) {
      ctx.state.set('theirs', await qemuImg(spec.theirs(f(ctx, 'frag.qcow2'))));
    },
    async qlayer(ctx) {
      ctx.state.set('ours', await qlayer(spec.ours(f(ctx, 'frag.qcow2'))));
    },
    async verify(ctx) {
      const ours = ctx.state.get('ours') as string;
      const theirs = ctx.state.get('theirs') as string;
      if (!spec.same(ours, theirs)) throw new Error(`${spec.name}: qlayer printed ${ours.slice(0, 400)}, qemu-img ${theirs.slice(0, 400)}`);
    },
  };
}

registerBenchSection({
  name: 'whole process',
  cases: [
    {
      name: "start-up: qlayer --version vs node -e ''",
      minRuns: 20,
      statistic: 'median',
      async reference() {
        await ok(process.execPath, ['-e', '']);
      },
      async qlayer(ctx) {
        ctx.state.set('version', await qlayer(['--version']));
      },
      async verify(ctx) {
        if (!/^\d+\.\d+\.\d+\n$/.test(ctx.state.get('version') as string)) throw new Error(`--version printed ${JSON.stringify(ctx.state.get('version'))}`);
      },
    },
    {
      name: 'qlayer --version vs qemu-img --version',
      minRuns: 20,
      statistic: 'median',
      async reference() {
        await qemuImg(['--version']);
      },
      async qlayer() {
        await qlayer(['--version']);
      },
    },
    {
      name: "start-up: qlayer image info --json (64 MiB image) vs node -e ''",
      setup: smallImage,
      minRuns: 20,
      statistic: 'median',
      async reference() {
        await ok(process.execPath, ['-e', '']);
      },
      async qlayer(ctx) {
        ctx.state.set('info', await qlayer(['image', 'info', '--json', f(ctx, 'small.qcow2')]));
      },
      async verify(ctx) {
        const info = JSON.parse(ctx.state.get('info') as string) as Record<string, unknown>;
        if (info['virtual-size'] !== 64 * 1024 * 1024) throw new Error(`info printed ${ctx.state.get('info') as string}`);
      },
    },
    {
      name: 'image info --json of a small image (64 MiB)',
      setup: smallImage,
      minRuns: 20,
      statistic: 'median',
      async reference(ctx) {
        await qemuImg(['info', '--output=json', f(ctx, 'small.qcow2')]);
      },
      async qlayer(ctx) {
        ctx.state.set('info', await qlayer(['image', 'info', '--json', f(ctx, 'small.qcow2')]));
      },
      async verify(ctx) {
        const ours = JSON.parse(ctx.state.get('info') as string) as Record<string, unknown>;
        const theirs = JSON.parse(await qemuImg(['info', '--output=json', f(ctx, 'small.qcow2')])) as Record<string, unknown>;
        for (const key of ['virtual-size', 'cluster-size', 'format', 'actual-size', 'dirty-flag', 'format-specific']) {
          if (!sameJson(ours[key], theirs[key])) throw new Error(`info ${key}: ours ${JSON.stringify(ours[key])}, qemu-img ${JSON.stringify(theirs[key])}`);
        }
      },
    },
    convertCase({
      name: 'convert 1 GiB raw (half data, holes) -> qcow2',
      setup: halfDataRaw,
      input: 'half.raw',
      from: 'raw',
      to: 'qcow2',
    }),
    convertCase({
      name: 'convert a fragmented 8 GiB qcow2 (20,000 scattered 4 KiB writes) -> raw',
      setup: scatteredImage,
      input: 'scattered.qcow2',
      from: 'qcow2',
      to: 'raw',
    }),
    jsonCase({
      name: `map --json of a fragmented 64 GiB image (${clusters} clusters)`,
      theirs: (path) => ['map', '--output=json', path],
      ours: (path) => ['image', 'map', '--json', path],
      // Byte for byte: qlayer prints qemu-img's exact text.
      same: (ours, theirs) => ours === theirs,
    }),
    jsonCase({
      name: 'check --json of the same image',
      theirs: (path) => ['check', '--output=json', path],
      ours: (path) => ['image', 'check', '--json', path],
      // qemu-img's keys (as bench/qcow2-ops.ts compares them).
      same: (ours, theirs) => {
        const mine = JSON.parse(ours) as Record<string, unknown>;
        const reference = JSON.parse(theirs) as Record<string, unknown>;
        return sameJson(Object.fromEntries(Object.keys(reference).map((key) => [key, mine[key]])), reference);
      },
    }),
  ],
});
