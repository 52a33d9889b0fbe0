/**
 * The rebase of issue 13 on a real distribution: the Debian 12 fixture (grub, systemd, udev,
 * Debian's qemu-guest-agent) imported with --prepare-home, so that systemd mounts the home disk
 * by its label; the home disk starts with the user's home from the base (skel dotfiles, owner);
 * the ordinary user writes in /home, root writes outside it, an app is assigned;
 * then a rebase onto "Debian 12 point release 2" (the same image with another os-release,
 * written offline by debugfs). Oracles: hashes in the booted guest, its /proc/mounts, qemu-img
 * check on every layer and the home disk.
 */
import { createHash, randomBytes } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { importBase } from '../../src/layers/bases.js';
import { assignApps } from '../../src/layers/desktop-assign.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop, destroyDesktop, startDesktop, stopDesktop } from '../../src/layers/desktop-lifecycle.js';
import { verifyDesktop } from '../../src/layers/desktop-verify.js';
import { runGuestScript, shellQuote } from '../../src/layers/guest-script.js';
import { guestHomeMount } from '../../src/layers/home-disk.js';
import { rebaseDesktop } from '../../src/layers/rebase.js';
import { Store } from '../../src/layers/store.js';
import { type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { buildTestApp, debianRuntime, seconds } from './guest-helpers.js';
import { ensureDebianFixture, type DebianFixture } from '../../src/virt/fixture.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';

let fixture: DebianFixture;
let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let runtime: LibvirtDesktopRuntime;

const sha = (data: string | Buffer): string => createHash('sha256').update(data).digest('hex');
const RELEASE_2 = 'PRETTY_NAME="Debian GNU/Linux 12 (qlayer point release 2)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n';

/** The fixture with /usr/lib/os-release (what /etc/os-release links to) replaced, by debugfs on a raw copy. */
async function pointRelease(out: string): Promise<void> {
  const raw = join(dir, 'deb2.raw');
  await execa('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', fixture.image.path, raw]);
  const release = join(dir, 'os-release');
  await writeFile(release, RELEASE_2);
  const device = `${raw}?offset=${fixture.image.filesystemOffset}`;
  await execa('debugfs', ['-w', '-f', '-', device], { input: `rm /usr/lib/os-release\nwrite ${release} /usr/lib/os-release\nsif /usr/lib/os-release mode 0100644\n` });
  expect((await execa('debugfs', ['-R', 'cat /usr/lib/os-release', device])).stdout).toBe(RELEASE_2.trimEnd());
  await execa('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, out]);
  await execa('rm', ['-f', raw]);
}

beforeAll(async () => {
  fixture = await ensureDebianFixture();
  ({ dir, cleanup } = await tempDir('qlayer-e2e-rebase-debian-'));
  store = await Store.open(join(dir, 'store'));
  await importBase(store, 'deb1', fixture.image.path, { format: 'qcow2', prepareHome: true });
  await pointRelease(join(dir, 'deb2.qcow2'));
  await importBase(store, 'deb2', join(dir, 'deb2.qcow2'), { format: 'qcow2', prepareHome: true });
  runtime = debianRuntime(process.env.QLAYER_KEEP_LOGS ?? join(dir, 'logs'));
  await buildTestApp(store, join(dir, 'src', 'tools'), {
    name: 'tools',
    files: { 'bin/tool': { content: Buffer.concat([Buffer.from('#!/bin/sh\necho tool\n'), randomBytes(700_001)]), mode: 0o755 }, README: 'rebased with the desktop\n' },
  });
}, 900_000);

afterAll(async () => {
  if ((await store?.readState())?.desktops.deb) {
    await stopDesktop(store, runtime, 'deb').catch(() => undefined);
    await destroyDesktop(store, runtime, 'deb').catch(() => undefined);
  }
  await cleanup?.();
}, 300_000);

describe('rebase on the Debian 12 guest (systemd mounts the home disk by label)', () => {
  it('home files survive, the file outside /home goes, the app verifies, the new os-release boots', async () => {
    const created = await createDesktop(store, 'deb', 'deb1', { runtime, homeBytes: 256 * 1048576 });
    // The home disk starts with the base's /home: the user's folder that useradd made, dotfiles and all.
    expect(created.homeSeed).toMatchObject({ folders: expect.any(Number), skipped: [] });
    expect(created.homeSeed!.files).toBeGreaterThanOrEqual(3);
    let t = Date.now();
    await startDesktop(store, runtime, 'deb');
    console.log(`[rebase-debian] first boot: ${seconds(Date.now() - t)}`);
    const shell = runtime.shell(desktopHandle(store, await store.readState(), 'deb'));
    // systemd mounts it a moment after the agent answers (nofail: local-fs.target does not wait for it).
    expect(await guestHomeMount(shell)).toMatchObject({ mounted: true, device: '/dev/vdb', fstype: 'ext4' });
    // In the booted guest: the user's dotfiles on the home disk are /etc/skel's (on the base), owned
    // by the user, and a login shell lands in the home folder.
    const { name, home } = fixture.user;
    const seeded = await runGuestScript(
      shell,
      `owner="$(id -u ${name}):$(id -g ${name})"\nfor f in ${home} ${home}/.bashrc ${home}/.profile; do test "$(stat -c %u:%g "$f")" = "$owner" && echo "owned $f"; done\ncmp /etc/skel/.bashrc ${home}/.bashrc && cmp /etc/skel/.profile ${home}/.profile && echo same\nrunuser -l ${name} -c pwd\n`,
      'the seeded home',
    );
    expect(seeded.trim().split('\n')).toEqual([`owned ${home}`, `owned ${home}/.bashrc`, `owned ${home}/.profile`, 'same', home]);
    const notes = `${home}/notes.txt`;
    const text = `written by ${name} ${randomBytes(8).toString('hex')}\n`;
    await runGuestScript(shell, `runuser -u ${name} -- sh -c ${shellQuote(`printf %s ${shellQuote(text)} > ${notes}`)} && echo outside > /root/outside.txt && sync\n`, 'user writes');
    await stopDesktop(store, runtime, 'deb');
    await assignApps(store, runtime, 'deb', ['tools@1']);

    t = Date.now();
    const result = await rebaseDesktop(store, runtime, 'deb', 'deb2', { yes: true, log: (line) => console.log(`[rebase-debian] +${seconds(Date.now() - t)} ${line}`) });
    console.log(`[rebase-debian] rebase in ${seconds(Date.now() - t)}`);
    expect(result).toMatchObject({ from: 'deb1', to: 'deb2', apps: ['tools@1'] });

    const verified = await verifyDesktop(store, runtime, 'deb', [notes, '/root/outside.txt', '/etc/os-release']);
    expect(verified.files.filter((f) => !f.ok)).toEqual([]);
    expect(verified.files).toHaveLength(2);
    expect(verified.extra).toEqual({ [notes]: sha(text), '/root/outside.txt': null, '/etc/os-release': sha(RELEASE_2) });
    expect(verified.home).toMatchObject({ mounted: true, device: '/dev/vdb', fstype: 'ext4' });

    const state = await store.readState();
    const handle = desktopHandle(store, state, 'deb');
    for (const path of [...handle.chain.map((l) => l.path), handle.home!]) {
      const report = await qemuCheck(path);
      expect(report.corruptions + report.leaks, path).toBe(0);
    }
  }, 3_600_000);
});
