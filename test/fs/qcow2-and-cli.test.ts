/**
 * The reader over qcow2 backing chains (openChain), where a file's blocks live in different
 * layers, and the `qlayer fs` CLI on raw and qcow2 images. Oracle: debugfs on the equivalent
 * raw image, and qemu-img map for which layer holds what.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execa } from 'execa';
import { copyFile, open, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuCompare, qemuCreate, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { openChain } from '../../src/chain/index.js';
import { openGuestFilesystem } from '../../src/fs/index.js';
import { debugfs, debugfsOne, makeTree, mkfs, oracleDump, oracleExtents, oracleLs, patternBytes } from './e2fs.js';

let dir: string;
let cleanup: () => Promise<void>;
/** raw1 -> raw2 -> raw3: each a copy of the last with more debugfs writes. */
let raw3: string;
let top: string;

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-fs-qcow2-'));
  const tree = join(dir, 'tree');
  await makeTree(tree, { 'etc/hostname': 'guest\n', grow: patternBytes(100 * 1024, 1), 'keep.bin': patternBytes(50_000, 2), link: { symlink: '/etc/hostname' } });
  const raw1 = join(dir, 'raw1.img');
  await mkfs(raw1, { size: 64 * 1024 * 1024, blockSize: 4096, from: tree });
  // Layer 2: a new file, and blocks 10..14 of /grow overwritten in place (as a guest rewriting
  // part of a file does), so /grow's blocks end up split between base and mid. Layer 3:
  // another new file and a directory.
  const raw2 = join(dir, 'raw2.img');
  await copyFile(raw1, raw2);
  const longer = join(dir, 'longer.bin');
  await writeFile(longer, Buffer.concat([patternBytes(100 * 1024, 1), patternBytes(400 * 1024, 3)]));
  await debugfs(raw2, [`write ${longer} /second`], true);
  const growBlocks = (await debugfsOne(raw2, 'blocks /grow')).trim().split(/\s+/).map(Number);
  const handle = await open(raw2, 'r+');
  for (let i = 10; i < 15; i += 1) await handle.write(patternBytes(4096, 100 + i), 0, 4096, growBlocks[i]! * 4096);
  await handle.close();
  raw3 = join(dir, 'raw3.img');
  await copyFile(raw2, raw3);
  const third = join(dir, 'third.bin');
  await writeFile(third, patternBytes(70_000, 4));
  await debugfs(raw3, ['mkdir /new', `write ${third} /new/third`], true);

  const base = join(dir, 'base.qcow2');
  const mid = join(dir, 'mid.qcow2');
  top = join(dir, 'top.qcow2');
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', raw1, base]);
  await qemuCreate(mid, '', { cluster_size: 4096 }, { backing: 'base.qcow2' });
  await writeDifference(raw1, raw2, mid);
  await qemuCreate(top, '', { cluster_size: 16384 }, { backing: 'mid.qcow2' });
  await writeDifference(raw2, raw3, top);
});
/**
 * Write into `overlay` (through qemu-io, as a guest would) only the 4 KiB blocks where `next`
 * differs from `previous`, so each layer holds just what changed.
 */
async function writeDifference(previous: string, next: string, overlay: string): Promise<void> {
  const [a, b] = [await readFile(previous), await readFile(next)];
  const commands: string[] = [];
  for (let at = 0; at < b.length; ) {
    if (a.subarray(at, at + 4096).equals(b.subarray(at, at + 4096))) {
      at += 4096;
      continue;
    }
    let end = at + 4096;
    while (end < b.length && !a.subarray(end, end + 4096).equals(b.subarray(end, end + 4096))) end += 4096;
    const piece = join(dir, `piece-${commands.length}.bin`);
    await writeFile(piece, b.subarray(at, end));
    commands.push(`write -q -s ${piece} ${at} ${end - at}`);
    at = end;
  }
  expect(commands.length).toBeGreaterThan(0);
  await qemuIo(overlay, commands);
}

afterAll(async () => {
  await cleanup();
});

describe('qcow2 chains', () => {
  it('reads a three-layer chain exactly like the equivalent raw image', async () => {
    const chain = await openChain(top);
    try {
      expect(chain.layers.length).toBe(3);
      expect(await qemuCompare(top, raw3)).toBe(true); // the chain is the raw image the oracle reads
      const fs = await openGuestFilesystem(chain);
      for (const path of ['/grow', '/second', '/keep.bin', '/etc/hostname', '/new/third']) {
        expect(await fs.extents(path)).toEqual(await oracleExtents(raw3, path, 4096));
        expect((await fs.readFile(path)).equals(await oracleDump(raw3, path, dir))).toBe(true);
      }
      for (const path of ['/', '/etc', '/new']) {
        expect((await fs.readdir(path)).map(({ name, inode }) => ({ name, inode }))).toEqual(await oracleLs(raw3, path));
      }
      expect((await fs.readFile('/link')).toString()).toBe('guest\n');

      // /grow's blocks really live in more than one layer (qemu-img map depth per range).
      const map = JSON.parse((await qemuImg(['map', '--output=json', top])).stdout) as Array<{ start: number; length: number; depth: number; data: boolean }>;
      const depths = new Set<number>();
      for (const extent of await fs.extents('/grow')) {
        for (const m of map) {
          if (m.data && m.start < extent.diskOffset + extent.length && extent.diskOffset < m.start + m.length) depths.add(m.depth);
        }
      }
      expect(depths.size).toBeGreaterThan(1);
      const grow = await fs.readFile('/grow');
      expect(grow.subarray(10 * 4096, 11 * 4096).equals(patternBytes(4096, 110))).toBe(true);
      expect(grow.subarray(0, 10 * 4096).equals(patternBytes(100 * 1024, 1).subarray(0, 10 * 4096))).toBe(true);
    } finally {
      await chain.close();
    }
  });
});

/** The CLI as a user runs it (bin/qlayer.js on the build in dist/), stdout as bytes. */
async function runCli(args: string[]): Promise<{ code: number; stdout: Buffer; stderr: string }> {
  const result = await execa(process.execPath, ['bin/qlayer.js', ...args], { reject: false, encoding: 'buffer', stripFinalNewline: false, env: { QLAYER_CONFIG: '/dev/null' } });
  return { code: result.exitCode ?? -1, stdout: Buffer.from(result.stdout), stderr: Buffer.from(result.stderr).toString() };
}

describe('qlayer fs CLI', () => {
  it('extents --json prints exactly [{fileOffset, diskOffset, length, unwritten}] on raw and qcow2', async () => {
    for (const image of [raw3, top]) {
      const { code, stdout } = await runCli(['fs', 'extents', image, '/grow', '--json']);
      expect(code).toBe(0);
      const parsed = JSON.parse(stdout.toString()) as unknown[];
      expect(parsed).toEqual(await oracleExtents(raw3, '/grow', 4096));
      for (const e of parsed) expect(Object.keys(e as object)).toEqual(['fileOffset', 'diskOffset', 'length', 'unwritten']);
    }
  });

  it('cat writes the file bytes; ls and stat answer in text and JSON', async () => {
    const cat = await runCli(['fs', 'cat', top, '/second']);
    expect(cat.code).toBe(0);
    expect(cat.stdout.equals(await oracleDump(raw3, '/second', dir))).toBe(true);
    const catJson = await runCli(['fs', 'cat', top, '/etc/hostname', '--json']);
    expect(Buffer.from(JSON.parse(catJson.stdout.toString()).base64, 'base64').toString()).toBe('guest\n');

    const ls = await runCli(['fs', 'ls', top, '/', '--json']);
    const entries = JSON.parse(ls.stdout.toString()) as Array<{ name: string; inode: number; type: string; size: number }>;
    expect(entries.map(({ name, inode }) => ({ name, inode }))).toEqual(await oracleLs(raw3, '/'));
    expect(entries.find((e) => e.name === 'second')).toMatchObject({ type: 'file', size: 500 * 1024 });
    const lsText = await runCli(['fs', 'ls', raw3, '/new']);
    expect(lsText.stdout.toString().split('\n').filter(Boolean)).toEqual(['.', '..', 'third']);

    const stat = await runCli(['fs', 'stat', top, '/link', '--json']);
    expect(JSON.parse(stat.stdout.toString())).toMatchObject({ type: 'symlink', target: '/etc/hostname', inline: true, extents: [] });
    const statText = await runCli(['fs', 'stat', raw3, '/new/third']);
    expect(statText.stdout.toString()).toMatch(/size:\s+70000/);

    const parts = await runCli(['fs', 'partitions', top, '--json']);
    expect(JSON.parse(parts.stdout.toString())).toEqual([{ index: 0, offset: 0, length: 64 * 1024 * 1024, type: 'none', scheme: 'none', linux: true }]);
  });

  it('a GPT-partitioned qcow2: the Linux partition is found and offsets include its start', async () => {
    const MiB = 1024 * 1024;
    const raw = join(dir, 'gpt.img');
    await writeFile(raw, '');
    await execa('truncate', ['-s', `${48 * MiB}`, raw]);
    await execa('sgdisk', ['-n', '1:2048:+4M', '-t', '1:ef00', '-n', '2:0:+32M', '-t', '2:8300', raw]);
    const start = 2048 * 512 + 4 * MiB;
    const tree = join(dir, 'gpt-tree');
    await makeTree(tree, { 'app/lib.so': patternBytes(123_456, 7) });
    await mkfs(raw, { size: 48 * MiB, blockSize: 4096, from: tree, offset: start, fsBytes: 32 * MiB });
    const part = join(dir, 'gpt-part.img');
    await execa('dd', [`if=${raw}`, `of=${part}`, 'bs=1M', `skip=${start / MiB}`, 'count=32', 'status=none']);
    const qcow = join(dir, 'gpt.qcow2');
    await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow]);
    const { code, stdout } = await runCli(['fs', 'extents', qcow, '/app/lib.so', '--json']);
    expect(code).toBe(0);
    const extents = JSON.parse(stdout.toString()) as Array<{ diskOffset: number; length: number }>;
    expect(extents).toEqual(await oracleExtents(part, '/app/lib.so', 4096, start));
    // Those virtual-disk offsets hold the file's bytes.
    const disk = await readFile(raw);
    expect(Buffer.concat(extents.map((e) => disk.subarray(e.diskOffset, e.diskOffset + e.length))).subarray(0, 123_456).equals(patternBytes(123_456, 7))).toBe(true);
    const stat = await runCli(['fs', 'stat', qcow, '/app/lib.so', '--json']);
    expect(JSON.parse(stat.stdout.toString()).partition).toMatchObject({ index: 2, scheme: 'gpt', offset: start });
    const cat = await runCli(['fs', 'cat', qcow, '/app/lib.so', '--partition', '2']);
    expect(cat.stdout.equals(patternBytes(123_456, 7))).toBe(true);
  });

  it('errors are one line with a stable code, in --json too', async () => {
    const missing = await runCli(['fs', 'stat', top, '/nope', '--json']);
    expect(missing.code).toBe(1);
    expect(JSON.parse(missing.stdout.toString())).toEqual({ error: { code: 'fs.not-found', message: '/nope does not exist' } });
    const notDir = await runCli(['fs', 'ls', raw3, '/grow']);
    expect(notDir.code).toBe(1);
    expect(notDir.stderr).toBe('qlayer: /grow is not a directory\n');
    const badPart = await runCli(['fs', 'ls', raw3, '/', '--partition', '3']);
    expect(badPart.stderr).toMatch(/partition 3 does not exist/);
  });
});
