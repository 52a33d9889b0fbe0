import { existsSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HELPER_WRAPPER, allocatePlaceholders, allocationScript, checkGuestSpace, createdBeforeFailure, removalScript, removePlaceholders } from '../../src/layers/allocate.js';
import type { AppManifest } from '../../src/layers/app.js';
import { guestHelperPath, helperManifest, parseAllocatedLine } from '../../src/layers/guest-alloc.js';
import { GUEST_EXIT, runGuestScript, shellQuote, type GuestShell } from '../../src/layers/guest-script.js';

/**
 * The scripts (and the helper) run under busybox sh here, exactly as in the test guest, against
 * a scratch folder. writeFile is the agent's file upload; /run refuses it, as a guest without a
 * writable /run would, so uploads exercise the /tmp fallback and never touch the host's /run.
 */
const busybox: GuestShell = {
  async exec(path, args, options) {
    const result = await execa('busybox', ['sh', ...args], { input: options?.input ?? '', reject: false, encoding: 'utf8' });
    void path;
    return { exitCode: result.exitCode ?? 1, stdout: result.stdout, stderr: result.stderr };
  },
  async writeFile(path, data) {
    if (path.startsWith('/run/')) throw new Error(`guest-file-open ${path}: Permission denied`);
    writeFileSync(path, data, { mode: 0o666 });
  },
};

function manifestUnder(root: string): AppManifest {
  const prefix = join(root, "opt/it's app");
  return {
    format: 'qlayer-app/1',
    name: 'demo',
    version: '1',
    prefix,
    directories: [
      { path: prefix, mode: 0o755, uid: 0, gid: 0 },
      { path: `${prefix}/bin`, mode: 0o750, uid: 0, gid: 0 },
    ],
    files: [
      // 04755: owners are set before modes, or chown would clear the set-user-ID bit.
      { path: `${prefix}/bin/tool`, size: 12_345, mode: 0o4755, uid: 1000, gid: 1000, sha256: '', payloadOffset: 0 },
      { path: `${prefix}/empty`, size: 0, mode: 0o600, uid: 0, gid: 0, sha256: '', payloadOffset: 16384 },
      { path: `${prefix}/big`, size: (3 << 20) + 5, mode: 0o644, uid: 0, gid: 0, sha256: '', payloadOffset: 16384 },
    ],
    payloadSize: 16384 + (3 << 20) + 4096,
    createdAt: '',
  };
}

describe('guest scripts (run by busybox sh)', () => {
  it('quotes anything', async () => {
    const nasty = `a'b"c $(x) \`y\` \\ z`;
    const out = await runGuestScript(busybox, `printf %s ${shellQuote(nasty)}`, 'quote');
    expect(out).toBe(nasty);
  });

  it('allocate makes zero-filled files of exact sizes and modes, is rerunnable, and refuses foreign files', async () => {
    const root = mkdtempSync(join(tmpdir(), 'qlayer-alloc-'));
    const manifest = manifestUnder(root);
    await runGuestScript(busybox, allocationScript([manifest]), 'allocate');
    for (const file of manifest.files) {
      const info = statSync(file.path);
      expect(info.size).toBe(file.size);
      expect(info.mode & 0o7777).toBe(file.mode);
      expect(info.uid).toBe(file.uid);
      expect(readFileSync(file.path).every((b) => b === 0)).toBe(true);
    }
    expect(statSync(`${manifest.prefix}/bin`).mode & 0o7777).toBe(0o750);
    // An interrupted assign left the placeholders: running again is fine.
    await runGuestScript(busybox, allocationScript([manifest]), 'allocate');
    // A user file of another size at an app path is never overwritten.
    writeFileSync(manifest.files[0]!.path, 'user data');
    await expect(runGuestScript(busybox, allocationScript([manifest]), 'allocate')).rejects.toThrow(/already has .*bin\/tool/);
    expect(readFileSync(manifest.files[0]!.path, 'utf8')).toBe('user data');
  });

  it('removal deletes the files and empty app folders, and keeps folders the user filled', async () => {
    const root = mkdtempSync(join(tmpdir(), 'qlayer-alloc-'));
    const manifest = manifestUnder(root);
    await runGuestScript(busybox, allocationScript([manifest]), 'allocate');
    mkdirSync(`${manifest.prefix}/mine`);
    writeFileSync(`${manifest.prefix}/mine/notes`, 'keep');
    await runGuestScript(busybox, removalScript([manifest]), 'remove');
    for (const file of manifest.files) expect(() => statSync(file.path)).toThrow();
    expect(() => statSync(`${manifest.prefix}/bin`)).toThrow();
    expect(readFileSync(`${manifest.prefix}/mine/notes`, 'utf8')).toBe('keep');
  });
});

const KIB = 1024;
const helper = guestHelperPath();

/** A manifest whose paths hold quotes, $(x), backquotes, a newline and spaces, under `root`. */
function nastyManifest(root: string): AppManifest {
  const prefix = join(root, `opt/it's "app" $(touch pwned)`);
  const dir = `${prefix}/new\nline \`x\``;
  return {
    format: 'qlayer-app/1',
    name: 'nasty',
    version: '1',
    prefix,
    directories: [
      { path: prefix, mode: 0o755, uid: 0, gid: 0 },
      { path: dir, mode: 0o2750, uid: 0, gid: 1000 },
    ],
    files: [
      { path: `${dir}/tool $HOME`, size: 12_345, mode: 0o4755, uid: 1000, gid: 1000, sha256: '', payloadOffset: 0 },
      { path: `${prefix}/empty'`, size: 0, mode: 0o600, uid: 0, gid: 0, sha256: '', payloadOffset: 0 },
      { path: `${prefix}/big\\n`, size: (3 << 20) + 5, mode: 0o644, uid: 2, gid: 3, sha256: '', payloadOffset: 0 },
      { path: `${prefix}/small`, size: 5 * KIB, mode: 0o640, uid: 0, gid: 0, sha256: '', payloadOffset: 0 },
    ],
    payloadSize: 0,
    createdAt: '',
  };
}

/** filefrag -v's extent lines for a file: each one's flags say whether it is unwritten. */
async function extentLines(path: string): Promise<string[]> {
  const { stdout } = await execa('filefrag', ['-v', path]);
  return stdout.split('\n').filter((line) => /^\s*\d+:\s+\d+\.\.\s*\d+:/.test(line));
}

/** Run the helper binary itself, as the guest-exec does, on a manifest. */
async function runHelper(input: Buffer): Promise<{ exitCode: number; stdout: string; stderr: string }> {
  const result = await execa(helper!, [], { input, reject: false });
  return { exitCode: result.exitCode ?? -1, stdout: result.stdout, stderr: result.stderr };
}

/** A small loop-mounted ext4 (the test runs as root): real ext4 fallocate, and ENOSPC on demand. */
let scratch = '';
let ext4 = '';
let mounted = false;
let mountProblem = '';

beforeAll(async () => {
  scratch = mkdtempSync(join(tmpdir(), 'qlayer-alloc-ext4-'));
  const image = join(scratch, 'fs.img');
  ext4 = join(scratch, 'mnt');
  mkdirSync(ext4);
  try {
    await execa('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', image, '32M']);
    await execa('mount', ['-o', 'loop', image, ext4]);
    mounted = true;
  } catch (error) {
    mountProblem = (error as Error).message.split('\n')[0] ?? 'mount failed';
  }
});

afterAll(async () => {
  if (mounted) await execa('umount', [ext4]);
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

/** A fresh folder on the loop ext4, or a skipped test where loop mounts are not allowed. */
function ext4Folder(skip: (note: string) => void, name: string): string {
  if (!mounted) skip(`no loop-mounted ext4: ${mountProblem}`);
  const dir = join(ext4, name);
  mkdirSync(dir);
  return dir;
}

describe.skipIf(helper === null)('guest allocation helper (native/build/qlayer-guest-alloc, run on the host)', () => {
  it('fallocates exact sizes with unwritten extents, modes and owners, on any path bytes; rerunnable', async ({ skip }) => {
    const root = ext4Folder(skip, 'fallocate');
    const manifest = nastyManifest(root);
    const first = await runHelper(helperManifest([manifest], 'auto'));
    expect(first.stderr).toBe('');
    expect(first.exitCode).toBe(0);
    expect(parseAllocatedLine(first.stdout)).toEqual({ files: 4, fallocated: 3, zeroFilled: 0, empty: 1, kept: 0, dirs: 2 });
    expect(existsSync(join(root, 'pwned'))).toBe(false);
    for (const file of manifest.files) {
      const info = lstatSync(file.path);
      expect(info.isFile()).toBe(true);
      expect(info.size).toBe(file.size);
      expect(info.mode & 0o7777).toBe(file.mode);
      expect([info.uid, info.gid]).toEqual([file.uid, file.gid]);
      // Blocks are reserved for the whole size, and every extent is unwritten: no data written.
      expect(info.blocks * 512).toBeGreaterThanOrEqual(file.size);
      const extents = await extentLines(file.path);
      if (file.size > 0) expect(extents.length).toBeGreaterThan(0);
      for (const line of extents) expect(line).toMatch(/unwritten/);
      expect(readFileSync(file.path).every((b) => b === 0)).toBe(true);
    }
    const dir = statSync(manifest.directories[1]!.path);
    expect([dir.mode & 0o7777, dir.uid, dir.gid]).toEqual([0o2750, 0, 1000]);
    // An interrupted assign left the placeholders: running again keeps them, untouched.
    const again = await runHelper(helperManifest([manifest], 'auto'));
    expect(again.exitCode).toBe(0);
    expect(parseAllocatedLine(again.stdout)).toMatchObject({ files: 4, fallocated: 0, kept: 4 });
    for (const line of await extentLines(manifest.files[0]!.path)) expect(line).toMatch(/unwritten/);
  });

  it('the zeros option writes real zeros: no unwritten extents', async ({ skip }) => {
    const root = ext4Folder(skip, 'zeros');
    const manifest = nastyManifest(root);
    const result = await runHelper(helperManifest([manifest], 'zeros'));
    expect(result.exitCode).toBe(0);
    expect(parseAllocatedLine(result.stdout)).toMatchObject({ files: 4, fallocated: 0, zeroFilled: 3, empty: 1 });
    for (const file of manifest.files) {
      expect(statSync(file.path).size).toBe(file.size);
      for (const line of await extentLines(file.path)) expect(line).not.toMatch(/unwritten/);
      expect(readFileSync(file.path).every((b) => b === 0)).toBe(true);
    }
  });

  it('refuses what is not its placeholder (exit 3, named, untouched): wrong size, symlink, a file where a folder goes', async () => {
    const root = mkdtempSync(join(tmpdir(), 'qlayer-alloc-refuse-'));
    const manifest = nastyManifest(root);
    expect((await runHelper(helperManifest([manifest], 'auto'))).exitCode).toBe(0);
    const tool = manifest.files[0]!.path;
    writeFileSync(tool, 'user data');
    const wrongSize = await runHelper(helperManifest([manifest], 'auto'));
    expect(wrongSize.exitCode).toBe(GUEST_EXIT.exists);
    expect(wrongSize.stderr).toBe(`qlayer-guest-alloc: ${tool}\n`.trimEnd());
    expect(readFileSync(tool, 'utf8')).toBe('user data');

    rmSync(tool);
    const target = join(root, 'target');
    writeFileSync(target, Buffer.alloc(12_345));
    symlinkSync(target, tool); // the right size behind a symlink is still not ours
    const link = await runHelper(helperManifest([manifest], 'auto'));
    expect(link.exitCode).toBe(GUEST_EXIT.exists);
    expect(lstatSync(tool).isSymbolicLink()).toBe(true);

    const notFolder = { ...manifest, directories: [{ path: target, mode: 0o755, uid: 0, gid: 0 }], files: [] };
    const folder = await runHelper(helperManifest([notFolder], 'auto'));
    expect(folder.exitCode).toBe(GUEST_EXIT.exists);
    expect(folder.stderr).toContain(`${target} (not a folder)`);
    rmSync(root, { recursive: true, force: true });
  });

  it('a full filesystem is exit 5 naming the path and the bytes wanted, and leaves no partial file', async ({ skip }) => {
    const root = ext4Folder(skip, 'full');
    const manifest = nastyManifest(root);
    manifest.files[2]!.size = 64 << 20; // twice the whole filesystem
    for (const placeholders of ['auto', 'zeros'] as const) {
      const result = await runHelper(helperManifest([manifest], placeholders));
      expect(result.exitCode).toBe(GUEST_EXIT.noSpace);
      expect(result.stderr).toContain(`${manifest.files[2]!.path}: no space for ${64 << 20} bytes: No space left on device`);
      expect(existsSync(manifest.files[2]!.path)).toBe(false);
    }
    // Through allocatePlaceholders it is a LayerError with its own code.
    await expect(allocatePlaceholders(busybox, [manifest])).rejects.toMatchObject({ code: 'allocate.no-space' });
  });

  it('refuses a manifest it cannot read (exit 6), before touching anything', async () => {
    const root = mkdtempSync(join(tmpdir(), 'qlayer-alloc-bad-'));
    const bad = await runHelper(Buffer.from(['qlayer-guest-alloc/1', 'd', `${root}/x`, '755', ''].join('\0')));
    expect(bad.exitCode).toBe(GUEST_EXIT.badInput);
    const foreign = await runHelper(Buffer.from('qlayer-guest-alloc/2\0'));
    expect(foreign.exitCode).toBe(GUEST_EXIT.badInput);
    expect(readdirSync(root)).toEqual([]);
    rmSync(root, { recursive: true, force: true });
  });
});

describe('allocatePlaceholders: helper first, the script where the helper cannot run', () => {
  it.skipIf(helper === null)('uses the helper (uploaded, run once, removed) and reports fallocate counts', async ({ skip }) => {
    const root = ext4Folder(skip, 'through-api');
    const manifest = nastyManifest(root);
    const before = readdirSync('/tmp').filter((n) => n.startsWith('.qlayer-guest-alloc-'));
    const result = await allocatePlaceholders(busybox, [manifest]);
    expect(result).toMatchObject({ method: 'helper', files: 4, fallocated: 3, zeroFilled: 0, empty: 1, processes: 5 });
    expect(readdirSync('/tmp').filter((n) => n.startsWith('.qlayer-guest-alloc-'))).toEqual(before);
    for (const line of await extentLines(manifest.files[0]!.path)) expect(line).toMatch(/unwritten/);
    // A foreign file is refused with the path named, without the helper's tag.
    writeFileSync(manifest.files[3]!.path, 'mine');
    await expect(allocatePlaceholders(busybox, [manifest])).rejects.toThrow(`the guest already has ${manifest.files[3]!.path}; refusing`);
  });

  it('falls back to the script when the helper cannot run (exit 127, or a shell that never ran it)', async () => {
    const fakes = mkdtempSync(join(tmpdir(), 'qlayer-alloc-fake-'));
    const cases: Array<[string, RegExp]> = [
      ['#!/bin/sh\nexit 127\n', /exit 127/],
      // busybox sh runs a binary of another architecture as a script: a syntax error, no tag.
      ['#!/bin/sh\necho "line 9: syntax error: unexpected )" >&2; exit 2\n', /exit 2: line 9: syntax error/],
    ];
    for (const [index, [body, reason]] of cases.entries()) {
      const fake = join(fakes, `helper-${index}`);
      writeFileSync(fake, body);
      const root = mkdtempSync(join(tmpdir(), 'qlayer-alloc-'));
      const manifest = manifestUnder(root);
      const result = await allocatePlaceholders(busybox, [manifest], { helper: fake });
      expect(result.method).toBe('script');
      expect(result.helperSkipped).toMatch(reason);
      expect(result).toMatchObject({ files: 3, fallocated: 0, zeroFilled: 2, empty: 1 });
      for (const file of manifest.files) expect(statSync(file.path).size).toBe(file.size);
      rmSync(root, { recursive: true, force: true });
    }
    rmSync(fakes, { recursive: true, force: true });
  });

  it('the wrapper never runs a helper built for another machine (exit 127), and removes it either way', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'qlayer-alloc-wrapper-'));
    const fake = join(dir, 'helper');
    const ran = join(dir, 'ran');
    const machine = (await execa('uname', ['-m'])).stdout.trim();
    for (const [built, exitCode] of [['aarch64-or-other', 127], [machine, 0]] as const) {
      writeFileSync(fake, `#!/bin/sh\ntouch ${shellQuote(ran)}\n`);
      const result = await busybox.exec('/bin/sh', ['-c', HELPER_WRAPPER, 'sh', fake, built]);
      expect(result.exitCode).toBe(exitCode);
      expect(existsSync(ran)).toBe(exitCode === 0);
      expect(existsSync(fake)).toBe(false);
    }
    rmSync(dir, { recursive: true, force: true });
  });

  it('the script writes zeros with grouped chmod/chown: a few programs per file at most, whatever the count', async () => {
    const root = mkdtempSync(join(tmpdir(), 'qlayer-alloc-many-'));
    const manifest = nastyManifest(root);
    for (let i = 0; i < 200; i++) {
      manifest.files.push({ path: `${manifest.prefix}/f${i}`, size: 1 + (i % 8) * KIB, mode: i % 2 ? 0o644 : 0o755, uid: i % 3, gid: 0, sha256: '', payloadOffset: 0 });
    }
    const script = allocationScript([manifest]);
    expect(script.match(/^chmod /gm)).toHaveLength(6); // one per mode
    expect(script.match(/^chown /gm)).toHaveLength(6); // one per owner
    const result = await allocatePlaceholders(busybox, [manifest], { helper: null });
    expect(result).toMatchObject({ method: 'script', files: 204, zeroFilled: 203, empty: 1, dirs: 2 });
    // sh, mkdir, one head per file (dd + head for the 3 MiB + 5 one), chown x6, chmod x6, sync.
    expect(result.processes).toBe(1 + 1 + 204 + 6 + 6 + 1);
    expect(existsSync(join(root, 'pwned'))).toBe(false);
    for (const file of manifest.files) {
      const info = statSync(file.path);
      expect([info.size, info.mode & 0o7777, info.uid, info.gid]).toEqual([file.size, file.mode, file.uid, file.gid]);
    }
    expect(readFileSync(manifest.files[2]!.path).every((b) => b === 0)).toBe(true);
    rmSync(root, { recursive: true, force: true });
  });
});

it('the script chunks grouped chmod/chown/mkdir under the argument budget', () => {
  const root = `/opt/${'long-name-'.repeat(10)}`;
  const manifest = manifestUnder(root);
  for (let i = 0; i < 3000; i++) manifest.files.push({ path: `${root}/${'x'.repeat(100)}-${i}`, size: 1, mode: 0o644, uid: 0, gid: 0, sha256: '', payloadOffset: 0 });
  const lines = allocationScript([manifest]).split('\n');
  const chmods = lines.filter((l) => l.startsWith('chmod -- 0644 '));
  expect(chmods.length).toBeGreaterThan(1);
  for (const line of lines) expect(line.length).toBeLessThan(66 * KIB);
  // Every path is in exactly one chown group.
  const chowned = lines.filter((l) => l.startsWith('chown ')).join(' ');
  for (const file of manifest.files) expect(chowned.split(shellQuote(file.path)).length).toBe(2);
});

/** Every path under `root`, sorted: what the guest's folder holds. */
function tree(root: string): string[] {
  const out: string[] = [];
  const walk = (dir: string): void => {
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      out.push(path);
      if (lstatSync(path).isDirectory()) walk(path);
    }
  };
  if (existsSync(root)) walk(root);
  return out.sort();
}

describe('undoing an allocation: the placeholders it made, and only those', () => {
  it.each([
    ['the helper', undefined],
    ['the script', null],
  ] as const)('%s deletes untouched placeholders and empty folders, and leaves a file the user wrote', async (_label, helperChoice, ) => {
    const root = mkdtempSync(join(ext4 && mounted ? ext4 : tmpdir(), 'undo-'));
    mkdirSync(join(root, 'opt'));
    writeFileSync(join(root, 'opt', 'keep.txt'), 'the user\'s'); // existed before: never touched
    const before = tree(root);
    const manifest = nastyManifest(root);
    const allocation = await allocatePlaceholders(busybox, [manifest], helperChoice === null ? { helper: null } : {});
    const created = allocation.created ?? { files: manifest.files.map((f) => ({ path: f.path, size: f.size })), dirs: manifest.directories.map((d) => d.path) };
    if (helperChoice !== null && helper !== null) {
      expect(created.files.map((f) => f.path).sort()).toEqual(manifest.files.map((f) => f.path).sort());
      expect(created.dirs).toContain(manifest.prefix); // made by this run, unlike root/opt
      expect(created.dirs).not.toContain(join(root, 'opt'));
    }
    // The user writes into one placeholder: it is theirs now.
    const touched = manifest.files[3]!.path;
    writeFileSync(touched, Buffer.alloc(manifest.files[3]!.size, 7));
    const undone = await removePlaceholders(busybox, created, helperChoice === null ? { helper: null } : {});
    expect(undone).toMatchObject({ removed: 3, left: [touched], missing: 0 });
    expect(tree(root)).toEqual([...before, manifest.prefix, touched].sort());
    expect(readFileSync(join(root, 'opt', 'keep.txt'), 'utf8')).toBe("the user's");
    // Again: nothing left to remove, nothing the user made goes.
    const again = await removePlaceholders(busybox, created, helperChoice === null ? { helper: null } : {});
    expect(again).toMatchObject({ removed: 0, missing: 3, left: [touched] });
    rmSync(root, { recursive: true, force: true });
  });

  it.skipIf(helper === null)('a full filesystem half-way: the error says what was made, and undoing it leaves the folder as before', async ({ skip }) => {
    const root = ext4Folder(skip, 'undo-full');
    const before = tree(root);
    const manifest = nastyManifest(root);
    manifest.files[2]!.size = 64 << 20; // the third file does not fit; the first two were made
    const error = await allocatePlaceholders(busybox, [manifest]).then(
      () => null,
      (e: unknown) => e,
    );
    expect(error).toMatchObject({ code: 'allocate.no-space' });
    const created = createdBeforeFailure(error);
    expect(created?.files.map((f) => f.path)).toEqual([manifest.files[0]!.path, manifest.files[1]!.path, manifest.files[2]!.path]);
    await removePlaceholders(busybox, created!);
    expect(tree(root)).toEqual(before);
  });

  it('checks free space first and refuses with both numbers', async ({ skip }) => {
    const root = ext4Folder(skip, 'space');
    const manifest = nastyManifest(root);
    manifest.files[2]!.size = 40 << 20; // the filesystem has 32 MiB in all
    await expect(checkGuestSpace(busybox, [manifest])).rejects.toThrow(/^nasty@1 needs \d+\.\d MiB on the guest filesystem holding \S*space \(.*\), which has \d+\.\d MiB free; nothing was made in the guest$/);
    expect(tree(root)).toEqual([]);
    // Where it fits (the host's big /tmp), the answer names the nearest existing parent.
    const roomy = mkdtempSync(join(tmpdir(), 'qlayer-space-'));
    const ok = await checkGuestSpace(busybox, [nastyManifest(roomy)]);
    expect(ok.free).toBeGreaterThan(ok.needed);
    expect(ok.filesystem).toBe(roomy);
    rmSync(roomy, { recursive: true, force: true });
  });

  it('counts each app on the filesystem its prefix is on, and names only the one short of space', async ({ skip }) => {
    // Two apps on two host filesystems (the disk's /tmp and the tmpfs /dev/shm): each is counted
    // where it goes, with its own margin.
    if (!existsSync('/dev/shm')) skip('no /dev/shm');
    const onDisk = mkdtempSync(join(tmpdir(), 'qlayer-space-'));
    const onShm = mkdtempSync('/dev/shm/qlayer-space-');
    const a = nastyManifest(onDisk);
    const b = { ...nastyManifest(onShm), name: 'other' };
    const fits = await checkGuestSpace(busybox, [a, b]);
    expect(fits.filesystems.map((f) => [f.mountPoint, f.apps])).toEqual(expect.arrayContaining([['/dev/shm', ['other@1']], [expect.any(String), ['nasty@1']]]));
    expect(fits.filesystems).toHaveLength(2);
    for (const f of fits.filesystems) expect(f.free).toBeGreaterThan(f.needed);
    // On the small ext4 (32 MiB in all) the same app is too big: only it is named, with its own numbers.
    const small = nastyManifest(ext4Folder(skip, 'space-split'));
    const error = await checkGuestSpace(busybox, [small, b]).then(() => null, (e: Error) => e);
    expect(error?.message).toMatch(/^nasty@1 needs \d+\.\d MiB on the guest filesystem holding .*space-split.*, which has \d+\.\d MiB free; nothing was made in the guest$/);
    expect(error?.message).not.toContain('other@1');
    rmSync(onDisk, { recursive: true, force: true });
    rmSync(onShm, { recursive: true, force: true });
  });
});
