import { copyFile, mkdir, readFile, readlink, rm, symlink, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FaultInjectingFileSystem, InjectedCrash } from '../../src/io/fault-injection.js';
import { nodeFileSystem } from '../../src/io/host-file.js';
import { buildApp } from '../../src/layers/app.js';
import { planAssign, planUnassign } from '../../src/layers/plan.js';
import { runRecompose } from '../../src/layers/recompose.js';
import { newDesktopRecord, type DesktopRecord, type LocatedFile } from '../../src/layers/state.js';
import { debugfsExtents, debugfsLeaves, debugfsRead, guestChange } from '../helpers/offline-guest.js';
import { qemuCheck, qemuImg, qemuInfo, qemuReadRaw, qemuReadRawExplicit, sha256, tempDir } from '../helpers/qemu.js';
import {
  BLOCK,
  allocateFallocated,
  allocateOffline,
  assertCleanImages,
  context,
  expectedAfterAssign,
  locate,
  makeDesktop,
  randomContent,
  withDebugfsFlip,
  type Desktop,
} from './desktop-fixture.js';

describe('recompose (offline guest)', () => {
  let temp: { dir: string; cleanup: () => Promise<void> };
  let desktop: Desktop;
  let before: Buffer;
  let located: LocatedFile[];
  let baseHash: string;

  beforeAll(async () => {
    temp = await tempDir('qlayer-recompose-');
    desktop = await makeDesktop(temp.dir);
    await allocateOffline(desktop, temp.dir);
    baseHash = sha256(await readFile(desktop.basePath));
    before = await qemuReadRaw(desktop.userPath);
    located = await locate(desktop, [desktop.manifest]);
  }, 120_000);
  afterAll(async () => temp?.cleanup());

  it('locate finds exactly the blocks debugfs reports for each placeholder', async () => {
    const raw = join(temp.dir, 'before.raw');
    await writeFile(raw, before);
    for (const file of located) {
      const fromDebugfs = await debugfsExtents(raw, file.path, BLOCK);
      expect(file.extents.map((e) => ({ offset: e.diskOffset, length: e.length }))).toEqual(fromDebugfs);
    }
    expect(located.map((f) => f.path).sort()).toEqual(desktop.manifest.files.map((f) => f.path).sort());
  });

  it('assign: app bytes inside the extents, every other byte as before, all images clean', async () => {
    const persisted = { json: '' };
    desktop.record.recompose = planAssign(desktop.record, [desktop.manifest], located);
    // Keep a copy of the planned desktop for the crash test below.
    await mkdir(join(temp.dir, 'planned'), { recursive: true });
    for (const f of ['apps.0.qcow2', 'user.qcow2']) await copyFile(join(desktop.desktopDir, f), join(temp.dir, 'planned', f));
    await writeFile(join(temp.dir, 'planned', 'record.json'), JSON.stringify(desktop.record));

    const report = await runRecompose(context(desktop, persisted));
    expect(report.clustersDropped).toBeGreaterThan(0);
    expect(report.bytesPatchedInUserDelta).toBeGreaterThan(0); // placeholders share clusters with metadata
    // The dropped clusters' host blocks went back to the file system (holes in user.qcow2).
    expect(report.bytesReturnedToHost).toBe(report.clustersDropped * 65536);
    const mapped = JSON.parse((await qemuImg(['map', '--output=json', '-f', 'raw', desktop.userPath])).stdout) as Array<{ length: number; data: boolean }>;
    const holes = mapped.filter((m) => !m.data).reduce((n, m) => n + m.length, 0);
    expect(holes).toBeGreaterThanOrEqual(report.bytesReturnedToHost);
    expect(desktop.record.apps).toEqual(['app@1']);
    expect(desktop.record.recompose).toBeNull();
    expect(existsSync(join(desktop.desktopDir, 'apps.0.qcow2'))).toBe(false);
    expect((await qemuInfo(desktop.userPath))['backing-filename']).toBe('apps.1.qcow2');

    const after = await qemuReadRaw(desktop.userPath);
    const expected = await expectedAfterAssign(before, located, desktop.appSource, desktop.manifest.prefix);
    expect(after.equals(expected)).toBe(true);
    await assertCleanImages([desktop.basePath, join(desktop.desktopDir, 'apps.1.qcow2'), desktop.userPath]);
    expect(sha256(await readFile(desktop.basePath))).toBe(baseHash);

    // Independent proofs from e2fsprogs: the filesystem is clean and the files hold the app.
    const raw = join(temp.dir, 'after.raw');
    await writeFile(raw, after);
    const fsck = await execa('e2fsck', ['-fn', raw], { reject: false });
    expect(fsck.exitCode, fsck.stdout).toBe(0);
    for (const file of desktop.manifest.files) {
      const dumped = join(temp.dir, 'dumped');
      await debugfsRead(raw, `dump ${file.path} ${dumped}`);
      expect(sha256(await readFile(dumped))).toBe(file.sha256);
    }
    expect(sha256(await readFile(join(temp.dir, 'later.txt')))).toBe(
      sha256(await (async () => {
        const out = join(temp.dir, 'later.out');
        await debugfsRead(raw, `dump /home/user/later.txt ${out}`);
        return readFile(out);
      })()),
    );
  });

  it('unassign: after the guest deletes the files, the apps layer is rebuilt without them', async () => {
    await guestChange(desktop.userPath, temp.dir, desktop.manifest.files.map((f) => `rm ${f.path}`));
    const beforeUnassign = await qemuReadRaw(desktop.userPath);
    const persisted = { json: '' };
    desktop.record.recompose = planUnassign(desktop.record, ['app']);
    const removed = desktop.record.recompose.removedExtents;
    await runRecompose(context(desktop, persisted));
    expect(desktop.record.apps).toEqual([]);
    const after = await qemuReadRaw(desktop.userPath);
    // Only the blocks of the removed files (freed by the guest) may change.
    const mask = Buffer.alloc(after.length, 1);
    for (const r of removed) mask.fill(0, r.diskOffset, r.diskOffset + r.length);
    for (let i = 0; i < after.length; i += BLOCK) {
      if (mask[i] === 1 && !after.subarray(i, i + BLOCK).equals(beforeUnassign.subarray(i, i + BLOCK))) {
        throw new Error(`byte block at ${i} changed outside the removed files`);
      }
    }
    await assertCleanImages([desktop.basePath, join(desktop.desktopDir, 'apps.2.qcow2'), desktop.userPath]);
    const raw = join(temp.dir, 'unassigned.raw');
    await writeFile(raw, after);
    expect((await execa('e2fsck', ['-fn', raw], { reject: false })).exitCode).toBe(0);
    expect(sha256(await readFile(desktop.basePath))).toBe(baseHash);
  });

  it.each([
    ['the process dies (written bytes stay)', false],
    ['the power fails (writes not yet fsynced are lost)', true],
  ])('stopped at any write or fsync, %s: the user data is kept and a rerun completes it', async (_label, loseUnsyncedWrites) => {
    const planned = join(temp.dir, 'planned');
    const restore = async (): Promise<void> => {
      for (const f of ['apps.1.qcow2', 'apps.2.qcow2']) await rm(join(desktop.desktopDir, f), { force: true });
      for (const f of ['apps.0.qcow2', 'user.qcow2']) await copyFile(join(planned, f), join(desktop.desktopDir, f));
      await rm(appsLink, { force: true });
      await symlink('apps.0.qcow2', appsLink);
      desktop.record = JSON.parse(await readFile(join(planned, 'record.json'), 'utf8')) as DesktopRecord;
    };
    const appsLink = join(desktop.desktopDir, 'apps.qcow2');
    const expected = await expectedAfterAssign(before, located, desktop.appSource, desktop.manifest.prefix);
    const newExtents = located.flatMap((f) => f.extents);

    // Count the durable operations of a whole run.
    await restore();
    const counter = new FaultInjectingFileSystem(nodeFileSystem);
    await runRecompose(context(desktop, { json: '' }, counter));
    const total = counter.operations;
    expect(total).toBeGreaterThan(5);

    let lostWrites = 0;
    for (let n = 1; n <= total; n++) {
      await restore();
      const persisted = { json: JSON.stringify(desktop.record) };
      const faulty = new FaultInjectingFileSystem(nodeFileSystem, { crashAtOperation: n, loseUnsyncedWrites });
      await expect(runRecompose(context(desktop, persisted, faulty))).rejects.toBeInstanceOf(InjectedCrash);
      lostWrites += faulty.lostWrites;

      // Stopped: every byte outside the new placeholders reads as before; inside, zeros or the app.
      const stopped = await qemuReadRaw(desktop.userPath);
      const inside = Buffer.alloc(stopped.length);
      for (const e of newExtents) inside.fill(1, e.diskOffset, e.diskOffset + e.length);
      for (let i = 0; i < stopped.length; i += BLOCK) {
        const block = stopped.subarray(i, i + BLOCK);
        if (inside[i] === 1) {
          const ok = block.equals(before.subarray(i, i + BLOCK)) || block.equals(expected.subarray(i, i + BLOCK));
          if (!ok) throw new Error(`crash at op ${n}/${total}: placeholder block at ${i} is neither zeros nor app bytes`);
        } else if (!block.equals(before.subarray(i, i + BLOCK))) {
          throw new Error(`crash at op ${n}/${total}: user block at ${i} changed`);
        }
      }
      const userCheck = await qemuCheck(desktop.userPath);
      expect(userCheck.corruptions, `crash at op ${n}: user delta corrupt`).toBe(0);
      // A domain names the apps.qcow2 link in its explicit chain: through it, a start now (a
      // `virsh start` of the stopped desktop) reads exactly what the header chain reads.
      expect((await qemuReadRawExplicit(desktop.userPath, appsLink)).equals(stopped), `crash at op ${n}/${total}: the link disagrees with the user delta's backing file`).toBe(true);

      // Rerun from what was persisted: it completes, and nothing leaks.
      desktop.record = JSON.parse(persisted.json) as DesktopRecord;
      await runRecompose(context(desktop, { json: '' }));
      const finished = await qemuReadRaw(desktop.userPath);
      expect(finished.equals(expected), `crash at op ${n}/${total}: rerun did not reach the expected disk`).toBe(true);
      expect(await readlink(appsLink)).toBe('apps.1.qcow2');
      expect(existsSync(join(desktop.desktopDir, 'apps.0.qcow2'))).toBe(false);
      await assertCleanImages([join(desktop.desktopDir, 'apps.1.qcow2'), desktop.userPath]);
    }
    // The power-failure model must really have thrown writes away at some crash points.
    if (loseUnsyncedWrites) expect(lostWrites).toBeGreaterThan(0);
    else expect(lostWrites).toBe(0);
    expect(sha256(await readFile(desktop.basePath))).toBe(baseHash);
  }, 600_000);
});

describe('successive assigns (offline guest)', () => {
  it('a second assign keeps the first app, whose user clusters already read from the apps layer', async () => {
    const temp = await tempDir('qlayer-recompose2-');
    try {
      const desktop = await makeDesktop(temp.dir);
      // First app.
      await allocateOffline(desktop, temp.dir);
      const first = await locate(desktop, [desktop.manifest]);
      desktop.record.recompose = planAssign(desktop.record, [desktop.manifest], first);
      await runRecompose(context(desktop, { json: '' }));

      // Second app, built from other files under another prefix.
      const second = join(temp.dir, 'second-src');
      await mkdir(second, { recursive: true });
      await writeFile(join(second, 'big.bin'), randomContent(9, 777_777));
      await writeFile(join(second, 'small.txt'), randomContent(10, 1234));
      const secondManifest = await buildApp(desktop.store, { name: 'second', sourceDir: second, version: '1' });
      const firstManifest = desktop.manifest;
      desktop.manifest = secondManifest;
      await allocateOffline(desktop, temp.dir);
      const before = await qemuReadRaw(desktop.userPath);
      const located = await locate(desktop, [secondManifest]);
      desktop.record.recompose = planAssign(desktop.record, [secondManifest], located);
      const report = await runRecompose(context(desktop, { json: '' }));
      expect(report.generation).toBe(2);
      expect(desktop.record.apps).toEqual(['app@1', 'second@1']);

      const after = await qemuReadRaw(desktop.userPath);
      expect(after.equals(await expectedAfterAssign(before, located, second, secondManifest.prefix))).toBe(true);
      const raw = join(temp.dir, 'after.raw');
      await writeFile(raw, after);
      for (const manifest of [firstManifest, secondManifest]) {
        for (const file of manifest.files) {
          const out = join(temp.dir, 'dumped');
          await debugfsRead(raw, `dump ${file.path} ${out}`);
          expect(sha256(await readFile(out)), file.path).toBe(file.sha256);
        }
      }
      expect((await execa('e2fsck', ['-fn', raw], { reject: false })).exitCode).toBe(0);
      await assertCleanImages([join(desktop.desktopDir, 'apps.2.qcow2'), desktop.userPath]);
      expect(existsSync(join(desktop.desktopDir, 'apps.1.qcow2'))).toBe(false);
    } finally {
      await temp.cleanup();
    }
  }, 120_000);
});

describe('recompose of fallocated placeholders (offline guest)', () => {
  let temp: { dir: string; cleanup: () => Promise<void> };
  let desktop: Desktop;
  let before: Buffer;
  let located: LocatedFile[];
  let expected: Buffer;

  beforeAll(async () => {
    temp = await tempDir('qlayer-recompose-unwritten-');
    desktop = await makeDesktop(temp.dir);
    await allocateFallocated(desktop, temp.dir);
    before = await qemuReadRaw(desktop.userPath);
    located = await locate(desktop, [desktop.manifest]);
    const appBytes = await expectedAfterAssign(before, located, desktop.appSource, desktop.manifest.prefix);
    expected = await withDebugfsFlip(appBytes, desktop.manifest.files.map((f) => f.path), temp.dir);
    await mkdir(join(temp.dir, 'planned'), { recursive: true });
    for (const f of ['apps.0.qcow2', 'user.qcow2']) await copyFile(join(desktop.desktopDir, f), join(temp.dir, 'planned', f));
  }, 120_000);
  afterAll(async () => temp?.cleanup());

  const restore = async (): Promise<void> => {
    for (const f of ['apps.1.qcow2']) await rm(join(desktop.desktopDir, f), { force: true });
    for (const f of ['apps.0.qcow2', 'user.qcow2']) await copyFile(join(temp.dir, 'planned', f), join(desktop.desktopDir, f));
    desktop.record = newDesktopRecord('base', 'desktops/alice');
    desktop.record.recompose = planAssign(desktop.record, [desktop.manifest], located);
  };

  it('locate takes all-unwritten placeholders without reading their stale bytes', () => {
    expect(located.filter((f) => f.size > 0).every((f) => f.unwritten === true)).toBe(true);
    // The stale bytes really are there: before the recompose the raw blocks are not zeros.
    const first = located.find((f) => f.size > 0)!.extents[0]!;
    expect(before.subarray(first.diskOffset, first.diskOffset + 4096).some((b) => b !== 0)).toBe(true);
  });

  it('assign: the disk equals app bytes plus debugfs\'s own flip, e2fsck clean, files dump as the app', async () => {
    await restore();
    const report = await runRecompose(context(desktop, { json: '' }));
    expect(report.extentsMarkedWritten).toBeGreaterThan(0);
    const after = await qemuReadRaw(desktop.userPath);
    expect(after.equals(expected), 'every byte matches the oracle').toBe(true);
    await assertCleanImages([join(desktop.desktopDir, 'apps.1.qcow2'), desktop.userPath]);
    const raw = join(temp.dir, 'after.raw');
    await writeFile(raw, after);
    const fsck = await execa('e2fsck', ['-fn', raw], { reject: false });
    expect(fsck.exitCode, fsck.stdout).toBe(0);
    for (const file of desktop.manifest.files) {
      expect((await debugfsLeaves(raw, file.path)).every((l) => !l.unwritten), file.path).toBe(true);
      const out = join(temp.dir, 'dumped');
      await debugfsRead(raw, `dump ${file.path} ${out}`);
      expect(sha256(await readFile(out)), file.path).toBe(file.sha256);
    }
  });

  it('a placeholder the user partly wrote is refused', async () => {
    await restore();
    const file = desktop.manifest.files.find((f) => f.size > 2 * BLOCK)!;
    const scratch = join(temp.dir, 'partly');
    await mkdir(scratch, { recursive: true });
    // As a user write into a fallocated file leaves it: its first block written, the rest not.
    const raw = join(scratch, 'r.raw');
    await writeFile(raw, await qemuReadRaw(desktop.userPath));
    const [leaf] = await debugfsLeaves(raw, file.path);
    expect(leaf).toMatchObject({ logical: 0, unwritten: true });
    await guestChange(desktop.userPath, scratch, [
      `extent_open ${file.path}`,
      'goto_block 0',
      `replace_node 0 1 ${leaf!.physical}`,
      `insert_node --after --uninit 1 ${leaf!.length - 1} ${leaf!.physical + 1}`,
      'extent_close',
    ]);
    await expect(locate(desktop, [desktop.manifest])).rejects.toThrow(/partly written after it was allocated/);
  });

  it.each([
    ['the process dies (written bytes stay)', false],
    ['the power fails (writes not yet fsynced are lost)', true],
  ])('stopped at any write or fsync, the flip included, %s: e2fsck clean, and a rerun reaches the oracle', async (_label, loseUnsyncedWrites) => {
    await restore();
    const counter = new FaultInjectingFileSystem(nodeFileSystem);
    await runRecompose(context(desktop, { json: '' }, counter));
    const total = counter.operations;
    for (let n = 1; n <= total; n++) {
      await restore();
      const persisted = { json: JSON.stringify(desktop.record) };
      const faulty = new FaultInjectingFileSystem(nodeFileSystem, { crashAtOperation: n, loseUnsyncedWrites });
      await expect(runRecompose(context(desktop, persisted, faulty))).rejects.toBeInstanceOf(InjectedCrash);
      // Stopped: a consistent filesystem in which every block reads as before or as after.
      const stopped = await qemuReadRaw(desktop.userPath);
      const raw = join(temp.dir, 'stopped.raw');
      await writeFile(raw, stopped);
      const fsck = await execa('e2fsck', ['-fn', raw], { reject: false });
      expect(fsck.exitCode, `crash at op ${n}/${total}: ${fsck.stdout}`).toBe(0);
      for (let i = 0; i < stopped.length; i += BLOCK) {
        const block = stopped.subarray(i, i + BLOCK);
        if (!block.equals(before.subarray(i, i + BLOCK)) && !block.equals(expected.subarray(i, i + BLOCK))) {
          // Only an inode table block may be in between: some of its placeholders' inodes flipped.
          const inodeTable = (await debugfsRead(raw, `icheck ${i / BLOCK}`)).includes('<block not found>');
          if (!inodeTable) throw new Error(`crash at op ${n}/${total}: block ${i / BLOCK} is neither before nor after`);
        }
      }
      desktop.record = JSON.parse(persisted.json) as DesktopRecord;
      await runRecompose(context(desktop, { json: '' }));
      expect((await qemuReadRaw(desktop.userPath)).equals(expected), `crash at op ${n}/${total}: rerun did not reach the oracle`).toBe(true);
      await assertCleanImages([join(desktop.desktopDir, 'apps.1.qcow2'), desktop.userPath]);
    }
  }, 600_000);
});
