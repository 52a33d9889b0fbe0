/**
 * Benchmark: locate N files (lookup + extents) in a big sparse ext4 filesystem with qlayer's
 * reader, against debugfs doing the same lookups (one process, one command file of
 * `blocks PATH`). The result is verified: every file's block list must match debugfs's.
 * Also reports how many bytes qlayer read, to show that locating files does not read the disk.
 *
 * Use: `measureFsLookups({ files: 10000 })`, or import for the side effect of registering the
 * "fs-lookups" section with the bench harness.
 */
import { execa } from 'execa';
import { mkdir, mkdtemp, open, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { openGuestFilesystem } from '../src/fs/index.js';
import { openDiskImage } from '../src/fs/image.js';
import { registerBenchSection, type BenchContext, type BenchSection } from './harness.js';

export interface LookupFixture {
  image: string;
  paths: string[];
  blockSize: number;
}

/**
 * An ext4 image of `sizeBytes` (sparse) holding `files` small files: 100 per directory, plus
 * one directory holding a tenth of them (an htree), with 1-3 blocks of data each.
 */
export async function buildLookupFixture(dir: string, files: number, sizeBytes = 8 * 1024 ** 3): Promise<LookupFixture> {
  const tree = join(dir, 'tree');
  const paths: string[] = [];
  const big = Math.floor(files / 10);
  await mkdir(join(tree, 'big'), { recursive: true });
  for (let i = 0; i < files; i += 1) {
    const rel = i < big ? `big/f${i}` : `d${Math.floor(i / 100)}/f${i}`;
    if (i >= big && i % 100 === 0) await mkdir(join(tree, `d${Math.floor(i / 100)}`), { recursive: true });
    if (i === big) await mkdir(join(tree, `d${Math.floor(i / 100)}`), { recursive: true });
    await writeFile(join(tree, rel), Buffer.alloc(100 + (i % 3) * 4096, i & 0xff));
    paths.push(`/${rel}`);
  }
  const image = join(dir, 'lookups.img');
  await writeFile(image, '');
  await truncate(image, sizeBytes);
  await execa('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-d', tree, image]);
  await execa('e2fsck', ['-fyD', image], { reject: false }); // index the big directory (htree)
  await rm(tree, { recursive: true, force: true });
  return { image, paths, blockSize: 4096 };
}

export interface LookupResult {
  /** Physical block numbers of each path, in file order. */
  blocks: Map<string, number[]>;
  bytesRead?: number;
}

/** Locate every path with qlayer's reader; `image` (raw or qcow2) defaults to the raw fixture. */
export async function qlayerLookups(fixture: LookupFixture, image = fixture.image): Promise<LookupResult> {
  const disk = await openDiskImage(image);
  try {
    const fs = await openGuestFilesystem(disk.source);
    const blocks = new Map<string, number[]>();
    for (const path of fixture.paths) {
      await fs.lookup(path);
      const list: number[] = [];
      for (const e of await fs.extents(path)) {
        for (let b = 0; b < e.length / fixture.blockSize; b += 1) list.push(e.diskOffset / fixture.blockSize + b);
      }
      blocks.set(path, list);
    }
    return { blocks, bytesRead: fs.readStats.bytesRead };
  } finally {
    await disk.close();
  }
}

export async function debugfsLookups(fixture: LookupFixture): Promise<LookupResult> {
  const input = fixture.paths.map((p) => `blocks ${p}`).join('\n') + '\n';
  const { stdout } = await execa('debugfs', ['-f', '-', fixture.image], { input, maxBuffer: 1024 ** 3 });
  const blocks = new Map<string, number[]>();
  let current: string | undefined;
  for (const line of stdout.split('\n')) {
    const m = /^debugfs: blocks (.*)$/.exec(line);
    if (m) {
      current = m[1];
      blocks.set(current!, []);
    } else if (current !== undefined && line.trim() !== '') {
      blocks.get(current)!.push(...line.trim().split(/\s+/).map(Number));
    }
  }
  return { blocks };
}

export function compareLookups(fixture: LookupFixture, ours: LookupResult, theirs: LookupResult): void {
  for (const path of fixture.paths) {
    const a = ours.blocks.get(path) ?? [];
    const b = theirs.blocks.get(path);
    if (!b || a.join(',') !== b.join(',')) throw new Error(`${path}: qlayer blocks [${a.join(',')}] != debugfs [${b?.join(',')}]`);
  }
}

export interface LookupMeasurement {
  files: number;
  imageBytes: number;
  /** Bytes of the image actually allocated on the host (it is sparse). */
  imageAllocatedBytes: number;
  qlayerMs: number;
  debugfsMs: number;
  qlayerBytesRead: number;
}

/** Build the fixture, time both tools (best of `runs`), verify, clean up. */
export async function measureFsLookups(options: { files?: number; sizeBytes?: number; runs?: number } = {}): Promise<LookupMeasurement> {
  const files = options.files ?? 10_000;
  const dir = await mkdtemp(join(tmpdir(), 'qlayer-bench-fs-'));
  try {
    const fixture = await buildLookupFixture(dir, files, options.sizeBytes);
    let debugfsMs = Infinity;
    let qlayerMs = Infinity;
    let ours: LookupResult | undefined;
    let theirs: LookupResult | undefined;
    for (let i = 0; i < (options.runs ?? 3); i += 1) {
      let t = performance.now();
      theirs = await debugfsLookups(fixture);
      debugfsMs = Math.min(debugfsMs, performance.now() - t);
      t = performance.now();
      ours = await qlayerLookups(fixture);
      qlayerMs = Math.min(qlayerMs, performance.now() - t);
    }
    compareLookups(fixture, ours!, theirs!);
    const handle = await open(fixture.image, 'r');
    const st = await handle.stat();
    await handle.close();
    return { files, imageBytes: st.size, imageAllocatedBytes: st.blocks * 512, qlayerMs, debugfsMs, qlayerBytesRead: ours!.bytesRead ?? 0 };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** The harness section: per N, lookups on the raw image and through a qcow2 image of it. */
export function fsLookupBenchSection(counts: number[] = [1000, 10_000]): BenchSection {
  const cases = counts.flatMap((n) =>
    (['raw', 'qcow2'] as const).map((format) => ({
      name: `locate ${n} files in an 8 GiB ext4, ${format} (reference: debugfs on raw)`,
      async setup(ctx: BenchContext) {
        const sub = join(ctx.dir, `n${n}-${format}`);
        await mkdir(sub, { recursive: true });
        const fixture = await buildLookupFixture(sub, n);
        ctx.state.set('fixture', fixture);
        let image = fixture.image;
        if (format === 'qcow2') {
          image = join(sub, 'lookups.qcow2');
          await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', fixture.image, image]);
        }
        ctx.state.set('image', image);
      },
      async qlayer(ctx: BenchContext) {
        ctx.state.set('ours', await qlayerLookups(ctx.state.get('fixture') as LookupFixture, ctx.state.get('image') as string));
      },
      async reference(ctx: BenchContext) {
        ctx.state.set('theirs', await debugfsLookups(ctx.state.get('fixture') as LookupFixture));
      },
      async verify(ctx: BenchContext) {
        compareLookups(ctx.state.get('fixture') as LookupFixture, ctx.state.get('ours') as LookupResult, ctx.state.get('theirs') as LookupResult);
      },
    })),
  );
  return { name: 'fs-lookups', cases };
}

registerBenchSection(fsLookupBenchSection());
