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
import { registerBenchSection, type BenchContext } from './harness.js';

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
    {
      name: 'convert 1 GiB raw (half data, holes) -> qcow2',
      setup: halfDataRaw,
      reset: removing('half-ours.qcow2', 'half-theirs.qcow2'),
      minRuns: 10,
      statistic: 'median',
      async reference(ctx) {
        await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', f(ctx, 'half.raw'), f(ctx, 'half-theirs.qcow2')]);
      },
      async qlayer(ctx) {
        await qlayer(['image', 'convert', '-f', 'raw', '-O', 'qcow2', f(ctx, 'half.raw'), f(ctx, 'half-ours.qcow2')]);
      },
      async verify(ctx) {
        await removing('half-ours.qcow2')(ctx);
        await qlayer(['image', 'convert', '-f', 'raw', '-O', 'qcow2', f(ctx, 'half.raw'), f(ctx, 'half-ours.qcow2')]);
        await qemuImg(['compare', '-q', '-f', 'raw', '-F', 'qcow2', f(ctx, 'half.raw'), f(ctx, 'half-ours.qcow2')]);
        await qemuImg(['check', '-q', f(ctx, 'half-ours.qcow2')]);
      },
    },
    {
      name: 'convert a fragmented 8 GiB qcow2 (20,000 scattered 4 KiB writes) -> raw',
      setup: scatteredImage,
      reset: removing('scattered-ours.raw', 'scattered-theirs.raw'),
      minRuns: 10,
      statistic: 'median',
      async reference(ctx) {
        await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', f(ctx, 'scattered.qcow2'), f(ctx, 'scattered-theirs.raw')]);
      },
      async qlayer(ctx) {
        await qlayer(['image', 'convert', '-f', 'qcow2', '-O', 'raw', f(ctx, 'scattered.qcow2'), f(ctx, 'scattered-ours.raw')]);
      },
      async verify(ctx) {
        // Zero runs stay holes as qemu-img leaves them (-S 4k): allocated blocks within 5 %.
        // The timed runs' outputs may be gone (reset runs before each): make both again, untimed.
        await removing('scattered-ours.raw', 'scattered-theirs.raw')(ctx);
        await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', f(ctx, 'scattered.qcow2'), f(ctx, 'scattered-theirs.raw')]);
        await qlayer(['image', 'convert', '-f', 'qcow2', '-O', 'raw', f(ctx, 'scattered.qcow2'), f(ctx, 'scattered-ours.raw')]);
        const ours = await allocatedBytes(f(ctx, 'scattered-ours.raw'));
        const theirs = await allocatedBytes(f(ctx, 'scattered-theirs.raw'));
        ctx.state.set('allocated', `${ours} vs ${theirs} bytes allocated`);
        await qemuImg(['compare', '-q', '-f', 'qcow2', '-F', 'raw', f(ctx, 'scattered.qcow2'), f(ctx, 'scattered-ours.raw')]);
        if (theirs > 0 && Math.abs(ours - theirs) / theirs > 0.05) throw new Error(`raw output allocates ${ours} bytes, qemu-img's ${theirs}`);
      },
    },
    {
      name: `map --json of a fragmented 64 GiB image (${clusters} clusters)`,
      setup: fragmentedImage,
      minRuns: 10,
      statistic: 'median',
      async reference(ctx) {
        ctx.state.set('theirs', await qemuImg(['map', '--output=json', f(ctx, 'frag.qcow2')]));
      },
      async qlayer(ctx) {
        ctx.state.set('ours', await qlayer(['image', 'map', '--json', f(ctx, 'frag.qcow2')]));
      },
      async verify(ctx) {
        // Byte for byte: qlayer prints qemu-img's exact text.
        if (ctx.state.get('ours') !== ctx.state.get('theirs')) throw new Error('map --json differs from qemu-img map --output=json');
      },
    },
    {
      name: `check --json of the same image`,
      setup: fragmentedImage,
      minRuns: 10,
      statistic: 'median',
      async reference(ctx) {
        ctx.state.set('theirs', await qemuImg(['check', '--output=json', f(ctx, 'frag.qcow2')]));
      },
      async qlayer(ctx) {
        ctx.state.set('ours', await qlayer(['image', 'check', '--json', f(ctx, 'frag.qcow2')]));
      },
      async verify(ctx) {
        const ours = JSON.parse(ctx.state.get('ours') as string) as Record<string, unknown>;
        const theirs = JSON.parse(ctx.state.get('theirs') as string) as Record<string, unknown>;
        // qemu-img's keys (as bench/qcow2-ops.ts compares them).
        const picked = Object.fromEntries(Object.keys(theirs).map((key) => [key, ours[key]]));
        if (!sameJson(picked, theirs)) throw new Error(`check differs: ours ${JSON.stringify(ours)}, qemu-img ${JSON.stringify(theirs)}`);
      },
    },
  ],
});
