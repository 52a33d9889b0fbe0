/**
 * A desktop's persistent home disk: `home.qcow2` in the desktop's folder, a qcow2 of its own
 * with no backing file. It is never recomposed and never part of the base <- apps <- user chain,
 * so a rebase onto another base keeps it whole. The guest mounts it at /home by its ext4 label
 * (`qlayer base import --prepare-home` adds the fstab line to the base).
 *
 * Both offline writes go through e2fsprogs, not through qlayer's own ext4 code, which only
 * reads (and flips extent flags): mke2fs formats the home disk at create time (seeded with the
 * base's /home, read by qlayer's reader: home-seed.ts), and debugfs writes the base's
 * /etc/fstab at import time. See docs/design.md, "The home disk".
 */
import { mkdir, mkdtemp, rename, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { openChain } from '../chain/chain.js';
import { convertImage } from '../chain/convert.js';
import { Ext4Error, openGuestFilesystem, type GuestFilesystem } from '../fs/index.js';
import { loadExeca } from '../io/external-program.js';
import { removeOnInterrupt } from '../io/interrupt.js';
import { LayerError } from './errors.js';
import { runGuestScript, type GuestShell } from './guest-script.js';
import { assertHomeFits, readHomeTree, writeHomeTree, type HomeSeed } from './home-seed.js';
import type { Log } from './log.js';

export const HOME_FILE = 'home.qcow2';
export const HOME_LABEL = 'qlayer-home';
/** The line `--prepare-home` adds: nofail, so a desktop without a home disk still boots. */
export const FSTAB_LINE = `LABEL=${HOME_LABEL} /home ext4 defaults,nofail 0 2`;

/** Smallest home disk: an ext4 with its journal and room for a user's dotfiles. */
export const MIN_HOME_BYTES = 64 * 1024 * 1024;
const MAX_HOME_BYTES = 16 * 1024 ** 4;

/** "20G", "512M", "1T", "1073741824": binary units, like qemu-img's sizes. */
export function parseHomeSize(text: string): number {
  const match = /^(\d+)([KMGT]?)i?B?$/i.exec(text.trim());
  if (!match) throw new LayerError('home.bad-size', `--home ${JSON.stringify(text)}: give a size such as 512M, 20G or 1T`);
  const unit = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 }[match[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  const bytes = Number(match[1]) * unit;
  if (bytes < MIN_HOME_BYTES) throw new LayerError('home.too-small', `--home ${text}: a home disk needs at least ${MIN_HOME_BYTES / 1048576} MiB`);
  if (bytes > MAX_HOME_BYTES) throw new LayerError('home.too-large', `--home ${text}: at most 16T`);
  return Math.ceil(bytes / 65536) * 65536;
}

async function run(program: string, args: string[], what: string): Promise<string> {
  const { execa } = await loadExeca();
  const result = await execa(program, args, { reject: false, env: { ...process.env, LC_ALL: 'C' } });
  if (result.failed || result.exitCode !== 0) {
    const missing = (result as { code?: string }).code === 'ENOENT';
    throw new LayerError(
      'home.tool-failed',
      missing ? `${what}: ${program} is not installed (e2fsprogs; scripts/setup-host.sh installs it)` : `${what}: ${program} failed (exit ${result.exitCode}): ${`${result.stderr}\n${result.stdout}`.trim().split('\n').slice(-3).join(' ')}`,
    );
  }
  return result.stdout;
}

/** mke2fs's words when the files given with -d do not fit. */
const OUT_OF_ROOM = /could not allocate (block|inode)|no (free )?space|not enough space/i;

/**
 * Make `path` (which must not exist): a qcow2 of `size` bytes holding an ext4 labelled
 * qlayer-home. With `base` (the base image's path), the disk starts with a copy of the base's
 * /home (see home-seed.ts), or refuses (home.too-small) when it does not fit; a base with no or
 * an empty /home gives an empty disk, as without `base`. mke2fs formats a sparse raw file
 * beside `path` (its zeroing punches holes, so it costs only the metadata and the copied
 * files), our converter turns it into qcow2 (zero clusters left out), and the result is renamed
 * into place: an interruption leaves no half-made home.qcow2, and no copy of the tree.
 * Returns what was seeded (null: nothing).
 */
export async function createHomeDisk(path: string, size: number, options: { base?: string; log?: Log } = {}): Promise<HomeSeed | null> {
  const log = options.log ?? (() => {});
  const raw = `${path}.raw.tmp`;
  const partial = `${path}.partial`;
  const forget = [removeOnInterrupt(raw), removeOnInterrupt(partial)];
  let work: string | undefined;
  try {
    await rm(raw, { force: true });
    await rm(partial, { force: true });
    // A base whose root qlayer cannot read (not ext, several candidates, a journal to replay)
    // still gets a home disk, empty as before seeding existed, and the log says why.
    let notSeeded: string | undefined;
    const unreadable = (error: Ext4Error): null => {
      notSeeded = `qlayer cannot read the base's root filesystem to copy its /home (${error.message})`;
      log(`the home disk starts empty: ${notSeeded}`);
      return null;
    };
    const seeding = options.base === undefined ? null : await withRootFilesystem(options.base, (filesystem) => seedFolder(filesystem, path, size, log), unreadable);
    if (seeding) {
      work = seeding.work;
      forget.push(seeding.forget);
    }
    const seed = seeding?.seed ?? null;
    for (const { path: skipped, reason } of seed?.skipped ?? []) log(`not copied to the home disk: ${skipped} (${reason})`);
    await writeFile(raw, '');
    await truncate(raw, size);
    // -b 4096: mke2fs picks 1 KiB blocks below 512 MiB. -m 0: no blocks held back for root on /home.
    // -E root_owner: the mount point is owned as the base's /home is (root's without a base);
    // mke2fs -d does not copy the top folder's own owner or mode.
    const tree = work === undefined ? [] : ['-d', join(work, 'home')];
    await run('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-m', '0', '-L', HOME_LABEL, '-E', `root_owner=${seeding?.rootOwner ?? '0:0'}`, ...tree, raw], 'formatting the home disk').catch((error: Error) => {
      if (work !== undefined && OUT_OF_ROOM.test(error.message)) throw new LayerError('home.too-small', `the base's /home does not fit a home disk of ${size} bytes (${error.message}); give a larger --home`);
      throw error;
    });
    const rootMode = seeding?.rootMode ?? 0o755;
    if (rootMode !== 0o755) await run('debugfs', ['-w', '-R', `sif / mode 040${rootMode.toString(8).padStart(4, '0')}`, raw], "giving the home disk's root the mode of the base's /home");
    await convertImage(raw, partial, { sourceFormat: 'raw', outputFormat: 'qcow2', sync: true });
    await rename(partial, path);
    // Said in the result too (desktop create --json), not only on stderr.
    if (seed === null && notSeeded !== undefined) return { files: 0, folders: 0, symlinks: 0, bytes: 0, skipped: [], notSeeded };
    return seed;
  } finally {
    await rm(raw, { force: true });
    await rm(partial, { force: true });
    if (work !== undefined) await rm(work, { recursive: true, force: true });
    for (const f of forget) f();
  }
}

/**
 * Copy the base's /home (`filesystem`) into a new folder beside `disk`, or return null when
 * there is nothing to copy. Refuses before copying anything when the tree does not fit `size`.
 */
async function seedFolder(filesystem: GuestFilesystem, disk: string, size: number, log: Log): Promise<{ work: string; forget: () => void; seed: HomeSeed; rootOwner: string; rootMode: number } | null> {
  const tree = await readHomeTree(filesystem);
  if (!tree) return null;
  assertHomeFits(tree, size);
  // Beside the disk (the store's filesystem has room for a copy of /home; /tmp may not), in a
  // folder only root can enter (mkdtemp makes it 0700): the copy keeps private files' modes.
  const work = await mkdtemp(join(dirname(disk), '.home-seed-'));
  const forget = removeOnInterrupt(work);
  try {
    await mkdir(join(work, 'home'), { mode: 0o700 });
    log(`copying the base's /home (${tree.entries.length} entries) to seed the home disk`);
    const seed = await writeHomeTree(filesystem, tree, join(work, 'home'));
    // The caller removes the folder (and then calls forget) once mke2fs has copied it.
    return { work, forget, seed, rootOwner: `${tree.root.uid}:${tree.root.gid}`, rootMode: tree.root.mode & 0o7777 };
  } catch (error) {
    await rm(work, { recursive: true, force: true });
    forget();
    throw error;
  }
}

/**
 * Run `use` on the base image's root filesystem, read by qlayer's ext4 code: the partition
 * openGuestFilesystem chooses (the only Linux partition or LV holding an ext filesystem), the
 * same one whose /etc/fstab the import wrote.
 */
async function withRootFilesystem<T>(image: string, use: (filesystem: GuestFilesystem) => Promise<T>, unreadable?: (error: Ext4Error) => T): Promise<T> {
  const chain = await openChain(image);
  try {
    let filesystem: GuestFilesystem;
    try {
      filesystem = await openGuestFilesystem(chain);
    } catch (error) {
      if (unreadable && error instanceof Ext4Error) return unreadable(error);
      throw error;
    }
    return await use(filesystem);
  } finally {
    await chain.close();
  }
}

/** The fstab line is there already (an earlier --prepare-home, or the administrator's). */
export function fstabMountsHome(fstab: string): boolean {
  return fstab.split('\n').some((line) => {
    const fields = line.trim().split(/\s+/);
    return !line.trim().startsWith('#') && fields[0] === `LABEL=${HOME_LABEL}` && fields[1] === '/home';
  });
}

export interface PreparedHome {
  /** False when the base's fstab already mounted the home disk. */
  changed: boolean;
  /** The partition (1-based; 0 = whole disk) whose /etc/fstab was written. */
  partition: number;
  fstab: string;
}

/**
 * Give the base image `image` (a qcow2 the import just wrote, not yet in the store's state)
 * the fstab line that mounts the home disk at /home, offline. qlayer's ext4 code reads the
 * current fstab and finds the root filesystem's partition; debugfs (e2fsprogs) writes the new
 * file into a raw copy, which is converted back over `image`; qlayer's reader then reads the
 * file back and must find exactly the new content, or the import fails.
 */
export async function prepareHomeMount(image: string, log: (message: string) => void = () => {}): Promise<PreparedHome> {
  const { offset, index, current, hasHome } = await readRoot(image);
  if (current !== null && fstabMountsHome(current)) return { changed: false, partition: index, fstab: current };
  const next = `${current === null || current === '' ? '' : current.endsWith('\n') ? current : `${current}\n`}${FSTAB_LINE}\n`;
  const work = await mkdtemp(join(tmpdir(), 'qlayer-home-'));
  const raw = `${image}.raw.tmp`;
  const forget = removeOnInterrupt(raw);
  try {
    log('writing /etc/fstab in the base (debugfs, on a raw copy)');
    await convertImage(image, raw, { sourceFormat: 'qcow2', outputFormat: 'raw' });
    const fstabFile = join(work, 'fstab');
    await writeFile(fstabFile, next, { mode: 0o644 });
    const commands = [
      ...(hasHome ? [] : ['mkdir /home', 'sif /home mode 040755']),
      ...(current === null ? [] : ['rm /etc/fstab']),
      `write ${fstabFile} /etc/fstab`,
      'sif /etc/fstab mode 0100644',
      'sif /etc/fstab uid 0',
      'sif /etc/fstab gid 0',
    ];
    const script = join(work, 'commands');
    await writeFile(script, `${commands.join('\n')}\n`);
    // debugfs exits 0 even when a command fails: what it wrote is checked by reading it back.
    await run('debugfs', ['-w', '-f', script, offset ? `${raw}?offset=${offset}` : raw], 'writing /etc/fstab');
    await run('e2fsck', ['-fn', offset ? `${raw}?offset=${offset}` : raw], 'checking the base after writing /etc/fstab').catch((error: Error) => {
      throw new LayerError('home.fstab-failed', `the base's filesystem is not clean after writing /etc/fstab: ${error.message}`);
    });
    await rm(image);
    await convertImage(raw, image, { sourceFormat: 'raw', outputFormat: 'qcow2', sync: true });
  } finally {
    await rm(raw, { force: true });
    await rm(work, { recursive: true, force: true });
    forget();
  }
  const after = await readRoot(image);
  if (after.current !== next || !after.hasHome) throw new LayerError('home.fstab-failed', `debugfs did not leave the expected /etc/fstab in the base (read back: ${JSON.stringify(after.current)})`);
  return { changed: true, partition: index, fstab: next };
}

/** The root filesystem's partition and its /etc/fstab (null when it has none), read by qlayer's ext4 code. */
async function readRoot(image: string): Promise<{ offset: number; index: number; current: string | null; hasHome: boolean }> {
  return withRootFilesystem(image, async (filesystem) => {
    const exists = async (path: string): Promise<'file' | 'dir' | 'other' | null> => {
      try {
        const info = await filesystem.lookup(path, { follow: false });
        return info.type === 'file' ? 'file' : info.type === 'dir' ? 'dir' : 'other';
      } catch (error) {
        if ((error as { code?: string }).code === 'fs.not-found') return null;
        throw error;
      }
    };
    const etc = await exists('/etc');
    if (etc !== 'dir') throw new LayerError('home.no-etc', `the base's root filesystem has no /etc folder: is it a Linux root filesystem?`);
    const fstab = await exists('/etc/fstab');
    if (fstab !== null && fstab !== 'file') throw new LayerError('home.fstab-not-file', `the base's /etc/fstab is not a regular file (a symlink?); qlayer does not write through it: add "${FSTAB_LINE}" to the fstab it names`);
    const home = await exists('/home');
    if (home !== null && home !== 'dir') throw new LayerError('home.not-dir', `the base's /home is not a folder; it cannot be the home disk's mount point`);
    return {
      offset: filesystem.partition.offset,
      index: filesystem.partition.index,
      current: fstab === null ? null : (await filesystem.readFile('/etc/fstab')).toString('utf8'),
      hasHome: home === 'dir',
    };
  });
}

export interface HomeMount {
  /** /home is a mount point in the guest. */
  mounted: boolean;
  /** Its source and type as /proc/mounts says (when mounted). */
  device?: string;
  fstype?: string;
}

/**
 * Whether the running guest mounted something at /home (its /proc/mounts, read through the
 * agent). It waits up to `waitSeconds` for the mount: with `nofail` systemd does not hold
 * local-fs.target for /home, so the guest agent can answer a second or so before /home is
 * mounted (seen on the Debian guest).
 */
export async function guestHomeMount(shell: GuestShell, waitSeconds = 30): Promise<HomeMount> {
  const script = `i=0\nwhile [ "$i" -lt ${Math.max(0, Math.floor(waitSeconds))} ] && ! grep -q ' /home ' /proc/mounts; do sleep 1; i=$((i + 1)); done\ncat /proc/mounts\n`;
  const mounts = await runGuestScript(shell, script, 'reading /proc/mounts', (waitSeconds + 60) * 1000);
  const line = mounts.split('\n').map((l) => l.split(' ')).find((fields) => fields[1] === '/home');
  return line ? { mounted: true, device: line[0]!, fstype: line[2]! } : { mounted: false };
}
