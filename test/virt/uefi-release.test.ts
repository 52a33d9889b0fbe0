/**
 * A UEFI desktop's domain as libvirt keeps it, without booting a guest: `desktop create` defines it
 * with the NVRAM file named in the desktop's folder; a start (OVMF only, on a blank disk, then
 * destroyed) has libvirt make the file there from OVMF's template; `desktop release` copies it
 * beside the released image and points the domain at the copy, because the release deletes the
 * desktop's folder; a release whose NVRAM target exists is refused and changes nothing.
 */
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { importBase } from '../../src/layers/bases.js';
import { releaseDesktop } from '../../src/layers/desktop-adopt.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop } from '../../src/layers/desktop-lifecycle.js';
import { Store } from '../../src/layers/store.js';
import { desktopDomain, desktopNvramPath, releasedNvramPath, testGuestRuntime, type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { fileSha256 } from '../e2e/guest-helpers.js';
import { qemuImg, tempDir } from '../helpers/qemu.js';

let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let runtime: LibvirtDesktopRuntime;
const domains: string[] = [];
const virsh = async (...args: string[]): Promise<string> => (await execa('virsh', ['-c', 'qemu:///system', ...args])).stdout;

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-uefi-release-'));
  store = await Store.open(join(dir, 'store'));
  await qemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'blank.qcow2'), '64M']);
  await importBase(store, 'blank', join(dir, 'blank.qcow2'), { format: 'qcow2' });
  runtime = testGuestRuntime({ logDir: join(dir, 'logs'), mode: 'firmware', firmware: 'uefi', accel: 'tcg', memoryMiB: 256 });
});
afterAll(async () => {
  for (const name of domains) {
    await execa('virsh', ['-c', 'qemu:///system', 'destroy', name], { reject: false });
    await execa('virsh', ['-c', 'qemu:///system', 'undefine', '--nvram', name], { reject: false });
  }
  await cleanup?.();
});

/** Start the defined domain until OVMF has made its NVRAM file, then power it off. */
async function firmwareRun(name: string, nvram: string): Promise<void> {
  await virsh('start', name);
  try {
    for (let i = 0; i < 100 && !existsSync(nvram); i++) await new Promise((r) => setTimeout(r, 100));
  } finally {
    await virsh('destroy', name);
  }
}

describe('a UEFI desktop definition and its NVRAM file', () => {
  it('create names the file in the desktop folder, the first start makes it there, release takes a copy beside the image', async () => {
    await createDesktop(store, 'u', 'blank', { runtime });
    const handle = desktopHandle(store, await store.readState(), 'u');
    const name = desktopDomain(handle);
    domains.push(name);
    const nvram = desktopNvramPath(handle);
    expect(await virsh('dumpxml', '--inactive', name)).toContain(`<nvram>${nvram}</nvram>`);
    expect(existsSync(nvram)).toBe(false);
    await firmwareRun(name, nvram);
    expect(existsSync(nvram)).toBe(true);
    const sha = await fileSha256(nvram);

    const out = join(dir, 'released', 'u.qcow2');
    await mkdir(join(dir, 'released'));
    const released = await releaseDesktop(store, runtime, 'u', out);
    expect(released.domain).toBe(name);
    const moved = releasedNvramPath(out);
    expect(moved).toBe(join(dir, 'released', 'u.nvram.fd'));
    const xml = await virsh('dumpxml', '--inactive', name);
    expect(xml).toContain(`<nvram>${moved}</nvram>`);
    expect(xml).toContain(`<source file='${out}'`);
    expect(await fileSha256(moved)).toBe(sha);
    expect(existsSync(nvram)).toBe(false); // the desktop folder went with the release
    // The released domain's firmware uses the copy (and libvirt makes no new one elsewhere).
    await virsh('start', name);
    const live = await virsh('dumpxml', name);
    await virsh('destroy', name);
    expect(live).toMatch(new RegExp(`<nvram template=['"][^'"]+['"]>${moved}</nvram>`));
  }, 120_000);

  it('a release whose NVRAM target exists is refused, and the desktop stays as it was', async () => {
    await createDesktop(store, 'v', 'blank', { runtime });
    const handle = desktopHandle(store, await store.readState(), 'v');
    const name = desktopDomain(handle);
    domains.push(name);
    await firmwareRun(name, desktopNvramPath(handle));
    const out = join(dir, 'released', 'v.qcow2');
    await writeFile(releasedNvramPath(out), 'someone else');
    await expect(releaseDesktop(store, runtime, 'v', out)).rejects.toThrow(/v\.nvram\.fd exists already/);
    expect(existsSync(out)).toBe(false);
    expect((await store.readState()).desktops['v']).toBeDefined();
    expect(await virsh('dumpxml', '--inactive', name)).toContain(`<nvram>${desktopNvramPath(handle)}</nvram>`);
    expect(existsSync(desktopNvramPath(handle))).toBe(true);
  }, 120_000);
});
