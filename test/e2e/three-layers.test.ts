/**
 * A 3-layer chain base <- apps <- user, every overlay made by qlayer's engine. The apps layer
 * gets a file's blocks by running the guest on it (then it is moved into the middle by creating
 * the user delta on top). The guest then reads the file whose data blocks live only in the
 * middle layer: through the serial protocol, through the agent, with libvirt given the chain
 * explicitly and with libvirt reading it from the headers (relative backing name).
 */
import { createHash, randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage } from '../../src/qcow2/create.js';
import { bootGuest, withGuest } from '../../src/virt/boot.js';
import { ensureFixture, type Fixture } from '../../src/virt/fixture.js';
import { parseSha256Events } from '../../src/virt/serial.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';
import { debugfsBlocks, depthAt, fileSha256, fsckClean, qemuMap, qlayerDomains, rawExport, superblock } from './guest-helpers.js';

let fixture: Fixture;
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  fixture = await ensureFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-chain-'));
});

afterAll(async () => {
  await cleanup?.();
});

const APP_FILE = '/opt/app/tool.bin';
const BLOCK = 4096;

describe('base <- apps <- user', () => {
  it('reads in the guest a file whose blocks live only in the middle layer', async () => {
    const baseSha = await fileSha256(fixture.images.base.path);
    const apps = `${dir}/apps.qcow2`;
    const user = `${dir}/user.qcow2`;
    const content = randomBytes(256 * 1024 + 123);
    const contentSha = createHash('sha256').update(content).digest('hex');

    // 1. Fill the apps layer: a guest running on base <- apps writes the app file.
    await createImage({ path: apps, backing: { path: fixture.images.base.path, format: 'qcow2' } });
    await withGuest(
      {
        name: `e2e-apps-${process.pid}`,
        disk: apps,
        kernel: fixture.kernel,
        initrd: fixture.initrd,
        cmdline: fixture.images.base.cmdline,
        accel: 'tcg',
        until: fixture.readyMarker,
        waitForAgent: true,
        serialLog: `${dir}/apps.log`,
      },
      async (guest) => {
        await guest.agent.mkdirP('/opt/app', 0o755);
        await guest.agent.writeFile(APP_FILE, content, { mode: 0o755 });
        await guest.agent.sync();
      },
    );
    expect((await qemuCheck(apps)).exitCode).toBe(0);

    // The file's data blocks, located offline, are provided by the apps layer (depth 0 of apps).
    const appsRaw = await rawExport(apps, `${dir}/apps.raw`);
    expect((await superblock(appsRaw)).needsRecovery).toBe(false);
    const blocks = await debugfsBlocks(appsRaw, APP_FILE);
    expect(blocks.length).toBe(Math.ceil(content.length / BLOCK));
    const appsMap = await qemuMap(apps);
    for (const block of blocks) expect(depthAt(appsMap, block * BLOCK)?.depth, `block ${block}`).toBe(0);

    // 2. Move it into the middle: the user delta on top, with a relative backing name.
    await createImage({ path: user, backing: { path: 'apps.qcow2', format: 'qcow2' } });
    const userMap = await qemuMap(user);
    for (const block of blocks) expect(depthAt(userMap, block * BLOCK)?.depth, `block ${block}`).toBe(1);

    // 3a. libvirt given the chain explicitly (<backingStore>); the guest hashes the file at boot
    // and through the agent.
    const explicit = await bootGuest({
      name: `e2e-chain-${process.pid}`,
      disk: { path: user, format: 'qcow2', backingChain: [{ path: apps, format: 'qcow2' }, { path: fixture.images.base.path, format: 'qcow2' }] },
      kernel: fixture.kernel,
      initrd: fixture.initrd,
      cmdline: `${fixture.images.base.cmdline} qlayer.sha256=${APP_FILE},/opt/app/absent`,
      accel: 'tcg',
      until: fixture.readyMarker,
      waitForAgent: true,
      serialLog: `${dir}/user1.log`,
    });
    try {
      const hashes = parseSha256Events(explicit.serial);
      expect(hashes.get(APP_FILE)).toBe(contentSha);
      expect(hashes.get('/opt/app/absent')).toBeNull();
      expect(await explicit.agent.sha256(APP_FILE)).toBe(contentSha);
      expect((await explicit.shutdown()).how).toBe('agent');
    } finally {
      await explicit.destroy();
    }

    // 3b. libvirt reads the chain from the headers; the guest hashes and powers itself off.
    const headers = await bootGuest({
      name: `e2e-chain-h-${process.pid}`,
      disk: user,
      kernel: fixture.kernel,
      initrd: fixture.initrd,
      cmdline: `${fixture.images.base.cmdline} qlayer.sha256=${APP_FILE} qlayer.then=poweroff`,
      accel: 'tcg',
      until: 'QLAYER: poweroff',
      serialLog: `${dir}/user2.log`,
    });
    try {
      expect(await headers.waitForShutoff(15_000)).toBe(true);
      expect(parseSha256Events(headers.serial).get(APP_FILE)).toBe(contentSha);
    } finally {
      await headers.destroy();
    }
    expect(await qlayerDomains()).toEqual(expect.not.arrayContaining([`qlayer-e2e-chain-${process.pid}`, `qlayer-e2e-chain-h-${process.pid}`]));

    // Offline: the guests' reads did not copy the file up; it still comes from the middle layer.
    const after = await qemuMap(user);
    for (const block of blocks) expect(depthAt(after, block * BLOCK)?.depth, `block ${block}`).toBe(1);
    for (const image of [user, apps]) expect((await qemuCheck(image)).exitCode).toBe(0);
    const userRaw = await rawExport(user, `${dir}/user.raw`);
    expect((await superblock(userRaw)).needsRecovery).toBe(false);
    expect((await fsckClean(userRaw)).ok).toBe(true);
    expect(await fileSha256(fixture.images.base.path)).toBe(baseSha);
  });
});
