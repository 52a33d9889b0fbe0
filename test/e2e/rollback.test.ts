/**
 * A failed assign leaves the guest as it found it (real guest, libvirt, TCG). One desktop that
 * already has an app, running; then assigns that fail in turn:
 * - an app larger than the guest's free space: refused before anything is made, with numbers;
 * - the guest's disk filling up half-way through the allocation (a second writer through the
 *   agent, between the space check and the allocation): what was made is undone;
 * - a locate that fails (the test seam): the desktop boots again and the placeholders go;
 * - an undo cut short by a hard power-off: it stays recorded, `desktop show` says so, and the
 *   next command finishes it.
 * After each, the guest's files under /opt (listed through the agent) are exactly the ones from
 * before, the store lists the apps from before, and at the end verify passes for them.
 */
import { execa } from 'execa';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HELPER_WRAPPER } from '../../src/layers/allocate.js';
import { importBase } from '../../src/layers/bases.js';
import { assignApps } from '../../src/layers/desktop-assign.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop } from '../../src/layers/desktop-lifecycle.js';
import { unassignApps } from '../../src/layers/desktop-unassign.js';
import { abortOperation } from '../../src/layers/desktop-undo.js';
import { verifyDesktop } from '../../src/layers/desktop-verify.js';
import { showDesktop } from '../../src/layers/desktop-views.js';
import type { GuestShell } from '../../src/layers/guest-script.js';
import { DelegatingRuntime, type DesktopHandle } from '../../src/layers/runtime.js';
import { Store } from '../../src/layers/store.js';
import { desktopDomain, testGuestRuntime, type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { ensureFixture } from '../../src/virt/fixture.js';
import { tempDir } from '../helpers/qemu.js';
import { buildTestApp } from './guest-helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let libvirt: LibvirtDesktopRuntime;
const NAME = 'rb';

/** A runtime whose guest shell lets a test act just before the allocation or the undo runs. */
class InterceptingRuntime extends DelegatingRuntime {
  beforeAllocation: ((shell: GuestShell, handle: DesktopHandle) => Promise<void>) | null = null;
  beforeUndo: ((shell: GuestShell, handle: DesktopHandle) => Promise<void>) | null = null;
  override shell(handle: DesktopHandle): GuestShell {
    const inner = this.inner.shell(handle);
    return {
      writeFile: (path, data) => inner.writeFile(path, data),
      exec: async (path, args, options) => {
        const input = options?.input === undefined ? Buffer.alloc(0) : Buffer.from(options.input);
        if (args[1] === HELPER_WRAPPER) {
          const undo = input.includes(Buffer.from('\0r\0'));
          const hook = undo ? this.beforeUndo : this.beforeAllocation;
          if (hook) await hook(inner, handle);
        }
        return inner.exec(path, args, options);
      },
    };
  }
}

async function sh(shell: GuestShell, script: string): Promise<string> {
  const r = await shell.exec('/bin/sh', ['-c', script]);
  if (r.exitCode !== 0) throw new Error(`${script}: exit ${r.exitCode}: ${r.stderr}`);
  return r.stdout;
}

/** Every path under /opt in the running guest, sorted. */
async function optTree(runtime: DelegatingRuntime | LibvirtDesktopRuntime): Promise<string> {
  const handle = desktopHandle(store, await store.readState(), NAME);
  return sh(runtime.shell(handle), 'find /opt 2>/dev/null | sort');
}

async function app(name: string, files: Record<string, number>): Promise<void> {
  // Each file its name, then sparse zeros up to its size: quick to build and hash.
  const sparse = Object.fromEntries(Object.entries(files).map(([path, size]) => [path, { content: `${name}:${path}\n`, size }]));
  await buildTestApp(store, join(dir, 'src', name), { name, files: sparse });
}

beforeAll(async () => {
  const fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-rollback-'));
  store = await Store.open(join(dir, 'store'));
  await importBase(store, 'guest', fixture.images.base.path, { format: 'qcow2' });
  libvirt = testGuestRuntime({ logDir: join(dir, 'logs') });
  await app('small', { 'bin/small': 50_000, 'etc/small.conf': 100 });
  await app('huge', { 'data/huge.bin': 600 << 20 }); // more than the 256 MiB guest disk
  await app('mid', { 'a/first.bin': 20 << 20, 'b/second.bin': 60 << 20, 'c/third.bin': 1 << 20 });
  await createDesktop(store, NAME, 'guest');
  await assignApps(store, libvirt, NAME, ['small']);
}, 300_000);

afterAll(async () => {
  const handle = desktopHandle(store, await store.readState(), NAME);
  if (await libvirt.isRunning(handle).catch(() => false)) await libvirt.stop(handle).catch(() => undefined);
  await cleanup?.();
});

describe('a failed assign leaves the guest as it found it (real guest)', () => {
  let before = '';

  it('refuses an app larger than the free space before anything is made, with the numbers', async () => {
    await libvirt.start(desktopHandle(store, await store.readState(), NAME));
    before = await optTree(libvirt);
    expect(before).toContain('/opt/small/bin/small');
    await expect(assignApps(store, libvirt, NAME, ['huge'])).rejects.toMatchObject({
      code: 'allocate.not-enough-space',
      message: expect.stringMatching(/huge@1 needs 6\d\d\.\d MiB on the guest filesystem holding \/opt \(.*\), which has \d+\.\d MiB free; nothing was made in the guest/),
    });
    expect(await optTree(libvirt)).toBe(before);
    const view = await showDesktop(store, libvirt, NAME);
    expect([view.state, view.apps, view.operation]).toEqual(['running', ['small@1'], null]);
  }, 300_000);

  it('a disk that fills up during the allocation: what was made is undone', async () => {
    const runtime = new InterceptingRuntime(libvirt);
    let phaseSeen = '';
    runtime.beforeAllocation = async (shell) => {
      phaseSeen = (await showDesktop(store, libvirt, NAME)).operation?.phase ?? 'none';
      // A second writer leaves 40 MiB: the first file (20 MiB) fits, the second (60 MiB) does not.
      await sh(shell, "free=$(df -Pk / | awk 'NR==2 {print $4}'); dd if=/dev/zero of=/home/filler bs=1M count=$((free / 1024 - 40)) 2>/dev/null; sync");
      runtime.beforeAllocation = null;
    };
    const error = await assignApps(store, runtime, NAME, ['mid']).then(
      () => null,
      (e: Error & { code?: string }) => e,
    );
    expect(phaseSeen).toBe('allocating');
    expect(error?.code).toBe('allocate.no-space');
    expect(error?.message).toMatch(/\nundone: removed [12] placeholders? and \d+ folders?/);
    const handle = desktopHandle(store, await store.readState(), NAME);
    await sh(libvirt.shell(handle), 'rm -f /home/filler; sync');
    expect(await optTree(libvirt)).toBe(before);
    const view = await showDesktop(store, libvirt, NAME);
    expect([view.state, view.apps, view.operation]).toEqual(['running', ['small@1'], null]);
  }, 300_000);

  it('a locate that fails: the desktop boots again, the placeholders go, and it is left running as before', async () => {
    let phaseSeen = '';
    await expect(
      assignApps(store, libvirt, NAME, ['mid'], () => {}, {
        beforeLocate: async () => {
          phaseSeen = (await showDesktop(store, libvirt, NAME)).operation?.phase ?? 'none';
          throw Object.assign(new Error('injected: the guest filesystem cannot be read'), { code: 'test.locate-failed' });
        },
      }),
    ).rejects.toMatchObject({ code: 'test.locate-failed', message: expect.stringMatching(/\nundone: removed 3 placeholders and 4 folders/) });
    expect(phaseSeen).toBe('allocated');
    expect(await optTree(libvirt)).toBe(before);
    expect((await showDesktop(store, libvirt, NAME)).state).toBe('running');
  }, 300_000);

  it('an undo cut short by a hard power-off stays recorded, and the next command finishes it', async () => {
    const runtime = new InterceptingRuntime(libvirt);
    runtime.beforeUndo = async (_shell, handle) => {
      await execa('virsh', ['-c', 'qemu:///system', 'destroy', desktopDomain(handle)]);
      runtime.beforeUndo = null;
    };
    await expect(
      assignApps(store, runtime, NAME, ['mid'], () => {}, {
        beforeLocate: async () => {
          throw Object.assign(new Error('injected locate failure'), { code: 'test.locate-failed' });
        },
      }),
    ).rejects.toThrow(/the undo could not finish .*; it runs with the next command on rb, or now: qlayer desktop assign --abort rb/s);
    const view = await showDesktop(store, libvirt, NAME);
    expect(view.state).toBe('stopped');
    expect(view.operation).toMatchObject({ kind: 'assign', apps: ['mid@1'], phase: 'rolling-back', undo: 'qlayer desktop assign --abort rb', failure: { code: 'test.locate-failed' } });
    expect(view.apps).toEqual(['small@1']);
    await expect(verifyDesktop(store, libvirt, NAME)).rejects.toMatchObject({ code: 'desktop.operation-pending', message: expect.stringMatching(/undo it with qlayer desktop assign --abort rb/) });

    const undone = await abortOperation(store, libvirt, NAME);
    expect(undone).toMatchObject({ removed: 3, left: [] });
    expect((await showDesktop(store, libvirt, NAME)).operation).toBeNull();
    expect(await optTree(libvirt)).toBe(before); // it was running before the assign: running again
    // A file the user makes under an app's folder is reported, and is no failure.
    await sh(libvirt.shell(desktopHandle(store, await store.readState(), NAME)), 'echo mine > /opt/small/notes.txt && sync');
    const verified = await verifyDesktop(store, libvirt, NAME);
    expect(verified.unknownFiles).toEqual(['/opt/small/notes.txt']);
    expect(verified.files.map((f) => [f.path, f.ok])).toEqual([
      ['/opt/small/bin/small', true],
      ['/opt/small/etc/small.conf', true],
    ]);
  }, 600_000);

  it('unassign after the user deleted some app files removes the rest, completes, and says which were gone', async () => {
    const handle = desktopHandle(store, await store.readState(), NAME);
    await sh(libvirt.shell(handle), 'rm -f /opt/small/etc/small.conf && sync');
    const result = await unassignApps(store, libvirt, NAME, ['small']);
    expect(result.alreadyGone).toEqual(['/opt/small/etc/small.conf']);
    const view = await showDesktop(store, libvirt, NAME);
    expect([view.apps, view.operation, view.pendingRecompose]).toEqual([[], null, null]);
  }, 300_000);
});
