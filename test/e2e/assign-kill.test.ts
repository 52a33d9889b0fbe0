/**
 * `qlayer desktop assign` killed for real (SIGKILL) at each step of its guest-side half and of
 * its recompose, then the next command run as a user would: the desktop always ends either with
 * the app (finished) or exactly as before (undone), never in between. The guest's files are read
 * offline from the desktop's chain, the way locate reads them.
 */
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openChain } from '../../src/chain/chain.js';
import { openGuestFilesystem } from '../../src/fs/index.js';
import { type AppManifest } from '../../src/layers/app.js';
import { importBase } from '../../src/layers/bases.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop } from '../../src/layers/desktop-lifecycle.js';
import { Store } from '../../src/layers/store.js';
import { ensureFixture } from '../../src/virt/fixture.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';
import { buildTestApp, killCliAt, QLAYER_CLI as CLI } from './guest-helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let manifest: AppManifest;

async function cli(args: string[]): Promise<unknown> {
  const result = await execa(process.execPath, [CLI, ...args, '--store', store.root, '--json'], { reject: false });
  if (result.exitCode !== 0) throw new Error(`qlayer ${args.join(' ')}: exit ${result.exitCode}: ${result.stderr}`);
  return JSON.parse(result.stdout);
}

/** What the desktop's guest filesystem holds of the app, read offline. */
async function appFilesInGuest(name: string): Promise<string[]> {
  const handle = desktopHandle(store, await store.readState(), name);
  const chain = await openChain(handle.userPath, { allowedDirectories: [store.root] });
  try {
    const fs = await openGuestFilesystem(chain);
    const found: string[] = [];
    for (const path of [manifest.prefix, ...manifest.directories.map((d) => d.path), ...manifest.files.map((f) => f.path)]) {
      if (await fs.lookup(path).then(() => true, () => false)) found.push(path);
    }
    return found;
  } finally {
    await chain.close();
  }
}

beforeAll(async () => {
  const fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-kill-'));
  store = await Store.open(join(dir, 'store'));
  await importBase(store, 'guest', fixture.images.base.path, { format: 'qcow2' });
  manifest = await buildTestApp(store, join(dir, 'app'), { name: 'kapp', files: { 'bin/tool': Buffer.alloc(3 << 20, 0x41), README: 'killed and resumed\n' } });
}, 120_000);

afterAll(async () => {
  for (const name of ['k1', 'k2', 'k3', 'k4']) await execa(process.execPath, [CLI, 'desktop', 'stop', name, '--store', store.root], { reject: false });
  await cleanup?.();
});

describe('assign killed at each step, then the next command (real guest, real SIGKILL)', () => {
  it.each([
    ['k1', 'allocating ', 'undone'],
    ['k2', 'allocated ', 'undone'],
    ['k3', 'locating placeholders', 'undone'],
    ['k4', 'relinking ', 'finished'],
  ] as const)('%s: killed at "%s": the next command leaves it %s', async (name, step, outcome) => {
    await createDesktop(store, name, 'guest');
    const { killed, stderr } = await killCliAt(store.root, ['desktop', 'assign', name, 'kapp@1'], step);
    expect(killed, stderr).toBe(true);
    const shown = (await cli(['desktop', 'show', name])) as { operation: { phase: string; undo: string } | null; pendingRecompose: unknown; apps: string[] };
    if (outcome === 'undone') {
      expect(shown.operation).toMatchObject({ undo: `qlayer desktop assign --abort ${name}` });
      expect(['allocating', 'allocated']).toContain(shown.operation!.phase);
      const aborted = (await cli(['desktop', 'assign', '--abort', name])) as { aborted: boolean };
      expect(aborted.aborted).toBe(true);
      expect(await appFilesInGuest(name)).toEqual([]);
      const after = (await cli(['desktop', 'show', name])) as { apps: string[]; operation: unknown; state: string };
      expect([after.apps, after.operation, after.state]).toEqual([[], null, 'stopped']);
    } else {
      expect(shown.pendingRecompose).not.toBeNull();
      await cli(['desktop', 'recompose', name]);
      const after = (await cli(['desktop', 'show', name])) as { apps: string[]; operation: unknown };
      expect([after.apps, after.operation]).toEqual([['kapp@1'], null]);
      expect((await appFilesInGuest(name)).length).toBe(1 + manifest.directories.length + manifest.files.length);
    }
    const handle = desktopHandle(store, await store.readState(), name);
    for (const layer of handle.chain.slice(0, 2)) expect((await qemuCheck(layer.path)).corruptions).toBe(0);
  }, 300_000);
});
