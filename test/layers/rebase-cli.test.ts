/**
 * Bad input to the home-disk and rebase commands as a user types them (bin/qlayer.js, the build
 * in dist/): each is one clear error naming the thing, exit 1, and the store unchanged. No guest
 * boots here; the e2e test (test/e2e/rebase.test.ts) does the rest.
 */
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/qemu.js';

let temp: { dir: string; cleanup: () => Promise<void> };
let store: string;
const qlayer = (args: string[]) => execa('node', ['bin/qlayer.js', ...args, '--store', store, '--json'], { reject: false, env: { QLAYER_CONFIG: '/dev/null' } });
const errorOf = (result: { stdout: string }): { code: string; message: string } => (JSON.parse(result.stdout) as { error: { code: string; message: string } }).error;

beforeAll(async () => {
  temp = await tempDir('qlayer-rebase-cli-');
  store = join(temp.dir, 'store');
  // An ext4 that is no Linux root (no /etc): --prepare-home must refuse it.
  await execa('truncate', ['-s', '64M', join(temp.dir, 'data.raw')]);
  await execa('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', join(temp.dir, 'data.raw')]);
});
afterAll(async () => temp?.cleanup());

describe('home disk and rebase: bad input from the command line', () => {
  it('base import --prepare-home of a disk with no /etc: refused, nothing imported, nothing left over', async () => {
    const result = await qlayer(['base', 'import', 'data', join(temp.dir, 'data.raw'), '-f', 'raw', '--prepare-home']);
    expect(result.exitCode).toBe(1);
    expect(errorOf(result)).toMatchObject({ code: 'home.no-etc', message: expect.stringMatching(/no \/etc folder/) });
    expect(await readdir(join(store, 'bases'))).toEqual([]);
    // A new store writes its state file at the first change: none, or one with no base.
    const state = await readFile(join(store, 'state.json'), 'utf8').catch(() => null);
    if (state !== null) expect(JSON.parse(state).bases).toEqual({});
  });

  it('desktop create --home with a bad size; desktop rebase without --base, of an unknown desktop; group rebase of an unknown group', async () => {
    const imported = await qlayer(['base', 'import', 'data', join(temp.dir, 'data.raw'), '-f', 'raw']);
    expect(imported.exitCode, imported.stderr).toBe(0);
    const before = await readFile(join(store, 'state.json'), 'utf8');
    const size = await qlayer(['desktop', 'create', 'x', '--base', 'data', '--home', 'lots']);
    expect([size.exitCode, errorOf(size).code]).toEqual([1, 'home.bad-size']);
    const tiny = await qlayer(['desktop', 'create', 'x', '--base', 'data', '--home', '1M']);
    expect([tiny.exitCode, errorOf(tiny).code]).toEqual([1, 'home.too-small']);
    const noBase = await qlayer(['desktop', 'rebase', 'x']);
    expect([noBase.exitCode, errorOf(noBase).code]).toEqual([1, 'cli.usage']);
    const unknown = await qlayer(['desktop', 'rebase', 'nobody', '--base', 'data']);
    expect([unknown.exitCode, errorOf(unknown)]).toEqual([1, expect.objectContaining({ code: 'desktop.not-found', message: expect.stringContaining('nobody') })]);
    const group = await qlayer(['group', 'rebase', 'nogroup', '--base', 'data', '--yes']);
    expect([group.exitCode, errorOf(group).code]).toEqual([1, 'group.not-found']);
    expect(await readFile(join(store, 'state.json'), 'utf8')).toBe(before);
    expect(await readdir(join(store, 'desktops')).catch(() => [])).toEqual([]);
  });
});
