/**
 * Two stores, each with a desktop called demo, on one libvirt (one boot, TCG): the running one
 * is store A's. Store B's commands see their own desktop as stopped and never reach A's guest;
 * store C, a copy of A (same store id, so the same domain name), is refused with
 * virt.domain-conflict by the disk check on the live domain XML, and A's guest keeps running.
 * verify refuses while a recompose is pending, and holds the store lock while it works.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { importBase } from '../../src/layers/bases.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop, destroyDesktop, startDesktop, stopDesktop } from '../../src/layers/desktop-lifecycle.js';
import { verifyDesktop } from '../../src/layers/desktop-verify.js';
import { showDesktop } from '../../src/layers/desktop-views.js';
import { runGuestScript } from '../../src/layers/guest-script.js';
import { DelegatingRuntime, type DesktopHandle } from '../../src/layers/runtime.js';
import { Store } from '../../src/layers/store.js';
import { desktopDomain, testGuestRuntime, type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { ensureFixture } from '../../src/virt/fixture.js';
import { tempDir } from '../helpers/qemu.js';
import { qlayerDomains } from './guest-helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let a: Store;
let b: Store;
let c: Store;
let runtime: LibvirtDesktopRuntime;

async function storeWithDemo(root: string, id?: string): Promise<Store> {
  if (id !== undefined) {
    await mkdir(root, { recursive: true });
    await writeFile(join(root, 'store-id'), `${id}\n`); // a copy of another store keeps its id
  }
  const store = await Store.open(root);
  await importBase(store, 'guest', (await ensureFixture()).images.base.path, { format: 'qcow2' });
  await createDesktop(store, 'demo', 'guest');
  return store;
}

const handleOf = async (store: Store): Promise<DesktopHandle> => desktopHandle(store, await store.readState(), 'demo');

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-e2e-two-stores-'));
  a = await storeWithDemo(join(dir, 'a'));
  b = await storeWithDemo(join(dir, 'b'));
  c = await storeWithDemo(join(dir, 'c'), a.id);
  runtime = testGuestRuntime({ logDir: join(dir, 'logs') });
}, 300_000);

afterAll(async () => {
  if (a) await stopDesktop(a, runtime, 'demo').catch(() => undefined);
  await cleanup?.();
});

describe('two stores with a desktop of the same name (one real guest)', () => {
  it('commands of the other store never touch the running guest; a copied store is refused as a conflict', { timeout: 600_000 }, async () => {
    const domainA = desktopDomain(await handleOf(a));
    expect(domainA).not.toBe(desktopDomain(await handleOf(b)));
    expect(desktopDomain(await handleOf(c))).toBe(domainA); // same id, same name: the case the disk check is for

    await startDesktop(a, runtime, 'demo');
    expect(await qlayerDomains()).toContain(domainA);
    const alive = async (): Promise<string> => (await runGuestScript(runtime.shell(await handleOf(a)), 'echo alive\n', 'ping')).trim();
    expect(await alive()).toBe('alive');

    // Store B: its demo is stopped, and stop/destroy of it leave A's guest alone.
    expect((await showDesktop(b, runtime, 'demo')).state).toBe('stopped');
    await stopDesktop(b, runtime, 'demo');
    await destroyDesktop(b, runtime, 'demo');
    expect(await runtime.isRunning(await handleOf(a))).toBe(true);

    // Store C, a copy of A: the domain name is A's, the disk is not C's. Refused, untouched.
    const conflict = { code: 'virt.domain-conflict' };
    await expect(runtime.isRunning(await handleOf(c))).rejects.toMatchObject(conflict);
    await expect(stopDesktop(c, runtime, 'demo')).rejects.toMatchObject(conflict);
    await expect(startDesktop(c, runtime, 'demo')).rejects.toMatchObject(conflict);
    await expect(destroyDesktop(c, runtime, 'demo')).rejects.toMatchObject(conflict);
    await expect(showDesktop(c, runtime, 'demo')).rejects.toThrow(new RegExp(`${domainA} runs .*a/desktops/demo/user\\.qcow2, not desktop demo's .*c/desktops/demo/user\\.qcow2`));
    expect((await c.readState()).desktops.demo).toBeDefined();
    expect(await alive()).toBe('alive');

    // verify on A (already running: no boot) holds A's store lock while it talks to the guest.
    const locks: string[] = [];
    class Watching extends DelegatingRuntime {
      override shell(d: DesktopHandle) {
        const inner = this.inner.shell(d);
        return {
          ...inner,
          exec: async (...args: Parameters<typeof inner.exec>) => {
            locks.push(await readFile(a.path('lock'), 'utf8').catch(() => 'no lock'));
            return inner.exec(...args);
          },
        };
      }
    }
    const verified = await verifyDesktop(a, new Watching(runtime), 'demo', ['/etc/hostname']);
    expect(verified.extra['/etc/hostname']).toMatch(/^[0-9a-f]{64}$/);
    expect(locks.length).toBeGreaterThan(0);
    for (const text of locks) expect(text.split(' ')[0]).toBe(String(process.pid));
    expect(await runtime.isRunning(await handleOf(a))).toBe(true); // it was running: verify leaves it so

    await stopDesktop(a, runtime, 'demo');
    // Desktops are persistent domains now: stopped, A's domain stays defined, shut off.
    expect(await runtime.isRunning(await handleOf(a))).toBe(false);
    // With A's guest gone, the copy's desktop is free to be seen as stopped.
    expect(await runtime.isRunning(await handleOf(c))).toBe(false);
  });

  it('verify refuses a desktop whose recompose is pending, naming the command that finishes it', async () => {
    const state = await a.readState();
    state.desktops.demo!.recompose = {
      phase: 'planned', apps: [], files: [], removedExtents: [], newlyAssigned: [], fromGeneration: 0, toGeneration: 1, startedAt: new Date().toISOString(),
    };
    await a.writeState(state);
    await expect(verifyDesktop(a, runtime, 'demo')).rejects.toThrow(/unfinished recompose; finish it first: qlayer desktop recompose demo/);
    expect(await runtime.isRunning(await handleOf(a))).toBe(false); // nothing was booted
  });
});
