/**
 * Benchmark section "qcow2": the engine's image operations against qemu-img doing the same job.
 * qlayer runs in-process (the engine API the layers code calls); qemu-img runs as the command a
 * user would type. Inputs are built with qemu-img/qemu-io in the section's temp folder.
 */
import { open, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { execa } from 'execa';
import { convertImage } from '../src/chain/convert.js';
import { mapImage } from '../src/chain/map.js';
import { toQemuJson } from '../src/qcow2/check.js';
import { createImage } from '../src/qcow2/create.js';
import { checkImage } from '../src/qcow2/repair.js';
import { registerBenchSection, type BenchContext } from './harness.js';

const MiB = 1024 * 1024;
/** The launcher a user runs (this file is compiled to dist/bench/). */
const QLAYER_BIN = join(import.meta.dirname, '..', '..', 'bin', 'qlayer.js');
const GiB = 1024 * MiB;

async function qemuImg(args: string[]): Promise<string> {
  const result = await execa('qemu-img', args, { reject: false, maxBuffer: 1024 * MiB });
  if (result.exitCode !== 0) throw new Error(`qemu-img ${args.join(' ')} exited ${result.exitCode}: ${result.stderr}`);
  return result.stdout;
}

/** qemu-io reading its commands from stdin (thousands of writes without a huge argv). */
async function qemuIoScript(image: string, commands: string[]): Promise<void> {
  const result = await execa('qemu-io', ['-f', 'qcow2', image], { input: `${commands.join('\n')}\nquit\n`, reject: false, maxBuffer: 256 * MiB });
  if (result.exitCode !== 0 || /failed/i.test(result.stdout)) throw new Error(`qemu-io failed: ${result.stderr || result.stdout.slice(0, 500)}`);
}

async function compare(a: string, fa: string, b: string, fb: string): Promise<void> {
  const result = await execa('qemu-img', ['compare', '-f', fa, '-F', fb, a, b], { reject: false });
  if (result.exitCode !== 0) throw new Error(`qemu-img compare ${a} ${b}: ${result.stdout || result.stderr}`);
}

async function checkClean(path: string): Promise<void> {
  const result = await execa('qemu-img', ['check', '--output=json', path], { reject: false });
  if (result.exitCode !== 0) throw new Error(`qemu-img check ${path} exited ${result.exitCode}: ${result.stdout}`);
}

/**
 * Random data at every other MiB; between them holes (sparse, what dd and qemu-img leave) or,
 * with `writeZeros`, zeros really written (a file copied without sparse detection).
 */
async function halfDataRaw(path: string, size: number, writeZeros = false): Promise<void> {
  const handle = await open(path, 'w');
  try {
    await handle.truncate(size);
    const chunk = randomBytes(MiB);
    const zeros = Buffer.alloc(MiB);
    for (let at = 0; at < size; at += 2 * MiB) {
      chunk.writeUInt32LE(at / MiB, 0); // every MiB distinct
      await handle.write(chunk, 0, MiB, at);
      if (writeZeros) await handle.write(zeros, 0, MiB, at + MiB);
    }
  } finally {
    await handle.close();
  }
}

const f = (ctx: BenchContext, name: string) => join(ctx.dir, name);

/** A case's untimed reset: both tools' previous outputs go before each run (unlinking is not converting). */
function removeOutputs(...names: string[]): (ctx: BenchContext) => Promise<void> {
  return async (ctx) => {
    for (const name of names) await rm(f(ctx, name), { force: true });
  };
}

/** A 64 GiB image with 20k clusters written in scattered order (host order != guest order); built once per section. */
async function fragmentedImage(ctx: BenchContext): Promise<void> {
  const path = f(ctx, 'frag.qcow2');
  if (await stat(path).then(() => true, () => false)) return;
  await qemuImg(['create', '-q', '-f', 'qcow2', path, '64G']);
  const writes: string[] = [];
  for (let i = 0; i < 20000; i += 1) writes.push(`write -P ${i % 250} ${((i * 7919) % 1048576) * 64}k ${i % 5 === 0 ? '64k' : '4k'}`);
  await qemuIoScript(path, writes);
}

registerBenchSection({
  name: 'qcow2',
  cases: [
    {
      name: 'convert 1 GiB raw (half data, holes) -> qcow2',
      async setup(ctx) {
        await halfDataRaw(f(ctx, 'half.raw'), GiB);
      },
      reset: removeOutputs('ref.qcow2', 'ours.qcow2'),
      async reference(ctx) {
        await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', f(ctx, 'half.raw'), f(ctx, 'ref.qcow2')]);
      },
      async qlayer(ctx) {
        await convertImage(f(ctx, 'half.raw'), f(ctx, 'ours.qcow2'), { sourceFormat: 'raw', outputFormat: 'qcow2' });
      },
      async verify(ctx) {
        await compare(f(ctx, 'half.raw'), 'raw', f(ctx, 'ours.qcow2'), 'qcow2');
        await checkClean(f(ctx, 'ours.qcow2'));
        for (const name of ['half.raw', 'ref.qcow2', 'ours.qcow2']) await rm(f(ctx, name), { force: true });
      },
    },
    {
      // Same data, no holes: qemu-img cannot skip anything with SEEK_DATA either.
      name: 'convert 1 GiB raw (half data, zeros written) -> qcow2',
      async setup(ctx) {
        await halfDataRaw(f(ctx, 'half-dense.raw'), GiB, true);
      },
      reset: removeOutputs('ref-dense.qcow2', 'ours-dense.qcow2'),
      async reference(ctx) {
        await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', f(ctx, 'half-dense.raw'), f(ctx, 'ref-dense.qcow2')]);
      },
      async qlayer(ctx) {
        await convertImage(f(ctx, 'half-dense.raw'), f(ctx, 'ours-dense.qcow2'), { sourceFormat: 'raw', outputFormat: 'qcow2' });
      },
      async verify(ctx) {
        await compare(f(ctx, 'half-dense.raw'), 'raw', f(ctx, 'ours-dense.qcow2'), 'qcow2');
        await checkClean(f(ctx, 'ours-dense.qcow2'));
        for (const name of ['half-dense.raw', 'ref-dense.qcow2', 'ours-dense.qcow2']) await rm(f(ctx, name), { force: true });
      },
    },
    {
      name: 'convert 128 MiB text-like raw -> compressed qcow2 (-c)',
      async setup(ctx) {
        // base64 of random bytes: compressible to about 3/4, like text and binaries.
        await writeFile(f(ctx, 'text.raw'), randomBytes(96 * MiB).toString('base64'));
      },
      reset: removeOutputs('ref-c.qcow2', 'ours-c.qcow2'),
      async reference(ctx) {
        await qemuImg(['convert', '-c', '-f', 'raw', '-O', 'qcow2', f(ctx, 'text.raw'), f(ctx, 'ref-c.qcow2')]);
      },
      async qlayer(ctx) {
        await convertImage(f(ctx, 'text.raw'), f(ctx, 'ours-c.qcow2'), { sourceFormat: 'raw', compress: true });
      },
      async verify(ctx) {
        await compare(f(ctx, 'text.raw'), 'raw', f(ctx, 'ours-c.qcow2'), 'qcow2');
        await checkClean(f(ctx, 'ours-c.qcow2'));
        for (const name of ['text.raw', 'ref-c.qcow2', 'ours-c.qcow2']) await rm(f(ctx, name), { force: true });
      },
    },
    {
      name: 'convert depth-3 chain (1 GiB) -> raw',
      async setup(ctx) {
        await halfDataRaw(f(ctx, 'base.raw'), GiB);
        await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', f(ctx, 'base.raw'), f(ctx, 'base.qcow2')]);
        await rm(f(ctx, 'base.raw'));
        await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', f(ctx, 'mid.qcow2')]);
        const mid: string[] = [];
        for (let i = 0; i < 2000; i += 1) mid.push(`write -P ${i % 250} ${((i * 7919) % 16384) * 64}k 64k`);
        await qemuIoScript(f(ctx, 'mid.qcow2'), mid);
        await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', f(ctx, 'top.qcow2')]);
        const top: string[] = [];
        for (let i = 0; i < 2000; i += 1) top.push(`write -P ${(i + 7) % 250} ${((i * 104729) % 65536) * 16}k 4k`);
        await qemuIoScript(f(ctx, 'top.qcow2'), top);
      },
      reset: removeOutputs('ref.raw', 'ours.raw'),
      async reference(ctx) {
        await qemuImg(['convert', '-O', 'raw', f(ctx, 'top.qcow2'), f(ctx, 'ref.raw')]);
      },
      async qlayer(ctx) {
        await convertImage(f(ctx, 'top.qcow2'), f(ctx, 'ours.raw'), { outputFormat: 'raw' });
      },
      async verify(ctx) {
        await compare(f(ctx, 'top.qcow2'), 'qcow2', f(ctx, 'ours.raw'), 'raw');
        for (const name of ['ref.raw', 'ours.raw']) await rm(f(ctx, name), { force: true });
      },
    },
    {
      name: 'map a fragmented 64 GiB image (20k clusters)',
      setup: fragmentedImage,
      async reference(ctx) {
        await qemuImg(['map', '--output=json', f(ctx, 'frag.qcow2')]);
      },
      async qlayer(ctx) {
        ctx.state.set('map', await mapImage(f(ctx, 'frag.qcow2')));
      },
      async verify(ctx) {
        const theirs = JSON.parse(await qemuImg(['map', '--output=json', f(ctx, 'frag.qcow2')]));
        if (JSON.stringify(ctx.state.get('map')) !== JSON.stringify(theirs)) throw new Error('map differs from qemu-img map');
      },
    },
    {
      name: 'check the same fragmented image',
      setup: fragmentedImage,
      async reference(ctx) {
        await qemuImg(['check', '--output=json', f(ctx, 'frag.qcow2')]);
      },
      async qlayer(ctx) {
        ctx.state.set('check', toQemuJson(await checkImage(f(ctx, 'frag.qcow2'))));
      },
      async verify(ctx) {
        const theirs = JSON.parse(await qemuImg(['check', '--output=json', f(ctx, 'frag.qcow2')]));
        if (JSON.stringify(ctx.state.get('check'), Object.keys(theirs).sort()) !== JSON.stringify(theirs, Object.keys(theirs).sort())) {
          throw new Error(`check differs: ours ${JSON.stringify(ctx.state.get('check'))} theirs ${JSON.stringify(theirs)}`);
        }
      },
    },
    {
      name: 'create an overlay on a 64 GiB image',
      setup: fragmentedImage,
      async reference(ctx) {
        await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'frag.qcow2', '-F', 'qcow2', f(ctx, 'ref-overlay.qcow2')]);
      },
      async qlayer(ctx) {
        await createImage({ path: f(ctx, 'overlay.qcow2'), backing: { path: 'frag.qcow2', format: 'qcow2' }, exclusive: false });
      },
      async verify(ctx) {
        await checkClean(f(ctx, 'overlay.qcow2'));
        await compare(f(ctx, 'overlay.qcow2'), 'qcow2', f(ctx, 'ref-overlay.qcow2'), 'qcow2');
      },
    },
    {
      // The rows above time the engine in-process; this one times what a user types, process
      // start-up included, where Node's start-up is most of qlayer's time.
      name: 'CLI: image info --json of the same image (process start-up included)',
      setup: fragmentedImage,
      async reference(ctx) {
        await qemuImg(['info', '--output=json', f(ctx, 'frag.qcow2')]);
      },
      async qlayer(ctx) {
        const result = await execa(process.execPath, [QLAYER_BIN, 'image', 'info', '--json', f(ctx, 'frag.qcow2')], { reject: false });
        if (result.exitCode !== 0) throw new Error(`qlayer image info exited ${result.exitCode}: ${result.stderr}`);
        ctx.state.set('info', JSON.parse(result.stdout));
      },
      async verify(ctx) {
        const ours = ctx.state.get('info') as Record<string, unknown>;
        const theirs = JSON.parse(await qemuImg(['info', '--output=json', f(ctx, 'frag.qcow2')])) as Record<string, unknown>;
        for (const key of ['virtual-size', 'cluster-size', 'format', 'dirty-flag']) {
          if (JSON.stringify(ours[key]) !== JSON.stringify(theirs[key])) throw new Error(`info ${key}: ours ${JSON.stringify(ours[key])}, qemu-img ${JSON.stringify(theirs[key])}`);
        }
      },
    },
  ],
});
