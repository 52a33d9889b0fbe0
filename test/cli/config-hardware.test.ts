/**
 * The config's desktop.network and desktop.graphics reach every definition the CLI's runtime
 * makes, not only `desktop create`'s: here an older store's desktop, defined at its first start
 * (or after a recompose) through updateDefinition. libvirt itself defines the domain and gives
 * its XML back.
 */
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runtimeFor } from '../../src/cli/context.js';
import { parseConfig } from '../../src/config/config.js';
import { importBase } from '../../src/layers/bases.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop } from '../../src/layers/desktop-lifecycle.js';
import { Store } from '../../src/layers/store.js';
import { ensureFixture } from '../../src/virt/fixture.js';
import { tempDir } from '../helpers/qemu.js';

let dir: string;
let cleanup: () => Promise<void>;
let domain: string | undefined;

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-config-hw-'));
});
afterAll(async () => {
  if (domain) await execa('virsh', ['-c', 'qemu:///system', 'undefine', domain], { reject: false });
  await cleanup?.();
});

describe('config desktop.network / desktop.graphics', () => {
  it('reach a desktop defined at its first start (no desktop create definition)', async () => {
    const fixture = await ensureFixture();
    const store = await Store.open(join(dir, 'store'));
    await importBase(store, 'os', fixture.images.base.path, { format: 'qcow2' });
    await createDesktop(store, 'old', 'os'); // no runtime: as a store from before definitions
    const config = parseConfig(['guest:', '  accel: tcg', 'desktop:', '  network: default', '  graphics: vnc', ''].join('\n'), null, dir);
    const runtime = runtimeFor(config, store);
    const handle = desktopHandle(store, await store.readState(), 'old');
    domain = `qlayer-${store.id}-old`;
    await runtime.updateDefinition(handle); // what a start or a recompose does for a desktop without a domain
    const xml = (await execa('virsh', ['-c', 'qemu:///system', 'dumpxml', '--inactive', domain])).stdout;
    expect(xml).toMatch(/<interface type='network'>[\s\S]*<source network='default'\/>/);
    expect(xml).toMatch(/<graphics type='vnc'[^>]*listen='127\.0\.0\.1'/);
    expect(xml).toContain(`file='${join(store.path('desktops', 'old'), 'apps.qcow2')}'`);
  }, 120_000);
});
