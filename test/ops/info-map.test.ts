/**
 * info and map against qemu-img on images qemu-img built: the JSON must be equal field for
 * field (info, including --backing-chain) and extent for extent (map, merged).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { infoImage } from '../../src/chain/info.js';
import { join } from 'node:path';
import { execa } from 'execa';
import { mapImage } from '../../src/chain/map.js';
import { mapImageJson } from '../../src/chain/map-json.js';
import { qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { buildFixtures, type Fixture } from './fixtures.js';

let dir: string;
let cleanup: () => Promise<void>;
let fixtures: Fixture[] = [];

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-ops-info-'));
  fixtures = await buildFixtures(dir);
});
afterAll(async () => cleanup());

describe('info matches qemu-img info --output=json', () => {
  it('for every fixture, alone and with --backing-chain', async () => {
    expect(fixtures.length).toBeGreaterThan(10);
    for (const fixture of fixtures) {
      const theirs = JSON.parse((await qemuImg(['info', '--output=json', fixture.path])).stdout);
      const [ours] = await infoImage(fixture.path);
      expect(ours, fixture.name).toEqual(theirs);
      const theirChain = JSON.parse((await qemuImg(['info', '--output=json', '--backing-chain', fixture.path])).stdout);
      expect(await infoImage(fixture.path, { backingChain: true }), fixture.name).toEqual(theirChain);
    }
  });

  it('names snapshots, bitmaps, data file and chain formats like qemu-img', async () => {
    const snap = (await infoImage(fixtures.find((f) => f.name === 'snapshots')!.path))[0]!;
    expect(snap.snapshots?.map((s) => s.name)).toEqual(['first', 'second']);
    const chain = await infoImage(fixtures.find((f) => f.name === 'chain depth 3 over raw')!.path, { backingChain: true });
    expect(chain.map((i) => i.format)).toEqual(['qcow2', 'qcow2', 'qcow2', 'raw']);
  });
});

describe('map matches qemu-img map --output=json', () => {
  it('for every fixture (merged extents, depth, present/zero/data, offsets)', async () => {
    let compared = 0;
    for (const fixture of fixtures) {
      const theirs = JSON.parse((await qemuImg(['map', '--output=json', fixture.path])).stdout);
      expect(await mapImage(fixture.path), fixture.name).toEqual(theirs);
      compared += 1;
    }
    expect(compared).toBeGreaterThan(10);
  });

  it('maps a raw file whose size is not a whole number of sectors like qemu-img (last sector zero)', async () => {
    const { writeRandomRaw } = await import('./fixtures.js');
    const path = `${dir}/odd.raw`;
    await writeRandomRaw(path, 300_000, 11);
    const theirs = JSON.parse((await qemuImg(['map', '-f', 'raw', '--output=json', path])).stdout);
    expect(await mapImage(path, { format: 'raw' })).toEqual(theirs);
    const info = JSON.parse((await qemuImg(['info', '-f', 'raw', '--output=json', path])).stdout);
    expect((await infoImage(path, { format: 'raw' }))[0]).toEqual(info);
  });

  it('maps a window with --start-offset/--max-length like qemu-img', async () => {
    const path = fixtures.find((f) => f.name === 'chain depth 3 over raw')!.path;
    const theirs = JSON.parse((await qemuImg(['map', '--output=json', '--start-offset=1000000', '--max-length=3000000', path])).stdout);
    expect(await mapImage(path, { start: 1000000, length: 3000000 })).toEqual(theirs);
  });
});

describe('map --json is qemu-img map --output=json byte for byte', () => {
  const collect = async (path: string, options: Parameters<typeof mapImageJson>[1] = {}): Promise<string> => {
    const chunks: Buffer[] = [];
    // Copies: a writer that returns nothing gets a fresh buffer per chunk, but say so explicitly.
    await mapImageJson(path, options, (chunk) => void chunks.push(Buffer.from(chunk)));
    return Buffer.concat(chunks).toString('latin1');
  };
  const raw = async (command: string, args: string[]): Promise<string> =>
    (await execa(command, args, { stripFinalNewline: false, encoding: 'latin1', timeout: 120_000 })).stdout as string;

  it('for every fixture, and for a window and an empty range', async () => {
    for (const fixture of fixtures) {
      expect(await collect(fixture.path), fixture.name).toBe(await raw('qemu-img', ['map', '--output=json', fixture.path]));
    }
    const path = fixtures.find((f) => f.name === 'chain depth 3 over raw')!.path;
    expect(await collect(path, { start: 1000000, length: 3000000 })).toBe(await raw('qemu-img', ['map', '--output=json', '--start-offset=1000000', '--max-length=3000000', path]));
    // Past the end: one row of length 0 at the start, as qemu-img prints it.
    expect(await collect(path, { start: 2 ** 40 })).toBe(await raw('qemu-img', ['map', '--output=json', `--start-offset=${2 ** 40}`, path]));
  });

  it('through the CLI, for a fragmented image whose map is several megabytes (buffers written and reused)', async () => {
    const path = join(dir, 'fragmented.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', path, '8G']);
    // 12,000 clusters in scattered guest order (7919 is odd, so the clusters are distinct).
    const writes = Array.from({ length: 12_000 }, (_, i) => `write -P ${i % 250} ${((i * 7919) % 131072) * 64}k 4k`);
    await qemuIo(path, writes);
    const theirs = await raw('qemu-img', ['map', '--output=json', path]);
    expect(theirs.length).toBeGreaterThan(2 * 1024 * 1024);
    const cli = join(import.meta.dirname, '..', '..', 'bin', 'qlayer.js');
    expect(await raw('node', [cli, 'image', 'map', '--json', path])).toBe(theirs);
    expect(await collect(path)).toBe(theirs);
  }, 300_000);
});
