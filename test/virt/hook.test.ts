/**
 * libvirt's QEMU hook without libvirt: the script as libvirt runs it (sh, argv, XML on stdin),
 * `host run-hook` through the real CLI, install/remove on a scratch path, the metadata it reads,
 * and the store lock it must not wait long for. The hook with libvirtd is test/e2e/next-boot.test.ts.
 */
import { createHash } from 'node:crypto';
import { chmod, mkdir, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { importBase } from '../../src/layers/bases.js';
import { createDesktop } from '../../src/layers/desktop-lifecycle.js';
import { showDesktop } from '../../src/layers/desktop-views.js';
import { PENDING_STATUS_FILE } from '../../src/layers/pending-boot-status.js';
import { Store } from '../../src/layers/store.js';
import { setDesktopMetadata } from '../../src/virt/domain-edit.js';
import { buildDomainXml, parseDesktopMetadata } from '../../src/virt/domain-xml.js';
import { daemonStartedAt, hookScript, installHook, removeHook, runHook } from '../../src/virt/hook.js';
import { tempDir } from '../helpers/qemu.js';

const REPO = resolve(import.meta.dirname, '../..');
const BIN = join(REPO, 'bin/qlayer.js');
let dir: string;
let cleanup: () => Promise<void>;

const FOREIGN_XML = `<domain type='kvm'>
  <name>someone-elses-vm</name>
  <metadata>
    <app:info xmlns:app="https://example.org/app/1" owner="bob"/>
  </metadata>
  <devices><disk type='file' device='disk'><source file='/var/lib/libvirt/images/vm.qcow2'/><target dev='vda'/></disk></devices>
</domain>
`;

/** Every file under a folder with its size, mtime and content hash: "touches nothing" made checkable. */
async function snapshot(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (at: string): Promise<void> => {
    for (const entry of await readdir(at, { withFileTypes: true })) {
      const path = join(at, entry.name);
      if (entry.isDirectory()) await walk(path);
      else if (entry.isFile()) {
        const info = await stat(path);
        out.push(`${path} ${info.size} ${info.mtimeMs} ${createHash('sha256').update(await readFile(path)).digest('hex')}`);
      } else out.push(`${path} ${entry.isSymbolicLink() ? 'link' : 'other'}`);
    }
  };
  await walk(root);
  return out.sort();
}

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-hook-'));
});
afterAll(async () => cleanup?.());

describe('the hook script as libvirt runs it', () => {
  it('passes every operation but prepare begin without starting node, and exits 0 when node is gone', async () => {
    const log = join(dir, 'ran.log');
    // A stand-in "node" that records that it ran: the script must not start it for these calls.
    const fakeNode = join(dir, 'fake-node');
    await writeFile(fakeNode, `#!/bin/sh\necho "$@" >> ${log}\nexit 3\n`);
    await chmod(fakeNode, 0o755);
    const script = join(dir, 'qemu');
    await writeFile(script, hookScript(fakeNode, BIN));
    await chmod(script, 0o755);
    for (const [op, sub] of [['start', 'begin'], ['started', 'begin'], ['stopped', 'end'], ['release', 'end'], ['reconnect', 'begin'], ['migrate', 'begin']]) {
      const run = await execa(script, ['dom', op!, sub!, '-'], { input: FOREIGN_XML, reject: false });
      expect(run.exitCode, `${op} ${sub}`).toBe(0);
      expect(run.stdout).toBe('');
    }
    await expect(readFile(log, 'utf8')).rejects.toThrow(); // never ran
    // prepare begin runs it; its failure (exit 3) does not fail the hook.
    const prepare = await execa(script, ['dom', 'prepare', 'begin', '-'], { input: FOREIGN_XML, reject: false });
    expect(prepare.exitCode).toBe(0);
    expect(await readFile(log, 'utf8')).toBe(`${BIN} host run-hook dom prepare begin -\n`);
    // A node that is no longer there (qlayer uninstalled): still exit 0.
    await writeFile(script, hookScript(join(dir, 'no-such-node'), BIN));
    expect((await execa(script, ['dom', 'prepare', 'begin', '-'], { input: FOREIGN_XML, reject: false })).exitCode).toBe(0);
  });
});

describe('host run-hook (the real CLI)', () => {
  let store: Store;
  let before: string[];
  beforeAll(async () => {
    store = await Store.open(join(dir, 'store'));
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '4M']);
    await importBase(store, 'os', join(dir, 'base.qcow2'), { format: 'qcow2' });
    await createDesktop(store, 'desk', 'os');
    before = await snapshot(store.root);
  });

  const runHookCli = (xml: string, args = ['dom', 'prepare', 'begin', '-']) => execa('node', [BIN, 'host', 'run-hook', ...args], { input: xml, reject: false });

  it('a domain that is not a qlayer desktop: exit 0, no output, nothing touched', async () => {
    const run = await runHookCli(FOREIGN_XML);
    expect(run).toMatchObject({ exitCode: 0, stdout: '', stderr: '' });
    expect(await snapshot(store.root)).toEqual(before);
    expect(await runHook(['dom', 'prepare', 'begin', '-'], FOREIGN_XML)).toMatchObject({ outcome: 'ignored', detail: 'not a qlayer desktop' });
  });

  it('bad XML, no XML, odd arguments: exit 0, no output, nothing touched', async () => {
    for (const [xml, args] of [
      ['<domain><name>x</name><metadata><q:desktop xmlns:q="https://qlayer.invalid/xmlns/desktop/1" store=', undefined],
      ['\u0000\u00ff not xml at all', undefined],
      ['', undefined],
      [FOREIGN_XML, []],
      [FOREIGN_XML, ['dom']],
    ] as Array<[string, string[] | undefined]>) {
      const run = await runHookCli(xml, args);
      expect(run).toMatchObject({ exitCode: 0, stdout: '', stderr: '' });
    }
    // Metadata naming a relative store, or one that does not exist: ignored.
    const relative = `<domain><name>x</name><metadata><q:desktop xmlns:q="https://qlayer.invalid/xmlns/desktop/1" store="store" name="desk"/></metadata></domain>`;
    expect(await runHook(['x', 'prepare', 'begin', '-'], relative)).toMatchObject({ outcome: 'ignored' });
    const missing = relative.replace('store="store"', `store="${join(dir, 'nowhere')}"`);
    expect(await runHook(['x', 'prepare', 'begin', '-'], missing)).toMatchObject({ outcome: 'ignored' });
    expect(await snapshot(store.root)).toEqual(before);
  });

  it("a qlayer desktop with nothing pending: nothing to do, nothing touched", async () => {
    const xml = domainXmlOf(store, 'desk');
    expect(await runHook(['x', 'prepare', 'begin', '-'], xml)).toMatchObject({ outcome: 'nothing-pending', desktop: 'desk' });
    expect((await runHookCli(xml)).exitCode).toBe(0);
    expect(await snapshot(store.root)).toEqual(before);
  });

  it('a pending assign with the store locked by a live process: left pending with that reason, without waiting long', async () => {
    await store.update((s) => {
      s.desktops.desk!.pendingBoot = { kind: 'assign', refs: ['tool@1'], requestedAt: '2026-01-01T00:00:00.000Z', created: null };
    });
    // pid 1 is alive for as long as this machine runs: a lock nobody will release during the test.
    const lockPath = store.path('lock');
    const start = (await readFile('/proc/1/stat', 'utf8')).split(') ')[1]!.split(' ')[19];
    await writeFile(lockPath, `1 ${start} ${hostname()}\n`);
    try {
      const run = await runHook(['x', 'prepare', 'begin', '-'], domainXmlOf(store, 'desk'));
      expect(run).toMatchObject({ outcome: 'left-pending', desktop: 'desk' });
      expect(run.detail).toMatch(/is in use/);
      const view = await showDesktop(store, null, 'desk');
      expect(view.pendingAtNextBoot).toMatchObject({ kind: 'assign', apps: ['tool@1'], lastAttempt: { by: 'hook', code: 'store.locked' } });
      expect(JSON.parse(await readFile(join(store.path('desktops', 'desk'), PENDING_STATUS_FILE), 'utf8'))).toMatchObject({ code: 'store.locked' });
    } finally {
      await import('node:fs/promises').then((fs) => fs.rm(lockPath, { force: true }));
    }
    // A definition that names a generation (an older qlayer's): left pending, saying how to fix it.
    const stale = domainXmlOf(store, 'desk').replace(/apps\.qcow2/, 'apps.0.qcow2');
    expect(await runHook(['x', 'prepare', 'begin', '-'], stale)).toMatchObject({ outcome: 'left-pending' });
    expect((await showDesktop(store, null, 'desk')).pendingAtNextBoot?.lastAttempt).toMatchObject({ code: 'hook.stale-definition', reason: expect.stringMatching(/qlayer desktop start desk/) });
    // Unlocked, the same start tries for real: the app is not in the store, so it stays pending with that reason.
    const run = await runHook(['x', 'prepare', 'begin', '-'], domainXmlOf(store, 'desk'));
    expect(run.outcome).toBe('left-pending');
    const view = await showDesktop(store, null, 'desk');
    expect(view.pendingAtNextBoot?.lastAttempt?.code).toBe('app.not-found');
    expect((await store.readState()).desktops.desk!.appsGeneration).toBe(0);
  });

  it('a domain whose disk is not the desktop\'s user.qcow2 is left alone', async () => {
    const xml = domainXmlOf(store, 'desk').replace(/file='[^']*user\.qcow2'/, `file='${join(dir, 'other.qcow2')}'`);
    expect(await runHook(['x', 'prepare', 'begin', '-'], xml)).toMatchObject({ outcome: 'nothing-pending' });
  });
});

/** A desktop domain's XML as qlayer defines it. */
function domainXmlOf(store: Store, name: string): string {
  const desktopDir = store.path('desktops', name);
  return buildDomainXml({
    name: `qlayer-${store.id}-${name}`,
    type: 'qemu',
    memoryMiB: 256,
    vcpus: 1,
    boot: { kind: 'firmware', firmware: 'bios' },
    disks: [{ path: join(desktopDir, 'user.qcow2'), format: 'qcow2', backingChain: [{ path: join(desktopDir, 'apps.qcow2'), format: 'qcow2' }] }],
    desktop: { store: store.root, storeId: store.id, name },
  });
}

describe('install-hook and remove-hook (on a scratch path)', () => {
  it('installs, replaces its own, refuses a foreign hook and says where to put it, removes only its own', async () => {
    const hooks = join(dir, 'hooks');
    await mkdir(hooks);
    const path = join(hooks, 'qemu');
    const first = await installHook({ node: process.execPath, bin: BIN, path });
    expect(first).toMatchObject({ path, replaced: 'nothing' });
    expect((await stat(path)).mode & 0o777).toBe(0o755);
    expect(await readFile(path, 'utf8')).toBe(hookScript(process.execPath, BIN));
    const mtime = (await stat(path)).mtimeMs;
    expect(await installHook({ node: process.execPath, bin: BIN, path })).toMatchObject({ replaced: 'unchanged' });
    expect((await stat(path)).mtimeMs).toBe(mtime); // the same script is not rewritten
    expect(await installHook({ node: process.execPath, bin: join(dir, 'elsewhere', 'qlayer.js'), path })).toMatchObject({ replaced: 'qlayer-hook' });

    const foreign = join(hooks, 'other');
    await writeFile(foreign, '#!/bin/sh\n# the admin\'s own hook\nexit 0\n');
    await expect(installHook({ node: process.execPath, bin: BIN, path: foreign })).rejects.toMatchObject({ code: 'virt.hook-foreign', message: expect.stringMatching(/other\.d\/qlayer/) });
    expect(await readFile(foreign, 'utf8')).toContain("the admin's own hook");
    await expect(removeHook({ path: foreign })).rejects.toMatchObject({ code: 'virt.hook-foreign' });
    await expect(installHook({ node: process.execPath, bin: BIN, path: join(dir, 'no-such-dir', 'qemu') })).rejects.toMatchObject({ code: 'virt.hook-no-dir' });

    // Whether the running daemon must reload: it has not seen this new file; a stamp saying qlayer
    // made this very daemon reload since the file existed settles it (no daemon: nothing to do).
    const daemon = daemonStartedAt();
    const stampFile = join(dir, 'reload-stamp');
    if (daemon !== null) {
      expect((await installHook({ node: process.execPath, bin: BIN, path, stampFile })).daemonMustReload).toBe(true);
      await writeFile(stampFile, `${daemon.pid} ${daemon.startedAt}\n`);
      expect(await installHook({ node: process.execPath, bin: BIN, path, stampFile })).toMatchObject({ daemonMustReload: false, daemonNote: expect.stringMatching(/reloaded/) });
      await writeFile(stampFile, `${daemon.pid + 1} ${daemon.startedAt}\n`); // another daemon's
      expect((await installHook({ node: process.execPath, bin: BIN, path, stampFile })).daemonMustReload).toBe(true);
    }

    expect(await removeHook({ path })).toEqual({ path, removed: true });
    expect(await removeHook({ path })).toEqual({ path, removed: false });
  });
});

describe('the desktop metadata the hook reads', () => {
  it('round-trips through qlayer\'s XML and libvirt\'s formatting, and is added to an administrator\'s XML without touching the rest', () => {
    const meta = { store: '/srv/qlayer & co/store', storeId: 'abcd1234', name: 'office' };
    const xml = buildDomainXml({ name: 'qlayer-abcd1234-office', type: 'qemu', memoryMiB: 256, vcpus: 1, boot: { kind: 'firmware', firmware: 'bios' }, disks: [{ path: '/x/user.qcow2', format: 'qcow2' }], desktop: meta });
    expect(parseDesktopMetadata(xml)).toEqual(meta);
    // libvirt re-serialises with double quotes and its own prefix order.
    const libvirtStyle = `<domain type="qemu"><name>d</name><metadata>\n    <qlayer:desktop xmlns:qlayer="https://qlayer.invalid/xmlns/desktop/1" store="/srv/qlayer &amp; co/store" store-id="abcd1234" name="office"/>\n  </metadata></domain>`;
    expect(parseDesktopMetadata(libvirtStyle)).toEqual(meta);
    // Another namespace's desktop element is not ours.
    expect(parseDesktopMetadata(`<domain><metadata><x:desktop xmlns:x="https://example.org/x" store="/s" name="n"/></metadata></domain>`)).toBeUndefined();

    const admin = FOREIGN_XML;
    const added = setDesktopMetadata(admin, meta);
    expect(parseDesktopMetadata(added)).toEqual(meta);
    expect(added).toContain('<app:info xmlns:app="https://example.org/app/1" owner="bob"/>');
    expect(added.replace(/<qlayer:desktop[^>]*\/>/, '').replace(/\s+/g, '')).toBe(admin.replace(/\s+/g, ''));
    // Set again (a moved store): replaced, not duplicated.
    const moved = setDesktopMetadata(added, { ...meta, store: '/new/store' });
    expect(moved.match(/xmlns\/desktop\/1/g)).toHaveLength(1);
    expect(parseDesktopMetadata(moved)?.store).toBe('/new/store');
    // No <metadata> at all: one is made after <name>.
    const bare = `<domain type='qemu'>\n  <name>v</name>\n  <memory unit='KiB'>1</memory>\n</domain>\n`;
    const withMeta = setDesktopMetadata(bare, meta);
    expect(parseDesktopMetadata(withMeta)).toEqual(meta);
    expect(withMeta).toContain("<memory unit='KiB'>1</memory>");
  });
});
