/**
 * Bases: the read-only images desktops are built on. Imported once (flattened into the store),
 * never written again, removed only when no desktop uses them.
 */
import { chmod, open, rename, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { convertImage } from '../chain/convert.js';
import { removeOnInterrupt } from '../io/interrupt.js';
import { LayerError } from './errors.js';
import { prepareHomeMount } from './home-disk.js'; // home disk (issue 13)
import type { Log } from './log.js';
import { checkName } from './names.js';
import type { BaseRecord } from './state.js';
import type { Store } from './store.js';

/**
 * Import a base image: flattened (its whole backing chain read through) into a new qcow2 in the
 * store, then made read-only. Nothing in the store ever opens it for writing again.
 */
export async function importBase(
  store: Store,
  name: string,
  image: string,
  options: { format?: 'qcow2' | 'raw'; progress?: (done: number, total: number) => void; allowedDirectories?: string[]; prepareHome?: boolean; log?: Log } = {},
): Promise<BaseRecord> {
  checkName('base', name);
  return store.withLock(async () => {
    const state = await store.readState();
    if (state.bases[name]) throw new LayerError('base.exists', `the store already has a base named ${name}; bases are immutable`);
    const file = join('bases', `${name}.qcow2`);
    const target = store.path(file);
    const partial = `${target}.importing`;
    // A leftover of an import that was killed (SIGKILL leaves it): nobody else can be writing
    // it, since importing holds the store lock.
    await rm(partial, { force: true });
    const forgetPartial = removeOnInterrupt(partial);
    try {
      const result = await convertImage(image, partial, {
        sourceFormat: options.format ?? (await sniffFormat(image)),
        outputFormat: 'qcow2',
        ...(options.allowedDirectories ? { allowedDirectories: options.allowedDirectories } : {}),
        sync: true,
        ...(options.progress ? { progress: options.progress } : {}),
      });
      if (result.virtualSize < MIN_BASE_BYTES) {
        throw new LayerError(
          'base.too-small',
          `${image} is ${result.virtualSize} bytes: too small to hold a guest's disk (at least ${MIN_BASE_BYTES} bytes: a partition table and a filesystem); nothing was imported`,
        );
      }
      // home disk (issue 13): the fstab line that mounts a desktop's home disk at /home.
      if (options.prepareHome) await prepareHomeMount(partial, options.log);
      // Read-only, and for the owner and group alone: a base holds whatever its guest had.
      await chmod(partial, 0o440);
      await rename(partial, target);
      const record: BaseRecord = { file, virtualSize: result.virtualSize, importedFrom: image, importedAt: new Date().toISOString() };
      state.bases[name] = record;
      await store.writeState(state);
      return record;
    } catch (error) {
      await rm(partial, { force: true });
      throw error;
    } finally {
      forgetPartial();
    }
  });
}

/** The smallest disk a base can be: room for a partition table and the smallest ext4. */
const MIN_BASE_BYTES = 1 << 20;

/**
 * The format of a file the user names without -f: raw without the qcow2 magic; qcow2 with it,
 * but only when the header names no other file. A raw guest disk can start with a forged qcow2
 * header (qemu's probing CVEs), and taking it for qcow2 would make qlayer read whatever backing
 * or data file it names; such a file needs the user to say which it is.
 */
async function sniffFormat(path: string): Promise<'qcow2' | 'raw'> {
  const handle = await open(path, 'r');
  try {
    const header = Buffer.alloc(80);
    const { bytesRead } = await handle.read(header, 0, header.length, 0);
    if (bytesRead < 4 || header.toString('latin1', 0, 4) !== 'QFI\xfb') return 'raw';
    const version = header.readUInt32BE(4);
    const namesBacking = bytesRead >= 16 && header.readBigUInt64BE(8) !== 0n;
    const namesDataFile = version >= 3 && bytesRead >= 80 && (header.readBigUInt64BE(72) & 4n) !== 0n;
    if (namesBacking || namesDataFile) {
      throw new LayerError(
        'base.format-ambiguous',
        `${path} starts with a qcow2 header that names ${namesBacking ? 'a backing file' : 'an external data file'}; say -f qcow2 to import it as that qcow2 chain, or -f raw to import its bytes as a raw disk`,
      );
    }
    return 'qcow2';
  } finally {
    await handle.close();
  }
}

/** Remove a base nothing uses any more; refuses, naming them, while desktops are on it. */
export async function removeBase(store: Store, name: string): Promise<BaseRecord> {
  return store.withLock(async () => {
    const state = await store.readState();
    const record = state.bases[name];
    if (!record) throw new LayerError('base.not-found', `no base named ${name}`);
    const users = Object.entries(state.desktops).filter(([, d]) => d.base === name).map(([desktop]) => desktop);
    if (users.length) throw new LayerError('base.in-use', `base ${name} is in use by desktop${users.length === 1 ? '' : 's'} ${users.join(', ')}; move or destroy ${users.length === 1 ? 'it' : 'them'} first`);
    delete state.bases[name];
    await store.writeState(state); // the record goes first: a crash now leaves only an orphan file
    await rm(store.path(record.file), { force: true });
    return record;
  });
}
