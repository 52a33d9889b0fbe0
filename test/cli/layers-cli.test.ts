/**
 * The store commands as a user runs them: bin/qlayer.js (the build in dist/), --json output,
 * exit codes, one-line errors, and --store beating QLAYER_STORE.
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { qemuCreate, qemuIo, tempDir } from '../helpers/qemu.js';

let temp: { dir: string; cleanup: () => Promise<void> };
const qlayer = (args: string[], env: Record<string, string> = {}) =>
  execa('node', ['bin/qlayer.js', ...args], { reject: false, env: { QLAYER_CONFIG: '/dev/null', ...env } });

beforeAll(async () => {
  temp = await tempDir('qlayer-cli-');
  await qemuCreate(join(temp.dir, 'os.qcow2'), '16M');
  await qemuIo(join(temp.dir, 'os.qcow2'), ['write -P 0x5a 0 1M']);
  mkdirSync(join(temp.dir, 'app', 'bin'), { recursive: true });
  writeFileSync(join(temp.dir, 'app', 'bin', 'tool'), 'tool\n');
});
afterAll(async () => temp?.cleanup());

describe('qlayer base/app/desktop', () => {
  it('builds a store from the command line, with JSON on stdout and errors on stderr', async () => {
    const store = join(temp.dir, 'store');
    const env = { QLAYER_STORE: join(temp.dir, 'ignored-store') };
    const imported = await qlayer(['base', 'import', 'os', join(temp.dir, 'os.qcow2'), '--store', store, '--json'], env);
    expect(imported.exitCode, imported.stderr).toBe(0);
    expect(JSON.parse(imported.stdout)).toMatchObject({ name: 'os', virtualSize: 16 << 20, path: join(store, 'bases', 'os.qcow2') });

    const built = await qlayer(['app', 'build', 'tool', join(temp.dir, 'app'), '--version', '1.0', '--store', store, '--json'], env);
    expect(built.exitCode, built.stderr).toBe(0);
    expect(JSON.parse(built.stdout)).toMatchObject({ name: 'tool', version: '1.0', prefix: '/opt/tool', files: [{ path: '/opt/tool/bin/tool', size: 5 }] });
    const listed = JSON.parse((await qlayer(['app', 'list', '--store', store, '--json'], env)).stdout) as Array<{ name: string; version: string }>;
    expect(listed.map((a) => `${a.name}@${a.version}`)).toEqual(['tool@1.0']);

    const created = await qlayer(['desktop', 'create', 'alice', '--base', 'os', '--store', store, '--json'], env);
    expect(created.exitCode, created.stderr).toBe(0);
    const view = JSON.parse(created.stdout) as { name: string; apps: string[]; paths: Record<string, string> };
    expect(view).toMatchObject({ name: 'alice', apps: [] });
    expect(view.paths).toEqual({
      base: join(store, 'bases', 'os.qcow2'),
      apps: join(store, 'desktops', 'alice', 'apps.0.qcow2'),
      user: join(store, 'desktops', 'alice', 'user.qcow2'),
    });

    // QLAYER_STORE is used when --store is absent: that store is empty.
    const other = await qlayer(['desktop', 'list', '--json'], env);
    expect(JSON.parse(other.stdout)).toEqual([]);

    const missing = await qlayer(['desktop', 'show', 'bob', '--store', store, '--json'], env);
    expect(missing.exitCode).toBe(1);
    expect(JSON.parse(missing.stdout)).toEqual({ error: { code: 'desktop.not-found', message: expect.stringMatching(/no desktop named bob/) } });
    expect(missing.stderr).toMatch(/^qlayer: no desktop named bob/);

    const badConfig = await qlayer(['desktop', 'list'], { QLAYER_CONFIG: join(temp.dir, 'nope.yaml') });
    expect(badConfig.exitCode).toBe(2);
    expect(badConfig.stderr).toMatch(/config file .*nope.yaml does not exist/);

    const destroyed = await qlayer(['desktop', 'destroy', 'alice', '--store', store, '--json'], env);
    expect(destroyed.exitCode, destroyed.stderr).toBe(0);
    expect(JSON.parse((await qlayer(['desktop', 'list', '--store', store, '--json'], env)).stdout)).toEqual([]);
  });
});
