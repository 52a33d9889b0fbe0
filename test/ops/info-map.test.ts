/**
 * info and map against qemu-img on images qemu-img built: the JSON must be equal field for
 * field (info, including --backing-chain) and extent for extent (map, merged).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { infoImage } from '../../src/chain/info.js';
import { mapImage } from '../../src/chain/map.js';
import { qemuImg, tempDir } from '../helpers/qemu.js';
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
