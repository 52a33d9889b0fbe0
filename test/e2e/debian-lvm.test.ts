/**
 * A Debian 12 desktop whose root is on LVM (vm-fixtures/build-debian.sh --root lvm): partition 2
 * is a PV of VG qlayerdeb, the root filesystem is the LV root in two pieces with the LV spare
 * between them; grub reads the LV, Debian's initramfs activates it, the kernel mounts
 * /dev/mapper/qlayerdeb-root.
 *
 * The kernel is the oracle here: inside the booted guest, `dmsetup table` gives device-mapper's
 * mapping of each LV (which must be the reader's pieces) and sha256sum of /dev/mapper/qlayerdeb-spare
 * gives its bytes (which must be what the reader reads offline from the qcow2 chain). Then an
 * app is assigned: its files are located offline on the LV and recomposed, verified by hashes
 * inside the guest, and unassigned; e2fsck -fn on the LV as read offline is clean.
 */
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openChain } from '../../src/chain/index.js';
import { openGuestFilesystem, readVolumes, type Partition } from '../../src/fs/index.js';
import { volumeSource } from '../../src/fs/lvm/mapping.js';
import { readBytes, type ByteSource } from '../../src/io/byte-source.js';
import { type AppManifest } from '../../src/layers/app.js';
import { importBase } from '../../src/layers/bases.js';
import { assignApps } from '../../src/layers/desktop-assign.js';
import { desktopHandle } from '../../src/layers/desktop-handle.js';
import { createDesktop, startDesktop, stopDesktop } from '../../src/layers/desktop-lifecycle.js';
import { unassignApps } from '../../src/layers/desktop-unassign.js';
import { verifyDesktop } from '../../src/layers/desktop-verify.js';
import { runGuestScript } from '../../src/layers/guest-script.js';
import { Store } from '../../src/layers/store.js';
import { type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';
import { buildTestApp, debianRuntime, debianToolFiles, seconds } from './guest-helpers.js';
import { tempDir } from '../helpers/qemu.js';

const repo = join(import.meta.dirname, '..', '..');
const isRoot = process.getuid?.() === 0;
const VG = 'qlayerdeb';

let fixtureDir: string;
let baseImage: string;
let dir: string;
let cleanup: () => Promise<void>;
let store: Store;
let runtime: LibvirtDesktopRuntime;
let app: AppManifest;

/** Open a qcow2 chain, run `job` on its volumes, close. */
async function withVolumes<T>(top: string, job: (disk: ByteSource, volumes: Partition[]) => Promise<T>): Promise<T> {
  const chain = await openChain(top, { allowedDirectories: [store.root, fixtureDir] });
  try {
    const { volumes } = await readVolumes(chain);
    return await job(chain, volumes);
  } finally {
    await chain.close();
  }
}

const lvNamed = (volumes: Partition[], lv: string): Partition => {
  const found = volumes.find((v) => v.name === `${VG}/${lv}`);
  if (!found?.lvm?.pieces) throw new Error(`no readable LV ${VG}/${lv}: ${found?.lvm?.refused}`);
  return found;
};

beforeAll(async () => {
  const t = Date.now();
  const built = await execa('bash', [join(repo, 'vm-fixtures', 'build-debian.sh'), '--root', 'lvm', '--print-dir'], { timeout: 1_200_000, reject: false });
  if (built.exitCode !== 0) throw new Error(`build-debian.sh --root lvm failed: ${built.stderr.split('\n').slice(-5).join('\n')}`);
  fixtureDir = built.stdout.trim().split('\n').at(-1)!;
  baseImage = join(fixtureDir, 'base.qcow2');
  console.log(`[debian-lvm] fixture ${fixtureDir}, ensured in ${seconds(Date.now() - t)}`);
  ({ dir, cleanup } = await tempDir('qlayer-e2e-debian-lvm-'));
  store = await Store.open(join(dir, 'store'));
  await importBase(store, 'debian-lvm', baseImage, { format: 'qcow2' });
  runtime = debianRuntime(join(dir, 'logs'));
  app = await buildTestApp(store, join(dir, 'src', 'tools'), {
    name: 'tools',
    files: debianToolFiles({ says: 'tool on an LV', padding: 700_001, dataBytes: 6 * 1048576 + 4321, readme: 'an app whose files land on an LVM root\n' }),
  });
}, 1_500_000);

afterAll(async () => {
  if ((await store?.readState())?.desktops['lvmdesk']) await stopDesktop(store, runtime, 'lvmdesk').catch(() => undefined);
  await cleanup?.();
});

describe.skipIf(!isRoot)('a Debian 12 guest with its root on an LVM logical volume', () => {
  it('offline: the reader finds VG qlayerdeb, a two-piece linear root holding the ext4, and picks it by default', async () => {
    await withVolumes(baseImage, async (disk, volumes) => {
      const root = lvNamed(volumes, 'root');
      expect(root.type).toBe('linear');
      expect(root.linux).toBe(true);
      expect(root.lvm!.pieces!.length).toBe(2);
      const fs = await openGuestFilesystem(disk);
      expect(fs.partition.name).toBe(`${VG}/root`);
      expect((await fs.readFile('/etc/fstab')).toString()).toContain(`/dev/mapper/${VG}-root`);
    });
    const listed = await execa('node', [join(repo, 'bin', 'qlayer.js'), 'fs', 'partitions', baseImage]);
    console.log(`[debian-lvm] qlayer fs partitions base.qcow2:\n${listed.stdout}`);
  });

  it('boot from the LV, the kernel\'s dm tables and LV bytes equal the reader\'s, assign, verify, unassign', async () => {
    await createDesktop(store, 'lvmdesk', 'debian-lvm');
    let t = Date.now();
    await startDesktop(store, runtime, 'lvmdesk');
    console.log(`[debian-lvm] start to agent ready: ${seconds(Date.now() - t)}`);
    let handle = desktopHandle(store, await store.readState(), 'lvmdesk');
    const shell = runtime.shell(handle);

    // The kernel's view: what / is mounted from, device-mapper's tables, the spare LV's bytes.
    const kernel = await runGuestScript(
      shell,
      `findmnt -no SOURCE /; echo ---; dmsetup table; echo ---; sha256sum /dev/mapper/${VG}-spare | cut -d' ' -f1; blockdev --getsize64 /dev/mapper/${VG}-spare; echo ---; lsblk -dno MAJ:MIN /dev/vda2\n`,
      'kernel view of the LVs',
    );
    const [mounted, table, spare, vda2] = kernel.split('---\n').map((s) => s.trim());
    console.log(`[debian-lvm] in the guest: / on ${mounted}; dmsetup table:\n${table}`);
    expect(mounted).toBe(`/dev/mapper/${VG}-root`);
    const [spareSha, spareSize] = spare!.split('\n');

    t = Date.now();
    const assigned = await assignApps(store, runtime, 'lvmdesk', ['tools@1'], (line) => console.log(`[debian-lvm] assign: +${seconds(Date.now() - t)} ${line}`));
    expect(assigned.located).toBe(app.files.length);
    console.log(`[debian-lvm] assign in ${seconds(Date.now() - t)}`);

    // Offline, through the desktop's qcow2 chain (assign has shut the guest down): device-mapper's
    // pieces are the reader's, and the spare LV's bytes are what the kernel read.
    handle = desktopHandle(store, await store.readState(), 'lvmdesk');
    await withVolumes(handle.chain[0]!.path, async (disk, volumes) => {
      const pv = volumes.find((v) => v.scheme === 'gpt' && v.index === 2)!;
      for (const lv of ['root', 'spare']) {
        // dmsetup: "qlayerdeb-root: START LENGTH linear MAJ:MIN OFFSET" in 512-byte sectors.
        const lines = table!.split('\n').filter((l) => l.startsWith(`${VG}-${lv}:`));
        const dm = lines.map((l) => {
          const [, start, length, target, device, offset] = l.split(/\s+/);
          expect(target).toBe('linear');
          expect(device).toBe(vda2);
          return { offset: Number(start) * 512, diskOffset: pv.offset + Number(offset) * 512, length: Number(length) * 512 };
        });
        expect(lvNamed(volumes, lv).lvm!.pieces, lv).toEqual(dm);
      }
      const spareLv = lvNamed(volumes, 'spare');
      expect(spareLv.length).toBe(Number(spareSize));
      const bytes = await readBytes(volumeSource(disk, spareLv.lvm!.pieces!, spareLv.length), 0, spareLv.length);
      expect(createHash('sha256').update(bytes).digest('hex')).toBe(spareSha);
    });

    // The app's files are on the LV root, and their extents lie inside its pieces.
    await withVolumes(handle.chain[0]!.path, async (disk, volumes) => {
      const root = lvNamed(volumes, 'root');
      const fs = await openGuestFilesystem(disk, { partition: `${VG}/root` });
      const perPiece = root.lvm!.pieces!.map(() => 0);
      for (const file of app.files) {
        for (const e of await fs.extents(file.path)) {
          const piece = root.lvm!.pieces!.findIndex((p) => e.diskOffset >= p.diskOffset && e.diskOffset + e.length <= p.diskOffset + p.length);
          expect(piece, `${file.path} extent at ${e.diskOffset}`).toBeGreaterThanOrEqual(0);
          perPiece[piece] = (perPiece[piece] ?? 0) + e.length;
        }
      }
      console.log(`[debian-lvm] app bytes per piece of the root LV: ${perPiece.join(', ')}`);
    });

    await startDesktop(store, runtime, 'lvmdesk');
    const ran = await runGuestScript(runtime.shell(desktopHandle(store, await store.readState(), 'lvmdesk')), `${app.prefix}/bin/tool; findmnt -no SOURCE --target ${app.prefix}\n`, 'run the tool');
    expect(ran).toContain('tool on an LV');
    expect(ran).toContain(`/dev/mapper/${VG}-root`);
    const verified = await verifyDesktop(store, runtime, 'lvmdesk');
    expect(verified.files.length).toBe(app.files.length);
    expect(verified.files.filter((f) => !f.ok)).toEqual([]);

    t = Date.now();
    await unassignApps(store, runtime, 'lvmdesk', ['tools']);
    console.log(`[debian-lvm] unassign in ${seconds(Date.now() - t)}`);
    await startDesktop(store, runtime, 'lvmdesk');
    const after = await verifyDesktop(store, runtime, 'lvmdesk', [`${app.prefix}/bin/tool`]);
    expect(after.files).toEqual([]);
    expect(after.extra[`${app.prefix}/bin/tool`]).toBeNull();
    await stopDesktop(store, runtime, 'lvmdesk');

    // The LV's ext4, read offline through the mapping, is clean by e2fsck.
    handle = desktopHandle(store, await store.readState(), 'lvmdesk');
    const raw = join(dir, 'root-lv.raw');
    await withVolumes(handle.chain[0]!.path, async (disk, volumes) => {
      const root = lvNamed(volumes, 'root');
      const out = await open(raw, 'w');
      try {
        const source = volumeSource(disk, root.lvm!.pieces!, root.length);
        for (let at = 0; at < root.length; at += 16 * 1048576) {
          const chunk = await readBytes(source, at, Math.min(16 * 1048576, root.length - at));
          if (chunk.some((b) => b !== 0)) await out.write(chunk, 0, chunk.length, at);
        }
        await out.truncate(root.length);
      } finally {
        await out.close();
      }
    });
    const fsck = await execa('e2fsck', ['-fn', raw], { reject: false });
    expect(fsck.exitCode, `${fsck.stdout}\n${fsck.stderr}`).toBe(0);
  }, 3_000_000);
});
