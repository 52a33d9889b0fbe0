/**
 * convert, verified by qemu-img: `qemu-img compare` against the source (through its whole
 * chain) must say identical and `qemu-img check` must find the output clean.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { convertImage } from '../../src/chain/convert.js';
import { mapImage } from '../../src/chain/map.js';
import { qemuCheck, qemuCompare, qemuImg, tempDir } from '../helpers/qemu.js';
import { buildFixtures, writeRandomRaw, type Fixture } from './fixtures.js';

let dir: string;
let cleanup: () => Promise<void>;
let fixtures: Fixture[] = [];

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-ops-convert-'));
  fixtures = await buildFixtures(dir);
});
afterAll(async () => cleanup());

async function expectClean(path: string): Promise<void> {
  const report = await qemuCheck(path);
  expect(report.exitCode, path).toBe(0);
  expect(report.leaks + report.corruptions, path).toBe(0);
}

describe('convert', () => {
  it('flattens every fixture (chains included) to raw, qcow2 and compressed qcow2', async () => {
    for (const [i, fixture] of fixtures.entries()) {
      const raw = join(dir, `out-${i}.raw`);
      await convertImage(fixture.path, raw, { outputFormat: 'raw' });
      expect(await qemuCompare(fixture.path, raw, 'qcow2', 'raw'), `${fixture.name} -> raw`).toBe(true);

      const flat = join(dir, `out-${i}.qcow2`);
      await convertImage(fixture.path, flat, { outputFormat: 'qcow2' });
      expect(await qemuCompare(fixture.path, flat, 'qcow2', 'qcow2'), `${fixture.name} -> qcow2`).toBe(true);
      await expectClean(flat);

      const compressed = join(dir, `out-${i}-c.qcow2`);
      await convertImage(fixture.path, compressed, { outputFormat: 'qcow2', compress: true });
      expect(await qemuCompare(fixture.path, compressed, 'qcow2', 'qcow2'), `${fixture.name} -> qcow2 -c`).toBe(true);
      await expectClean(compressed);
    }
  });

  it('converts raw to qcow2 leaving zero clusters unallocated, for several cluster sizes', async () => {
    const raw = join(dir, 'half.raw');
    await writeRandomRaw(raw, 8 * 1024 * 1024, 3);
    // Zero every other MiB (written zeros, not holes).
    const { open } = await import('node:fs/promises');
    const handle = await open(raw, 'r+');
    for (let mib = 1; mib < 8; mib += 2) await handle.write(Buffer.alloc(1024 * 1024), 0, 1024 * 1024, mib * 1024 * 1024);
    await handle.close();
    for (const clusterSize of [4096, 65536, 2 * 1024 * 1024]) {
      const out = join(dir, `half-${clusterSize}.qcow2`);
      const result = await convertImage(raw, out, { sourceFormat: 'raw', outputFormat: 'qcow2', clusterSize });
      expect(await qemuCompare(raw, out, 'raw', 'qcow2')).toBe(true);
      await expectClean(out);
      const info = JSON.parse((await qemuImg(['info', '--output=json', out])).stdout);
      expect(info['cluster-size']).toBe(clusterSize);
      // Only the data half is allocated (with 2 MiB clusters every cluster holds some data).
      const allocated = (await mapImage(out)).filter((e) => e.data).reduce((n, e) => n + e.length, 0);
      expect(allocated).toBe(clusterSize <= 1024 * 1024 ? 4 * 1024 * 1024 : 8 * 1024 * 1024);
      expect(result.outputLength).toBeLessThanOrEqual(allocated + 8 * clusterSize);
    }
  });

  it('handles a size that is not a multiple of the cluster or sector size', async () => {
    const raw = join(dir, 'odd.raw');
    await writeRandomRaw(raw, 300_000, 4);
    const out = join(dir, 'odd.qcow2');
    await convertImage(raw, out, { sourceFormat: 'raw', compress: true });
    expect(await qemuCompare(raw, out, 'raw', 'qcow2')).toBe(true);
    await expectClean(out);
    const back = join(dir, 'odd.back.raw');
    await convertImage(out, back, { outputFormat: 'raw' });
    expect((await stat(back)).size).toBe(300_032); // qcow2 sizes are whole sectors, like qemu-img's
  });

  it('compressed output is smaller for compressible data, and qemu reads it', async () => {
    const src = fixtures.find((f) => f.name === 'v3')!.path;
    const out = join(dir, 'v3-c.qcow2');
    await convertImage(src, out, { compress: true });
    const plain = join(dir, 'v3-plain.qcow2');
    await convertImage(src, plain, {});
    expect((await stat(out)).size).toBeLessThan((await stat(plain)).size);
    expect(JSON.parse((await qemuImg(['check', '--output=json', out])).stdout)['compressed-clusters']).toBeGreaterThan(0);
  });

  it('an empty 1 PiB image converts in about the time of its metadata (unallocated spans skipped whole)', { timeout: 120_000 }, async () => {
    const source = join(dir, 'empty-1p.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', source, '1P']);
    const out = join(dir, 'empty-1p.out.qcow2');
    // Generous: the point is "seconds, not hours" (a 2 MiB window walk is 2^29 windows).
    const started = Date.now();
    const result = await convertImage(source, out, {});
    expect(Date.now() - started).toBeLessThan(60_000);
    expect(result.virtualSize).toBe(2 ** 50);
    expect(result.dataBytes).toBe(0);
    await expectClean(out);
    expect(await qemuCompare(source, out, 'qcow2', 'qcow2')).toBe(true);
  });

  it('data far apart in a huge sparse image lands where it was (the skips stop at data)', { timeout: 120_000 }, async () => {
    const source = join(dir, 'sparse-8t.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', source, '8T']);
    // Data at the start, inside a window, across a window boundary, after 1 TiB and at the very end.
    const { qemuIo } = await import('../helpers/qemu.js');
    await qemuIo(source, ['write -P 1 0 64k', 'write -P 2 3M 8k', 'write -P 3 6207M 4M', 'write -P 4 1100G 1M', 'write -z 2000G 1G', 'write -P 5 8388544M 64M']);
    const out = join(dir, 'sparse-8t.out.qcow2');
    const result = await convertImage(source, out, {});
    expect(result.dataBytes).toBe(64 * 1024 + 64 * 1024 + 4 * 1048576 + 1048576 + 64 * 1048576);
    await expectClean(out);
    expect(await qemuCompare(source, out, 'qcow2', 'qcow2')).toBe(true);
  });
});
