/**
 * The new `qlayer image` subcommands as a user runs them (bin/qlayer.js after `npm run build`):
 * compare's exit codes 0/1/2, measure's --output=json, snapshot -l, convert -S, and the --json
 * error shape, each against qemu-img on the same files.
 */
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qemuCreate, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';
import { qlayerImage } from './image-cli.js';

let dir: string;
let cleanup: () => Promise<void>;
const p = (name: string) => join(dir, name);

const qlayer = qlayerImage;

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-cli-compare-'));
  await qemuCreate(p('a.qcow2'), '64M');
  await qemuIo(p('a.qcow2'), ['write -P 1 0 1M', 'write -P 2 10M 4k']);
  await qemuImg(['snapshot', '-c', 'first', p('a.qcow2')]);
  await qemuImg(['convert', '-O', 'raw', p('a.qcow2'), p('a.raw')]);
  await qemuCreate(p('b.qcow2'), '64M');
  await qemuIo(p('b.qcow2'), ['write -P 1 0 1M', 'write -P 3 10M 4k']);
});
afterAll(async () => cleanup());

describe('qlayer image compare / measure / snapshot (CLI)', () => {
  it('compare: the exit codes and words of qemu-img compare', async () => {
    const cases = [
      ['-F', 'raw', p('a.qcow2'), p('a.raw')],
      [p('a.qcow2'), p('b.qcow2')],
      ['-s', p('a.qcow2'), p('a.qcow2')],
    ];
    for (const args of cases) {
      const ours = await qlayer(['compare', ...args]);
      const theirs = await qemuImg(['compare', ...args], [0, 1, 2]);
      expect(ours.exitCode, args.join(' ')).toBe(theirs.exitCode);
      expect(ours.stdout.trim(), args.join(' ')).toBe(theirs.stdout.trim());
    }
    const missing = await qlayer(['compare', p('a.qcow2'), p('missing.qcow2')]);
    expect(missing.exitCode).toBe(2);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
    const asJson = await qlayer(['compare', p('a.qcow2'), p('missing.qcow2'), '--json']);
    expect(asJson.exitCode).toBe(2);
    expect(JSON.parse(asJson.stdout)).toMatchObject({ error: { code: expect.any(String), message: expect.any(String) } });
    const different = await qlayer(['compare', p('a.qcow2'), p('b.qcow2'), '--json']);
    expect(different.exitCode).toBe(1);
    expect(JSON.parse(different.stdout)).toEqual({ identical: false, 'size-mismatch': false, reason: 'content', offset: 10 * 1024 * 1024 });
  });

  it('measure: the JSON and text of qemu-img measure', async () => {
    for (const args of [['-O', 'qcow2', p('a.qcow2')], [p('a.qcow2')], ['-O', 'qcow2', '--size', '10G'], ['-f', 'raw', '-O', 'qcow2', p('a.raw')]]) {
      const ours = await qlayer(['measure', '--output=json', ...args]);
      expect(ours.exitCode, ours.stderr).toBe(0);
      expect(JSON.parse(ours.stdout)).toEqual(JSON.parse((await qemuImg(['measure', '--output=json', ...args])).stdout));
      expect((await qlayer(['measure', ...args])).stdout).toBe((await qemuImg(['measure', ...args])).stdout);
    }
    const both = await qlayer(['measure', '--size', '1G', p('a.qcow2'), '--json']);
    expect(both.exitCode).toBe(1);
    expect(JSON.parse(both.stdout).error.code).toBe('image.bad-argument');
  });

  it('snapshot -l: the list of qemu-img snapshot -l; --json the info shape', async () => {
    const ours = await qlayer(['snapshot', '-l', p('a.qcow2')]);
    expect(ours.exitCode, ours.stderr).toBe(0);
    expect(ours.stdout).toBe((await qemuImg(['snapshot', '-l', p('a.qcow2')])).stdout);
    const list = JSON.parse((await qlayer(['snapshot', '-l', p('a.qcow2'), '--json'])).stdout);
    expect(list).toEqual(JSON.parse((await qemuImg(['info', '--output=json', p('a.qcow2')])).stdout).snapshots);
    expect((await qlayer(['snapshot', '-l', p('b.qcow2')])).stdout).toBe('');
  });

  it('resize: shrinking needs --shrink (exit 1, nothing changed); -- -SIZE shrinks by SIZE', async () => {
    await qemuCreate(p('r.qcow2'), '64M');
    await qemuIo(p('r.qcow2'), ['write -P 1 0 1M', 'write -P 2 40M 1M']);
    const refused = await qlayer(['resize', p('r.qcow2'), '32M', '--json']);
    expect(refused.exitCode).toBe(1);
    expect(JSON.parse(refused.stdout).error.message).toMatch(/1048576 bytes of data .* use --shrink/);
    expect(JSON.parse((await qemuImg(['info', '--output=json', p('r.qcow2')])).stdout)['virtual-size']).toBe(64 * 1024 * 1024);
    const shrunk = await qlayer(['resize', '--shrink', '--json', p('r.qcow2'), '--', '-32M']);
    expect(shrunk.exitCode, shrunk.stderr).toBe(0);
    expect(JSON.parse(shrunk.stdout)).toMatchObject({ 'old-size': 64 * 1024 * 1024, 'virtual-size': 32 * 1024 * 1024, 'discarded-bytes': 1024 * 1024 });
    expect((await qemuImg(['check', p('r.qcow2')])).exitCode).toBe(0);
  });

  it('convert -S: a size that is not a multiple of 512 is one line, exit 1, nothing written', async () => {
    const bad = await qlayer(['convert', '-S', '1000', '-O', 'raw', p('a.qcow2'), p('bad.raw')]);
    expect(bad.exitCode).toBe(1);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    await expect(stat(p('bad.raw'))).rejects.toThrow(/ENOENT/);
    const good = await qlayer(['convert', '-S', '4k', '-O', 'raw', p('a.qcow2'), p('good.raw')]);
    expect(good.exitCode, good.stderr).toBe(0);
    expect((await qemuImg(['compare', '-F', 'raw', p('a.qcow2'), p('good.raw')])).exitCode).toBe(0);
  });
});
