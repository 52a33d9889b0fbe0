/**
 * A new desktop's home disk starts with the base's /home (home-seed.ts, createHomeDisk), checked
 * against tools we did not write: mke2fs -d makes the base from a host folder, debugfs reads
 * both the base and the home disk (stat for mode, owner, group, size, mtime; rdump for contents
 * and symlink targets), e2fsck and qemu-img check find the home disk clean. No guest boots.
 */
import { createHash } from 'node:crypto';
import { lstat, mkdir, readdir, readFile, readlink, symlink, truncate, utimes, writeFile } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { importBase } from '../../src/layers/bases.js';
import { createDesktop } from '../../src/layers/desktop-lifecycle.js';
import { Store } from '../../src/layers/store.js';
import { qemuCheck, tempDir } from '../helpers/qemu.js';

let temp: { dir: string; cleanup: () => Promise<void> };
let store: Store;
const OLD_MTIME = 981173106; // 2001-02-03 04:05:06 UTC

/** A host folder holding a small Linux root: /etc/fstab and the given /home contents. */
async function rootFolder(name: string, home: (dir: string) => Promise<void>): Promise<string> {
  const root = join(temp.dir, name);
  await mkdir(join(root, 'etc'), { recursive: true });
  await writeFile(join(root, 'etc', 'fstab'), '# static file system information\n');
  await mkdir(join(root, 'home'), { mode: 0o755 });
  await home(join(root, 'home'));
  return root;
}

/** A raw disk holding an ext4 made from `root` by mke2fs -d. */
async function baseDisk(root: string, size: string): Promise<string> {
  const disk = `${root}.raw`;
  await execa('truncate', ['-s', size, disk]);
  await execa('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-d', root, disk]);
  return disk;
}

async function toRaw(image: string): Promise<string> {
  const out = `${image}.check.raw`;
  await execa('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, out]);
  return out;
}

/** What debugfs says of one inode: the fields the seeding must keep. */
async function debugfsStat(disk: string, path: string): Promise<Record<string, string>> {
  const { stdout } = await execa('debugfs', ['-R', `stat "${path}"`, disk]);
  const field = (pattern: RegExp): string => {
    const match = pattern.exec(stdout);
    if (!match) throw new Error(`debugfs stat ${path}: no ${pattern} in\n${stdout}`);
    return match[1]!;
  };
  return {
    type: field(/Type: (\S+)/),
    mode: field(/Mode:\s+(\d+)/),
    uid: field(/User:\s+(\d+)/),
    gid: field(/Group:\s+(\d+)/),
    size: field(/Size: (\d+)/),
    mtime: field(/mtime: (0x[0-9a-f]+)/),
  };
}

/** Every path under `dir` (relative, sorted), from a host folder. */
async function walk(dir: string, under = dir): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    out.push(relative(under, path));
    if (entry.isDirectory()) out.push(...(await walk(path, under)));
  }
  return out.sort();
}

/** rdump of a disk's folder into a fresh host folder; returns the dumped copy of `path`. */
async function rdump(disk: string, path: string, name: string): Promise<string> {
  const out = join(temp.dir, name);
  await mkdir(out);
  await execa('debugfs', ['-R', `rdump "${path}" ${out}`, disk]);
  return out;
}

const sha256 = async (path: string): Promise<string> => createHash('sha256').update(await readFile(path)).digest('hex');

beforeAll(async () => {
  temp = await tempDir('qlayer-home-seed-');
  store = await Store.open(join(temp.dir, 'store'));
});
afterAll(async () => temp?.cleanup());

describe('home disk seeded from the base', () => {
  it("copies the base's /home: modes, owners, mtimes, symlinks, empty folders, contents; skips and names a FIFO", async () => {
    const root = await rootFolder('os', async (home) => {
      const alice = join(home, 'alice');
      await mkdir(join(alice, 'bin'), { recursive: true });
      await mkdir(join(alice, '.cache', 'deep', 'empty'), { recursive: true });
      await writeFile(join(alice, '.bashrc'), 'export PS1="$ "\n', { mode: 0o600 });
      await writeFile(join(alice, 'bin', 'run.sh'), '#!/bin/sh\necho hi\n', { mode: 0o755 });
      await writeFile(join(alice, 'old.txt'), 'from another century\n', { mode: 0o644 });
      await utimes(join(alice, 'old.txt'), OLD_MTIME, OLD_MTIME);
      // Over 1 MiB, with a run of zeros in the middle (left as a hole on the home disk).
      const big = Buffer.alloc(3 * 1048576 + 12345);
      for (let i = 0; i < big.length; i += 1) if (i < 1048576 || i > 2 * 1048576) big[i] = (i * 7919) % 251;
      await writeFile(join(alice, 'big.bin'), big, { mode: 0o640 });
      await symlink('.bashrc', join(alice, 'profile-link'));
      await symlink(`/home/alice/${'long-target-'.repeat(8)}`, join(alice, 'slow-link')); // >60 bytes: not in the inode
      await execa('chown', ['-R', '-h', '1000:1000', alice]);
      await execa('chmod', ['0700', alice]);
      await execa('mkfifo', [join(home, 'pipe')]);
    });
    const disk = await baseDisk(root, '256M');
    await importBase(store, 'os', disk, { format: 'raw', prepareHome: true });

    const log: string[] = [];
    const created = await createDesktop(store, 'd', 'os', { homeBytes: 128 * 1048576, log: (m) => log.push(m) });
    const expected = (await walk(join(root, 'home'))).filter((p) => p !== 'pipe');
    const hostFiles = await Promise.all(expected.map(async (p) => lstat(join(root, 'home', p))));
    expect(created.homeSeed).toEqual({
      files: hostFiles.filter((s) => s.isFile()).length,
      folders: hostFiles.filter((s) => s.isDirectory()).length,
      symlinks: hostFiles.filter((s) => s.isSymbolicLink()).length,
      bytes: hostFiles.filter((s) => s.isFile()).reduce((sum, s) => sum + s.size, 0),
      skipped: [{ path: '/home/pipe', reason: 'fifo' }],
    });
    expect(log.join('\n')).toMatch(/not copied to the home disk: \/home\/pipe \(fifo\)/);

    const home = join(store.path(created.dir), 'home.qcow2');
    expect(await qemuCheck(home)).toMatchObject({ corruptions: 0, leaks: 0 });
    const homeRaw = await toRaw(home);
    const baseRaw = await toRaw(store.path('bases', 'os.qcow2'));
    expect((await execa('e2fsck', ['-fn', homeRaw], { reject: false })).exitCode).toBe(0);
    expect((await execa('dumpe2fs', ['-h', homeRaw])).stdout).toMatch(/^Filesystem volume name:\s+qlayer-home$/m);

    // Each path: the same inode fields on the home disk as in the base.
    for (const path of expected) {
      const inBase = await debugfsStat(baseRaw, `/home/${path}`);
      expect({ path, ...(await debugfsStat(homeRaw, `/${path}`)) }).toEqual({ path, ...inBase });
    }
    expect((await debugfsStat(homeRaw, '/alice/old.txt')).mtime).toBe(`0x${OLD_MTIME.toString(16)}`);
    expect(await debugfsStat(homeRaw, '/alice')).toMatchObject({ mode: '0700', uid: '1000', gid: '1000' });
    expect(await debugfsStat(homeRaw, '/')).toMatchObject({ mode: '0755', uid: '0', gid: '0' });
    const top = (await execa('debugfs', ['-R', 'ls -p /', homeRaw])).stdout;
    expect(top).not.toMatch(/\/pipe\//);

    // Contents and symlink targets, through debugfs's own copy of each tree.
    const fromBase = await rdump(baseRaw, '/home/alice', 'dump-base');
    const fromHome = await rdump(homeRaw, '/alice', 'dump-home');
    for (const path of expected.filter((p) => p.startsWith('alice/'))) {
      const a = join(fromBase, path);
      const b = join(fromHome, path);
      const info = await lstat(a);
      if (info.isFile()) expect({ path, hash: await sha256(b) }).toEqual({ path, hash: await sha256(a) });
      if (info.isSymbolicLink()) expect({ path, target: await readlink(b) }).toEqual({ path, target: await readlink(a) });
    }
    expect(await sha256(join(fromHome, 'alice', 'big.bin'))).toBe(await sha256(join(root, 'home', 'alice', 'big.bin')));
    expect((await readdir(join(fromHome, 'alice', '.cache', 'deep', 'empty'))).length).toBe(0);
    // No copy of the tree is left beside the disk.
    expect((await readdir(store.path(created.dir))).filter((f) => f.startsWith('.home-seed-') || f.endsWith('.tmp'))).toEqual([]);
  }, 180_000);

  it('a base with an empty /home, or none: an empty home disk, as before', async () => {
    const emptyHome = await rootFolder('bare', async () => {});
    await importBase(store, 'bare', await baseDisk(emptyHome, '64M'), { format: 'raw', prepareHome: true });
    const created = await createDesktop(store, 'e', 'bare', { homeBytes: 64 * 1048576 });
    expect(created.homeSeed).toBeUndefined();
    const homeRaw = await toRaw(join(store.path(created.dir), 'home.qcow2'));
    expect((await execa('debugfs', ['-R', 'ls -p /', homeRaw])).stdout.trim().split('\n').map((l) => l.split('/')[5])).toEqual(['.', '..', 'lost+found']);
    expect((await execa('e2fsck', ['-fn', homeRaw], { reject: false })).exitCode).toBe(0);

    // A base qlayer cannot read (no ext filesystem at all): an empty home disk, and the log says why.
    const blank = join(temp.dir, 'blank.raw');
    await execa('truncate', ['-s', '16M', blank]);
    await importBase(store, 'blank', blank, { format: 'raw' });
    const log: string[] = [];
    const onBlank = await createDesktop(store, 'b', 'blank', { homeBytes: 64 * 1048576, log: (m) => log.push(m) });
    expect(onBlank.homeSeed).toMatchObject({ files: 0, skipped: [], notSeeded: expect.stringMatching(/^qlayer cannot read the base's root filesystem/) });
    expect(log).toEqual([expect.stringMatching(/^the home disk starts empty: qlayer cannot read the base's root filesystem/)]);
    expect((await execa('e2fsck', ['-fn', await toRaw(join(store.path(onBlank.dir), 'home.qcow2'))], { reject: false })).exitCode).toBe(0);
  }, 120_000);

  it('a name that is not UTF-8 is skipped and named, not a failed create', async () => {
    const root = await rootFolder('latin1', async (home) => {
      await writeFile(join(home, 'ok.txt'), 'fine\n');
      await writeFile(Buffer.concat([Buffer.from(`${home}/caf`), Buffer.from([0xe9])]), 'latin-1 name\n');
    });
    await importBase(store, 'latin1', await baseDisk(root, '64M'), { format: 'raw', prepareHome: true });
    const created = await createDesktop(store, 'l', 'latin1', { homeBytes: 64 * 1048576 });
    expect(created.homeSeed).toEqual({ files: 1, folders: 0, symlinks: 0, bytes: 5, skipped: [{ path: '/home/caf\uFFFD', reason: 'a name that is not UTF-8' }] });
  }, 120_000);

  it('a /home too big for --home 64M: refused (home.too-small), nothing left in the store', async () => {
    const root = await rootFolder('fat', async (home) => {
      await mkdir(join(home, 'bob'));
      await writeFile(join(home, 'bob', 'movie.mkv'), '');
      await truncate(join(home, 'bob', 'movie.mkv'), 100 * 1048576); // sparse: a cheap base
    });
    await importBase(store, 'fat', await baseDisk(root, '256M'), { format: 'raw', prepareHome: true });
    const state = await readFile(store.path('state.json'), 'utf8');
    const before = await walk(store.root);
    await expect(createDesktop(store, 'f', 'fat', { homeBytes: 64 * 1048576 })).rejects.toMatchObject({
      code: 'home.too-small',
      message: expect.stringMatching(/does not fit a home disk of 64 MiB.*larger --home/),
    });
    expect(await walk(store.root)).toEqual(before);
    expect(await readFile(store.path('state.json'), 'utf8')).toBe(state);
  }, 120_000);
});
