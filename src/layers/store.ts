import { constants as fsConstants } from 'node:fs';
import { mkdir, open, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { LayerError } from './errors.js';
import { emptyState, type StoreState } from './state.js';

const STATE_FILE = 'state.json';
const LOCK_FILE = 'lock';

/** Is a process with this pid alive on this host? */
function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function fsyncPath(path: string, flags = fsConstants.O_RDONLY): Promise<void> {
  const handle = await open(path, flags);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/**
 * The embedded store: a folder with bases/, apps/, desktops/ and one state file.
 * Readers read the state file at any time (it is replaced atomically); writers hold the lock.
 */
export class Store {
  private constructor(readonly root: string) {}

  static async open(root: string, options: { create?: boolean } = {}): Promise<Store> {
    const absolute = resolve(root);
    const store = new Store(absolute);
    if (options.create !== false) {
      for (const sub of ['bases', 'apps', 'desktops']) await mkdir(join(absolute, sub), { recursive: true });
    }
    return store;
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
   * Run `work` as the store's only writer. A second writer gets a clear error naming the
   * holder; a lock left by a dead process is taken over.
   */
  async withLock<T>(work: () => Promise<T>): Promise<T> {
    const lockPath = this.path(LOCK_FILE);
    for (let attempt = 0; ; attempt++) {
      try {
        const handle = await open(lockPath, 'wx');
        await handle.writeFile(`${process.pid}\n`);
        await handle.close();
        break;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 0) {
          if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
        }
        const holder = Number.parseInt((await readFile(lockPath, 'utf8').catch(() => '')).trim(), 10);
        if (Number.isInteger(holder) && holder > 0 && processAlive(holder) && holder !== process.pid) {
          throw new LayerError(
            'store.locked',
            `the store ${this.root} is in use by another qlayer (pid ${holder}); wait for it to finish`,
          );
        }
        if (attempt > 0) {
          throw new LayerError('store.locked', `cannot take the store lock ${lockPath}`);
        }
        // Stale lock from a process that died: remove it and try once more.
        await rm(lockPath, { force: true });
      }
    }
    try {
      return await work();
    } finally {
      await rm(lockPath, { force: true });
    }
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
