/**
 * convert's sparse output (-S, qemu-img's default 4 KiB): the output's allocated blocks must be
 * within 5 % of qemu-img's on the same input, and qemu-img compare must say equal. The file
 * system's allocation (stat %b) is the measure, as a user's `du` would see it.
 */
import { stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { convertImage } from '../../src/chain/convert.js';
import { qemuCheck, qemuCompare, qemuCreate, qemuImg, seededRandom, tempDir } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

let dir: string;
let cleanup: () => Promise<void>;
let fragmented: string;
let zeroRuns: string;

/** Allocated bytes of a file (st_blocks is in 512-byte units on Linux). */
async function allocated(path: string): Promise<number> {
  return (await stat(path)).blocks * 512;
}

function expectWithin5Percent(ours: number, theirs: number, what: string): void {
  expect(Math.abs(ours - theirs), `${what}: ours ${ours}, qemu-img ${theirs}`).toBeLessThanOrEqual(theirs * 0.05);
}

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-sparse-output-'));
  // An 8 GiB qcow2 with 20,000 scattered 4 KiB writes: each lands in a 64 KiB cluster whose
  // other 60 KiB read as zeros, which a 4 KiB-sparse raw output must leave as holes.
  fragmented = join(dir, 'fragmented.qcow2');
  await qemuCreate(fragmented, '8G');
  const random = seededRandom(14);
  const commands: string[] = [];
  for (let i = 0; i < 20_000; i += 1) commands.push(`write -q -P ${1 + (i % 250)} ${Math.floor(random() * (8 * GiB / 4096)) * 4096} 4k`);
  await execa('qemu-io', ['-f', 'qcow2', fragmented], { input: `${commands.join('\n')}\nquit\n`, timeout: 300_000 });

  // A raw file with zeros written (not holes) between data runs of several sizes.
  zeroRuns = join(dir, 'zero-runs.raw');
  const size = 64 * MiB;
  const data = Buffer.alloc(size);
  const fill = seededRandom(3);
  for (let at = 0, k = 0; at < size; k += 1) {
    const length = [4 * KiB, 12 * KiB, 64 * KiB, 100 * KiB, 1 * MiB][k % 5]!;
    for (let i = at; i < Math.min(size, at + length); i += 1) data[i] = 1 + Math.floor(fill() * 255);
    at += length + [8 * KiB, 64 * KiB, 200 * KiB, 2 * MiB, 3 * KiB][k % 5]!;
  }
  await writeFile(zeroRuns, data);
}, 600_000);
afterAll(async () => cleanup());

describe('convert sparse output', () => {
  it('fragmented 8 GiB qcow2 -> raw: allocated blocks within 5 % of qemu-img', async () => {
    const ours = join(dir, 'frag-ours.raw');
    const theirs = join(dir, 'frag-qemu.raw');
    await convertImage(fragmented, ours, { outputFormat: 'raw' });
    await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', fragmented, theirs]);
    const [a, b] = [await allocated(ours), await allocated(theirs)];
    console.log(`fragmented -> raw: allocated ours ${a} bytes, qemu-img ${b} bytes`);
    expectWithin5Percent(a, b, 'fragmented -> raw');
    expect(await qemuCompare(fragmented, ours, 'qcow2', 'raw')).toBe(true);
  }, 300_000);

  it('raw with zero runs -> qcow2 and -> raw: allocated blocks within 5 % of qemu-img', async () => {
    for (const format of ['qcow2', 'raw'] as const) {
      const ours = join(dir, `zr-ours.${format}`);
      const theirs = join(dir, `zr-qemu.${format}`);
      await convertImage(zeroRuns, ours, { sourceFormat: 'raw', outputFormat: format });
      await qemuImg(['convert', '-f', 'raw', '-O', format, zeroRuns, theirs]);
      const [a, b] = [await allocated(ours), await allocated(theirs)];
      console.log(`zero runs -> ${format}: allocated ours ${a} bytes, qemu-img ${b} bytes`);
      expectWithin5Percent(a, b, `zero runs -> ${format}`);
      expect(await qemuCompare(zeroRuns, ours, 'raw', format)).toBe(true);
      if (format === 'qcow2') expect((await qemuCheck(ours)).exitCode).toBe(0);
    }
  });

  it('-S 0 writes everything and -S 64k leaves out only 64 KiB runs, like qemu-img', async () => {
    for (const sparse of [0, 64 * KiB]) {
      for (const format of ['qcow2', 'raw'] as const) {
        const ours = join(dir, `s${sparse}-ours.${format}`);
        const theirs = join(dir, `s${sparse}-qemu.${format}`);
        await convertImage(zeroRuns, ours, { sourceFormat: 'raw', outputFormat: format, sparseSize: sparse });
        await qemuImg(['convert', '-S', String(sparse), '-f', 'raw', '-O', format, zeroRuns, theirs]);
        const [a, b] = [await allocated(ours), await allocated(theirs)];
        console.log(`zero runs -S ${sparse} -> ${format}: allocated ours ${a} bytes, qemu-img ${b} bytes`);
        expectWithin5Percent(a, b, `-S ${sparse} -> ${format}`);
        expect(await qemuCompare(zeroRuns, ours, 'raw', format)).toBe(true);
      }
    }
  });

  it('refuses a -S that is not a multiple of 512, writing nothing', async () => {
    const out = join(dir, 'bad-S.raw');
    await expect(convertImage(zeroRuns, out, { sourceFormat: 'raw', outputFormat: 'raw', sparseSize: 1000 })).rejects.toThrow(/multiples of 512/);
    await expect(stat(out)).rejects.toThrow(/ENOENT/);
  });
});
