/**
 * Desktops as ordinary libvirt citizens (TCG, the tiny test guest): an administrator's VM made
 * with virt-install is adopted, edited with virsh, given an app, and released back to one image;
 * desktops show in `virsh list --all`; a template's hardware is copied. Every proof comes from
 * libvirt (virsh dumpxml/dominfo/list), qemu-img, and the booted guest.
 */
import { copyFile, readlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { importBase } from '../../src/layers/bases.js';
import { adoptDesktop, releaseDesktop } from '../../src/layers/desktop-adopt.js';
import { assignApps } from '../../src/layers/desktop-assign.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop, destroyDesktop } from '../../src/layers/desktop-lifecycle.js';
import { verifyDesktop } from '../../src/layers/desktop-verify.js';
import { Store } from '../../src/layers/store.js';
import { GuestAgent } from '../../src/virt/agent.js';
import { stopDomain } from '../../src/virt/boot.js';
import { testGuestRuntime, type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { diskSources } from '../../src/virt/domain-xml.js';
import { ensureFixture, type Fixture } from '../../src/virt/fixture.js';
import { withConnection } from '../../src/virt/libvirt.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';
import { buildTestApp, fileSha256 } from './guest-helpers.js';

const URI = 'qemu:///system';
const vm = `qltest-native-${process.pid}`;
const extra: string[] = []; // further domains this file defines, undefined in afterAll
let fixture: Fixture;
let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let runtime: LibvirtDesktopRuntime;
let vmDisk: string;
let vmDiskSha: string;

const virsh = async (...args: string[]): Promise<string> => (await execa('virsh', ['-c', URI, ...args])).stdout;
const inactiveXml = (name: string): Promise<string> => virsh('dumpxml', '--inactive', name);
const persistent = async (name: string): Promise<boolean> => /Persistent:\s+yes/.test(await virsh('dominfo', name));
const allDomains = async (): Promise<string[]> => (await virsh('list', '--all', '--name')).split('\n').map((l) => l.trim()).filter(Boolean);
const errorOf = (promise: Promise<unknown>): Promise<{ code?: string; message: string }> =>
  promise.then(
    () => ({ message: 'no error' }),
    (error: { code?: string; message: string }) => error,
  );

async function stopVm(name: string): Promise<void> {
  await withConnection(URI, (c) => stopDomain(c, name, 60_000));
}

beforeAll(async () => {
  fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-native-'));
  store = await Store.open(join(dir, 'store'));
  runtime = testGuestRuntime({ logDir: join(dir, 'logs') });
  // The app's folder: one small script and one file that spans clusters.
  await buildTestApp(store, join(dir, 'app-src'), { name: 'greeter', files: { 'bin/hello': '#!/bin/sh\necho hello from the apps layer\n', 'data.bin': Buffer.alloc(300_001, 7) } });

  // The administrator's VM: virt-install --import on a copy of the test guest's disk.
  vmDisk = join(dir, 'vm-disk.qcow2');
  await copyFile(fixture.images.base.path, vmDisk);
  vmDiskSha = await fileSha256(vmDisk);
  await execa('virt-install', [
    '--connect', URI,
    '--name', vm,
    '--import',
    '--virt-type', 'qemu',
    '--memory', '256',
    '--vcpus', '1',
    '--osinfo', 'detect=off,require=off',
    '--disk', `path=${vmDisk},format=qcow2,bus=virtio`,
    '--boot', `kernel=${fixture.kernel},initrd=${fixture.initrd},kernel_args=${fixture.images.base.cmdline}`,
    '--channel', 'unix,target_type=virtio,name=org.qemu.guest_agent.0',
    '--network', 'none',
    '--graphics', 'none',
    '--noautoconsole',
  ]);
}, 300_000);

afterAll(async () => {
  for (const name of [vm, ...extra]) {
    await execa('virsh', ['-c', URI, 'destroy', name], { reject: false });
    await execa('virsh', ['-c', URI, 'undefine', '--nvram', name], { reject: false });
  }
  await cleanup?.();
});

describe('adopt, edit with virsh, assign, release (real guest)', () => {
  it('adopt refuses a running VM; once shut off it adopts, keeping the domain and the original disk', async () => {
    await new GuestAgent(vm, { uri: URI }).waitReady(120_000); // virt-install started it
    const running = await errorOf(adoptDesktop(store, runtime, vm, { as: 'office' }));
    expect(running.code).toBe('adopt.running');
    expect(running.message).toMatch(/is running; shut it down first/);
    await stopVm(vm);
    const vmDiskShaAfterUse = await fileSha256(vmDisk); // the VM wrote to it while it ran

    const before = await inactiveXml(vm);
    const result = await adoptDesktop(store, runtime, vm, { as: 'office' });
    expect(result).toMatchObject({ desktop: 'office', domain: vm, base: 'office', importedFrom: vmDisk });
    expect(await fileSha256(vmDisk)).toBe(vmDiskShaAfterUse); // the original disk is only read
    expect(await fileSha256(fixture.images.base.path)).not.toBe(''); // (the fixture itself was copied, never used)
    expect(vmDiskSha).toMatch(/^[0-9a-f]{64}$/);

    const handle = desktopHandle(store, await store.readState(), 'office');
    const after = await inactiveXml(vm);
    expect(await persistent(vm)).toBe(true);
    expect(diskSources(after)).toEqual([handle.userPath]);
    for (const layer of handle.chain.slice(1)) expect(after).toContain(`file='${layer.path}'`);
    // Everything but the disk is the VM's own: its uuid, memory, agent channel, kernel.
    for (const kept of [/<uuid>[^<]+<\/uuid>/, /<memory unit='KiB'>\d+<\/memory>/, /name='org\.qemu\.guest_agent\.0'/, /<kernel>[^<]+<\/kernel>/]) {
      expect(after.match(kept)?.[0]).toBe(before.match(kept)?.[0]);
    }
  }, 300_000);

  it('bad input: adopt of an unknown domain, of the same VM again, of a diskless or block-disk domain', async () => {
    expect((await errorOf(adoptDesktop(store, runtime, `no-such-${process.pid}`))).code).toBe('adopt.not-found');
    expect((await errorOf(adoptDesktop(store, runtime, vm, { as: 'office2' }))).code).toBe('adopt.already-desktop');
    const bare = (name: string, devices: string): string =>
      `<domain type='qemu'><name>${name}</name><memory unit='MiB'>64</memory><os><type arch='x86_64'>hvm</type></os><devices>${devices}</devices></domain>`;
    const diskless = `qltest-diskless-${process.pid}`;
    const block = `qltest-block-${process.pid}`;
    extra.push(diskless, block);
    await writeFile(join(dir, 'diskless.xml'), bare(diskless, ''));
    await writeFile(join(dir, 'block.xml'), bare(block, `<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/null'/><target dev='vda' bus='virtio'/></disk>`));
    await virsh('define', join(dir, 'diskless.xml'));
    await virsh('define', join(dir, 'block.xml'));
    expect((await errorOf(adoptDesktop(store, runtime, diskless, { as: 'diskless' }))).code).toBe('adopt.no-disk');
    const notFile = await errorOf(adoptDesktop(store, runtime, block, { as: 'blockdisk' }));
    expect(notFile.code).toBe('adopt.not-a-file');
    expect(notFile.message).toMatch(/type block, not a file/);
    // Nothing of the refused adoptions is left in the store.
    const state = await store.readState();
    expect(Object.keys(state.desktops)).toEqual(['office']);
    expect(Object.keys(state.bases)).toEqual(['office']);
  }, 120_000);

  it('a memory edit made with virsh survives an assign; the domain stays persistent and boots with the app', async () => {
    await virsh('setmaxmem', vm, '320M', '--config');
    await virsh('setmem', vm, '320M', '--config');
    const result = await assignApps(store, runtime, 'office', ['greeter']);
    expect(result.apps).toEqual(['greeter@1']);
    const handle = desktopHandle(store, await store.readState(), 'office');
    // The recompose path's hook: after it the definition opens the new apps generation, through
    // the stable apps.qcow2 link the recompose repointed (docs/design.md).
    await runtime.updateDefinition(handle);
    const xml = await inactiveXml(vm);
    expect(await persistent(vm)).toBe(true);
    expect(xml).toMatch(/<memory unit='KiB'>327680<\/memory>/);
    expect(xml).toMatch(/<currentMemory unit='KiB'>327680<\/currentMemory>/);
    expect(handle.chain[1]!.path).toMatch(/\/apps\.qcow2$/);
    expect(await readlink(handle.chain[1]!.path)).toBe('apps.1.qcow2');
    expect(xml).toContain(`file='${handle.chain[1]!.path}'`);
    expect(xml).not.toMatch(/apps\.\d+\.qcow2/);
    expect(xml).toContain(`store="${store.root}"`); // the hook's way to the store

    const verified = await verifyDesktop(store, runtime, 'office');
    expect(verified.files.length).toBe(2);
    expect(verified.files.every((f) => f.ok)).toBe(true);
    expect(await persistent(vm)).toBe(true);
    expect(await inactiveXml(vm)).toMatch(/<memory unit='KiB'>327680<\/memory>/);
  }, 600_000);

  it('started with virsh start, the desktop counts as running: destroy is refused with the stop command', async () => {
    await virsh('start', vm); // outside qlayer: the definition already opens the current chain
    const handle = desktopHandle(store, await store.readState(), 'office');
    await new GuestAgent(vm, { uri: URI }).waitReady(120_000);
    expect(await runtime.isRunning(handle)).toBe(true);
    const hello = await new GuestAgent(vm, { uri: URI }).exec('/bin/sh', ['/opt/greeter/bin/hello']);
    expect(hello.stdout).toBe('hello from the apps layer\n');
    const refused = await errorOf(destroyDesktop(store, runtime, 'office'));
    expect(refused.code).toBe('desktop.running');
    expect(refused.message).toContain('qlayer desktop stop office');
    await runtime.stop(handle);
    expect(await runtime.isRunning(handle)).toBe(false);
    expect(await allDomains()).toContain(vm); // shut off, still defined
  }, 300_000);

  it('release writes one clean image, redefines the domain on it, and that boots with the app', async () => {
    const out = join(dir, 'released.qcow2');
    const result = await releaseDesktop(store, runtime, 'office', out);
    expect(result).toMatchObject({ desktop: 'office', domain: vm, image: out, format: 'qcow2' });
    const check = await qemuCheck(out);
    expect(check).toMatchObject({ exitCode: 0, corruptions: 0, leaks: 0 });
    const info = JSON.parse((await execa('qemu-img', ['info', '--output=json', out])).stdout) as { 'backing-filename'?: string };
    expect(info['backing-filename']).toBeUndefined();
    const xml = await inactiveXml(vm);
    expect(diskSources(xml)).toEqual([out]);
    expect(xml).not.toContain('<backingStore type');
    expect(xml).toMatch(/<memory unit='KiB'>327680<\/memory>/);
    expect(Object.keys((await store.readState()).desktops)).toEqual([]);

    await virsh('start', vm);
    const agent = new GuestAgent(vm, { uri: URI });
    await agent.waitReady(120_000);
    expect((await agent.exec('/bin/sh', ['/opt/greeter/bin/hello'])).stdout).toBe('hello from the apps layer\n');
    await stopVm(vm);
  }, 300_000);
});

describe('desktops in virsh list --all; hardware from a template', () => {
  it('create defines a persistent domain that virsh lists while shut off; destroy undefines it', async () => {
    await importBase(store, 'guest', fixture.images.base.path, { format: 'qcow2' });
    await createDesktop(store, 'plain', 'guest', { runtime });
    const name = `qlayer-${store.id}-plain`;
    extra.push(name);
    expect(await allDomains()).toContain(name);
    expect(await persistent(name)).toBe(true);
    expect(await virsh('domstate', name)).toMatch(/shut off/);
    await destroyDesktop(store, runtime, 'plain');
    expect(await allDomains()).not.toContain(name);
  }, 120_000);

  it('--like copies the hardware and replaces the disks; a template libvirt rejects fails with its words', async () => {
    await createDesktop(store, 'twin', 'guest', { runtime, template: { kind: 'domain', name: vm } });
    const name = `qlayer-${store.id}-twin`;
    extra.push(name);
    const xml = await inactiveXml(name);
    const source = await inactiveXml(vm);
    expect(xml).toMatch(/<memory unit='KiB'>327680<\/memory>/);
    expect(xml.match(/<kernel>[^<]+<\/kernel>/)?.[0]).toBe(source.match(/<kernel>[^<]+<\/kernel>/)?.[0]);
    expect(xml.match(/<uuid>([^<]+)<\/uuid>/)?.[1]).not.toBe(source.match(/<uuid>([^<]+)<\/uuid>/)?.[1]);
    expect(diskSources(xml)).toEqual([desktopHandle(store, await store.readState(), 'twin').userPath]);
    await destroyDesktop(store, runtime, 'twin');

    const bad = source.replace(/<memory unit='KiB'>\d+<\/memory>/, "<memory unit='KiB'>lots</memory>");
    const refused = await errorOf(createDesktop(store, 'broken', 'guest', { runtime, template: { kind: 'xml', xml: bad, source: 'bad.xml' } }));
    expect(refused.code).toBe('virt.start-failed');
    expect(refused.message).toMatch(/libvirt refused the definition of desktop broken from the template bad\.xml: .*memory/i);
    expect((await store.readState()).desktops.broken).toBeUndefined();
  }, 120_000);
});
