/**
 * UEFI desktops (config boot.firmware: uefi) on a real distribution guest: the Debian 12 fixture
 * built with `vm-fixtures/build-debian.sh --firmware uefi` (GPT with an EFI system partition, grub-efi
 * as EFI/BOOT/BOOTX64.EFI, root ext4 by UUID) boots through OVMF on q35 under TCG.
 *
 * One desktop, one flow (each boot costs tens of seconds under TCG): defined at create (no NVRAM
 * file yet), started (libvirt makes the NVRAM file in the desktop's folder from OVMF's template;
 * the guest itself says it runs on UEFI: /sys/firmware/efi, the ESP mounted at /boot/efi), a user
 * file, assign an app (the recompose rewrites only the disk chain: the definition keeps its NVRAM
 * file, the file itself is kept, not reset to the template), verify by hashes in the guest,
 * unassign, stop; qemu-img check clean on every layer, e2fsck clean; the desktop's undefine
 * removes the NVRAM file (virsh undefine --nvram), and destroy the folder. Before that, a rebase
 * onto a second UEFI base moves the desktop's own NVRAM file (with a variable the guest set) into
 * the new chain's folder, not the one the staging desktop's boot made.
 *
 * Timings go to the test output (console.log) for the README.
 */
import { randomBytes } from 'node:crypto';
import { existsSync, statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type AppManifest } from '../../src/layers/app.js';
import { importBase } from '../../src/layers/bases.js';
import { rebaseDesktop } from '../../src/layers/rebase.js';
import { assignApps } from '../../src/layers/desktop-assign.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop, destroyDesktop, startDesktop, stopDesktop } from '../../src/layers/desktop-lifecycle.js';
import { unassignApps } from '../../src/layers/desktop-unassign.js';
import { verifyDesktop } from '../../src/layers/desktop-verify.js';
import { runGuestScript } from '../../src/layers/guest-script.js';
import { Store } from '../../src/layers/store.js';
import { desktopDomain, desktopNvramPath, NVRAM_FILE, type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { ensureDebianFixture, type DebianFixture } from '../../src/virt/fixture.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';
import { buildTestApp, debianRuntime, debianToolFiles, debugfsCat, fileSha256, rootPartitionRaw, seconds, writeAsUser } from './guest-helpers.js';

let fixture: DebianFixture;
let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let runtime: LibvirtDesktopRuntime;
let app: AppManifest;

/** An EFI variable the test sets in the guest, and its vendor GUID (made up for this test). */
const NVRAM_MARK = 'QlayerNvramMark';
const NVRAM_MARK_GUID = '5f0c9a2e-7d41-4c1b-9e3a-6b2d8f1a0c77';

const virsh = async (...args: string[]): Promise<string> => (await execa('virsh', ['-c', 'qemu:///system', ...args])).stdout;

beforeAll(async () => {
  const built = Date.now();
  fixture = await ensureDebianFixture({ firmware: 'uefi' });
  console.log(`[debian-uefi] fixture ${fixture.dir}: ${(fixture.image.allocated / 1048576).toFixed(0)} MiB allocated, kernel ${fixture.kernelRelease}, ensured in ${seconds(Date.now() - built)}`);
  expect(fixture.firmware).toBe('uefi');
  ({ dir, cleanup } = await tempDir('qlayer-e2e-debian-uefi-'));
  store = await Store.open(join(dir, 'store'));
  await importBase(store, 'debian-uefi', fixture.image.path, { format: 'qcow2' });
  runtime = debianRuntime(join(dir, 'logs'), 'uefi');
  app = await buildTestApp(store, join(dir, 'src', 'tools'), {
    name: 'tools',
    files: debianToolFiles({ says: 'tool from the apps layer', padding: 700_001, dataBytes: 2 * 1048576 + 4321 }),
  });
}, 900_000);

afterAll(async () => {
  if ((await store?.readState())?.desktops['efi']) {
    await stopDesktop(store, runtime, 'efi').catch(() => undefined);
    await destroyDesktop(store, runtime, 'efi').catch(() => undefined);
  }
  await cleanup?.();
});

describe('a UEFI desktop: the Debian 12 guest through OVMF on q35 (TCG)', () => {
  it('boots by UEFI with its NVRAM file in its folder; user file, assign, verify, unassign, stop; the NVRAM file survives the recompose and goes with the desktop', async () => {
    await createDesktop(store, 'efi', 'debian-uefi', { runtime });
    let handle = desktopHandle(store, await store.readState(), 'efi');
    const domain = desktopDomain(handle);
    const nvram = desktopNvramPath(handle);
    expect(nvram).toBe(join(dirname(handle.userPath), NVRAM_FILE));

    // Defined: q35, UEFI, secure boot off, the NVRAM file named in the desktop's folder but not made yet.
    const defined = await virsh('dumpxml', '--inactive', domain);
    expect(defined).toMatch(/<os firmware=['"]efi['"]>/);
    expect(defined).toMatch(/machine=['"]pc-q35-/);
    expect(defined).toMatch(/<feature enabled=['"]no['"] name=['"]secure-boot['"]\/>/);
    expect(defined).toContain(`<nvram>${nvram}</nvram>`);
    expect(existsSync(nvram)).toBe(false);

    let t = Date.now();
    await startDesktop(store, runtime, 'efi');
    const bootMs = Date.now() - t;
    console.log(`[debian-uefi] start to agent ready (OVMF, grub-efi, systemd): ${seconds(bootMs)}`);

    // libvirt's view of the running guest: OVMF's code read-only in pflash, our NVRAM file from its template.
    const live = await virsh('dumpxml', domain);
    const loader = /<loader\b([^>]*)>([^<]+)<\/loader>/.exec(live);
    expect(loader, live).not.toBeNull();
    expect(loader![1]).toMatch(/type=['"]pflash['"]/);
    expect(loader![2]).toMatch(/OVMF_CODE[^/]*\.fd$/);
    const template = /<nvram\b[^>]*\btemplate=['"]([^'"]+)['"][^>]*>([^<]+)<\/nvram>/.exec(live);
    expect(template?.[2]).toBe(nvram);
    expect(statSync(nvram).size).toBe(statSync(template![1]!).size);
    expect(existsSync(`/var/lib/libvirt/qemu/nvram/${domain}_VARS.fd`)).toBe(false);

    // The guest's own view: the kernel came up through EFI, and its ESP is the one the build made.
    const shell = runtime.shell(handle);
    const efi = await runGuestScript(
      shell,
      'cat /sys/firmware/efi/fw_platform_size; findmnt -n -o FSTYPE,UUID /boot/efi; ls /boot/efi/EFI/BOOT; ls /sys/firmware/efi/efivars | grep -c -- "-8be4df61-93ca-11d2-aa0d-00e098032b8c$"\n',
      'uefi facts',
    );
    const [platform, espMount, bootFile, globalVars] = efi.trim().split('\n');
    expect(platform).toBe('64');
    expect(espMount?.split(/\s+/)).toEqual(['vfat', '51A7-E0F1']);
    expect(bootFile).toBe('BOOTX64.EFI');
    expect(Number(globalVars)).toBeGreaterThan(0); // the firmware's global variables (Boot####, BootOrder...) as the kernel reads them
    const serial = await readFile(runtime.serialLogOf(handle), 'latin1');
    expect(serial).toMatch(/BdsDxe: starting Boot\d+/); // OVMF's boot manager started the disk's loader
    expect(serial).toMatch(/efi: EFI v\d/); // and Linux found the EFI system table

    // A file written by the ordinary user, as that user.
    const userText = `written by ${fixture.user.name} on UEFI ${randomBytes(8).toString('hex')}\n`;
    const { file: userFile, sha256: userSha, owner } = await writeAsUser(shell, fixture.user, userText);
    expect(owner).toBe(`${fixture.user.uid}:${fixture.user.name}`);

    // Assign (a recompose: the guest is stopped, the chain recomposed, the definition's disk rewritten).
    t = Date.now();
    const assigned = await assignApps(store, runtime, 'efi', ['tools@1'], () => undefined);
    console.log(`[debian-uefi] assign tools@1 (${app.files.length} files) in ${seconds(Date.now() - t)}`);
    expect(assigned.apps).toEqual(['tools@1']);
    expect(assigned.located).toBe(app.files.length);
    // The first boot wrote OVMF's boot entries into the NVRAM file; the recompose kept the file (same inode, not the template again).
    const nvramAfterFirstBoot = { ino: statSync(nvram).ino, sha: await fileSha256(nvram) };
    expect(nvramAfterFirstBoot.sha).not.toBe(await fileSha256(template![1]!));
    handle = desktopHandle(store, await store.readState(), 'efi');
    const recomposed = await virsh('dumpxml', '--inactive', domain);
    expect(recomposed).toContain(handle.chain[1]!.path); // the new apps layer
    expect(recomposed).toContain(`<nvram>${nvram}</nvram>`);
    expect(recomposed).toMatch(/<os firmware=['"]efi['"]>/);

    t = Date.now();
    await startDesktop(store, runtime, 'efi');
    console.log(`[debian-uefi] boot on base <- apps <- user, to agent ready: ${seconds(Date.now() - t)}`);
    expect(statSync(nvram).ino).toBe(nvramAfterFirstBoot.ino);
    const ran = await runGuestScript(runtime.shell(handle), `${app.prefix}/bin/tool; test -d /sys/firmware/efi && echo efi\n`, 'run the tool');
    expect(ran).toContain('tool from the apps layer');
    expect(ran).toContain('efi');
    t = Date.now();
    const verified = await verifyDesktop(store, runtime, 'efi', [userFile]);
    console.log(`[debian-uefi] verify (hashes in the guest) in ${seconds(Date.now() - t)}`);
    expect(verified.files.length).toBe(app.files.length);
    expect(verified.files.filter((f) => !f.ok)).toEqual([]);
    expect(verified.extra[userFile]).toBe(userSha);

    await unassignApps(store, runtime, 'efi', ['tools'], () => undefined);
    await startDesktop(store, runtime, 'efi');
    const afterUnassign = await verifyDesktop(store, runtime, 'efi', [userFile, `${app.prefix}/bin/tool`]);
    expect(afterUnassign.files).toEqual([]);
    expect(afterUnassign.extra[userFile]).toBe(userSha);
    expect(afterUnassign.extra[`${app.prefix}/bin/tool`]).toBeNull();
    // A variable of the user's own in the NVRAM file (efivarfs: 4 bytes of attributes, non-volatile
    // | boot service | runtime, then the data), so the file can be told from any other one below.
    await runGuestScript(runtime.shell(handle), `printf '\\007\\000\\000\\000qlayer' > /sys/firmware/efi/efivars/${NVRAM_MARK}-${NVRAM_MARK_GUID}\n`, 'set an EFI variable');
    await stopDesktop(store, runtime, 'efi');
    expect((await readFile(nvram)).includes(Buffer.from(NVRAM_MARK, 'utf16le'))).toBe(true);
    expect(statSync(nvram).ino).toBe(nvramAfterFirstBoot.ino);

    // Offline: every layer of the chain is a clean qcow2, the root filesystem is clean, the user's file is there.
    handle = desktopHandle(store, await store.readState(), 'efi');
    for (const layer of handle.chain) {
      const check = await qemuCheck(layer.path);
      expect({ layer: layer.path, exitCode: check.exitCode, corruptions: check.corruptions, leaks: check.leaks }).toEqual({ layer: layer.path, exitCode: 0, corruptions: 0, leaks: 0 });
    }
    const raw = await rootPartitionRaw(fixture, handle.userPath, join(dir, 'efi-root.raw'));
    const fsck = await execa('e2fsck', ['-fn', raw], { reject: false });
    expect(fsck.exitCode, `${fsck.stdout}\n${fsck.stderr}`).toBe(0);
    expect((await debugfsCat(raw, userFile)).toString()).toBe(userText);

    // A rebase onto another UEFI base (the same image imported again under another name: what is
    // checked here is the NVRAM file). The staging desktop's boot makes an NVRAM file of its own in
    // the new folder from the template; the desktop must keep its own, with the user's variable.
    await importBase(store, 'debian-uefi-b', fixture.image.path, { format: 'qcow2' });
    const beforeRebase = await fileSha256(nvram);
    t = Date.now();
    await rebaseDesktop(store, runtime, 'efi', 'debian-uefi-b', { yes: true });
    console.log(`[debian-uefi] rebase onto a second UEFI base (one boot of the new system) in ${seconds(Date.now() - t)}`);
    handle = desktopHandle(store, await store.readState(), 'efi');
    const movedNvram = desktopNvramPath(handle);
    expect(movedNvram).not.toBe(nvram);
    expect(existsSync(dirname(nvram))).toBe(false); // the old chain's folder is gone
    expect(await fileSha256(movedNvram)).toBe(beforeRebase);
    expect((await readFile(movedNvram)).includes(Buffer.from(NVRAM_MARK, 'utf16le'))).toBe(true);
    expect(await virsh('dumpxml', '--inactive', domain)).toContain(`<nvram>${movedNvram}</nvram>`);

    // The definition goes with its NVRAM file (virsh undefine --nvram), and destroy takes the folder.
    await runtime.undefine(handle);
    expect(existsSync(movedNvram)).toBe(false);
    expect(existsSync(handle.userPath)).toBe(true);
    expect((await execa('virsh', ['-c', 'qemu:///system', 'domstate', domain], { reject: false })).exitCode).not.toBe(0);
    await destroyDesktop(store, runtime, 'efi');
    expect(existsSync(dirname(movedNvram))).toBe(false);
  }, 2_400_000);
});
