import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { link, mkdir, open, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { removeOnInterrupt } from '../io/interrupt.js';
import { processCommandLine, processStartTime, sameProcessAlive } from '../io/process.js';
import { LayerError } from './errors.js';
import { emptyState, type StoreState } from './state.js';

const STATE_FILE = 'state.json';
const LOCK_FILE = 'lock';
/**
 * The store's identity: a random id in its own file rather than in state.json, because it must
 * exist before any state does (an empty store can already run a desktop's domain name check),
 * it never changes, and no state write (other code's) can drop it. A copied store keeps the id;
 * the domain checks in virt/ compare disk paths too, so a copy is still never confused.
 */
const ID_FILE = 'store-id';

/** Publish `text` as `path` whole, or fail with EEXIST: readers never see a half-written file. */
async function publishExclusive(path: string, text: string): Promise<void> {
  const temporary = `${path}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
  await writeFile(temporary, text, { mode: 0o644 });
  try {
    await link(temporary, path);
  } finally {
    await rm(temporary, { force: true });
  }
}

/** Who holds (or held) a store lock, as written in the lock file: "PID START-TIME HOST". */
interface LockHolder {
  pid: number;
  /** Field 22 of /proc/PID/stat; null in a lock written by an older qlayer (pid only). */
  startTime: string | null;
  host: string | null;
  text: string;
}

function parseLockHolder(text: string): LockHolder | null {
  const [pid, startTime, host] = text.trim().split(/\s+/);
  const number = Number(pid);
  if (!Number.isInteger(number) || number <= 0) return null;
  return { pid: number, startTime: startTime ?? null, host: host ?? null, text };
}

/** Lock paths this process holds now (a second withLock on the same store must not steal it). */
const heldHere = new Set<string>();

async function fsyncPath(path: string, flags = fsConstants.O_RDONLY): Promise<void> {
  const handle = await open(path, flags);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** Read the store's id, making it on first use (the first of two racing processes wins). */
async function storeId(root: string): Promise<string> {
  const path = join(root, ID_FILE);
  for (let attempt = 0; attempt < 2; attempt++) {
    const text = (await readFile(path, 'utf8').catch(() => null))?.trim();
    if (text !== undefined && text !== null) {
      if (!/^[0-9a-f]{8,32}$/.test(text)) throw new LayerError('store.corrupt-id', `${path} holds ${JSON.stringify(text.slice(0, 40))}, not a store id (8 to 32 hex digits)`);
      return text;
    }
    await publishExclusive(path, `${randomBytes(4).toString('hex')}\n`).catch((error: NodeJS.ErrnoException) => {
      if (error.code !== 'EEXIST') throw error;
    });
  }
  throw new LayerError('store.corrupt-id', `cannot read or make the store id ${path}`);
}

/**
 * The embedded store: a folder with bases/, apps/, desktops/ and one state file.
 * Readers read the state file at any time (it is replaced atomically); writers hold the lock.
 */
export class Store {
  private constructor(
    readonly root: string,
    /** Random, made once per store: libvirt domain names carry it (two stores may share desktop names). */
    readonly id: string,
  ) {}

  static async open(root: string, options: { create?: boolean } = {}): Promise<Store> {
    const absolute = resolve(root);
    if (options.create !== false) {
      for (const sub of ['bases', 'apps', 'desktops']) await mkdir(join(absolute, sub), { recursive: true });
    }
    return new Store(absolute, await storeId(absolute));
  }

  path(...relative: string[]): string {
    return join(this.root, ...relative);
  }

  async readState(): Promise<StoreState> {
    let text: string;
    try {
      text = await readFile(this.path(STATE_FILE), 'utf8');
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return emptyState();
      throw error;
    }
    let state: StoreState;
    try {
      state = JSON.parse(text) as StoreState;
    } catch (error) {
      throw new LayerError('store.corrupt-state', `store state ${this.path(STATE_FILE)} is not valid JSON: ${(error as Error).message}`);
    }
    if (state.format !== 'qlayer-store/1') {
      throw new LayerError('store.unknown-format', `store state ${this.path(STATE_FILE)} has format ${JSON.stringify(state.format)}; this qlayer reads qlayer-store/1`);
    }
    return state;
  }

  /** State writes of this process, in order: desktops assigned in parallel share one state. */
  private stateWrites: Promise<void> = Promise.resolve();

  /**
   * Replace the state file atomically (temporary file, fsync, rename, fsync the folder). Calls
   * are queued, so concurrent writers in this process never share the temporary file and the
   * last call's state is what stays.
   */
  writeState(state: StoreState): Promise<void> {
    const snapshot = `${JSON.stringify(state, null, 2)}\n`;
    const write = this.stateWrites.then(() => this.writeStateNow(snapshot));
    this.stateWrites = write.catch(() => undefined);
    return write;
  }

  private async writeStateNow(text: string): Promise<void> {
    const target = this.path(STATE_FILE);
    const temporary = `${target}.${process.pid}.tmp`;
    await writeFile(temporary, text, { mode: 0o644 });
    await fsyncPath(temporary);
    await rename(temporary, target);
    await fsyncPath(this.root, fsConstants.O_RDONLY | fsConstants.O_DIRECTORY);
  }

  /**
   * Run `work` as the store's only writer. The lock file names its holder by pid, start time
   * and host, and appears whole (linked from a finished temporary file), so a reader never
   * takes a half-written lock for a stale one. A lock whose process is gone, or whose pid now
   * belongs to a process with another start time (pid reuse), is stale and taken over; anything
   * else is refused with the holder's pid and command line and how to clear it.
   */
  async withLock<T>(work: () => Promise<T>): Promise<T> {
    const lockPath = this.path(LOCK_FILE);
    if (heldHere.has(lockPath)) {
      throw new LayerError('store.locked', `the store lock ${lockPath} is already held by this process (pid ${process.pid}); store operations do not nest`);
    }
    const mine = `${process.pid} ${processStartTime(process.pid) ?? '-'} ${hostname()}\n`;
    for (let attempt = 0; ; attempt++) {
      try {
        await publishExclusive(lockPath, mine);
        break;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EEXIST' || attempt >= 3) {
          if ((error as NodeJS.ErrnoException).code === 'EEXIST') throw new LayerError('store.locked', `cannot take the store lock ${lockPath}: it keeps reappearing`);
          throw error;
        }
      }
      const text = await readFile(lockPath, 'utf8').catch(() => null);
      if (text === null) continue; // released meanwhile: try again
      const holder = parseLockHolder(text);
      if (holder && this.holderLive(holder)) throw this.lockedError(lockPath, holder);
      await this.takeOverStale(lockPath, text);
    }
    heldHere.add(lockPath);
    const forget = removeOnInterrupt(lockPath);
    try {
      return await work();
    } finally {
      heldHere.delete(lockPath);
      forget();
      await rm(lockPath, { force: true });
    }
  }

  /** Is the process that wrote this lock still running? (Another host's: assume it is.) */
  private holderLive(holder: LockHolder): boolean {
    if (holder.host !== null && holder.host !== hostname()) return true;
    const startTime = holder.startTime === '-' ? null : holder.startTime;
    return sameProcessAlive(holder.pid, startTime);
  }

  private lockedError(lockPath: string, holder: LockHolder): LayerError {
    const elsewhere = holder.host !== null && holder.host !== hostname();
    const command = elsewhere ? null : processCommandLine(holder.pid);
    return new LayerError(
      'store.locked',
      `the store ${this.root} is in use: ${lockPath} is held by pid ${holder.pid}` +
        `${elsewhere ? ` on host ${holder.host}` : ''}${command ? ` (${command})` : ''}. ` +
        `Wait for it to finish; if that process is not a qlayer working on this store, ` +
        `stop it or remove the lock file (rm ${lockPath}).`,
    );
  }

  /**
   * Remove a stale lock, unless another process replaced it after it was read: it is moved
   * aside first and checked to be the same lock (two processes may find one stale lock at once;
   * a plain rm could delete the lock the faster one just took).
   */
  private async takeOverStale(lockPath: string, staleText: string): Promise<void> {
    const aside = `${lockPath}.stale.${process.pid}.${randomBytes(4).toString('hex')}`;
    try {
      await rename(lockPath, aside);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw error;
    }
    const moved = await readFile(aside, 'utf8').catch(() => null);
    if (moved !== null && moved !== staleText) {
      // Someone's fresh lock: put it back (unless yet another lock appeared meanwhile).
      await link(aside, lockPath).catch(() => undefined);
    }
    await rm(aside, { force: true });
  }

  /** Read-modify-write the state under the lock. */
  async update<T>(change: (state: StoreState) => Promise<T> | T): Promise<T> {
    return this.withLock(async () => {
      const state = await this.readState();
      const result = await change(state);
      await this.writeState(state);
      return result;
    });
  }
}
