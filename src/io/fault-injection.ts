import { QlayerError } from '../errors.js';
import type { FileSystemAccess, HostFile, OpenMode, OpenOptions } from './host-file.js';

/** Thrown by a FaultInjectingFileSystem when its budget of durable operations runs out. */
export class InjectedCrash extends QlayerError {
  constructor(readonly operationIndex: number) {
    super('test.injected-crash', `injected crash at durable operation #${operationIndex}`);
  }
}

export interface FaultPlan {
  /** Crash when this many writes+fsyncs (counted together, from 1) have been attempted; the Nth does not happen. */
  crashAtOperation?: number;
  /**
   * Also lose every write not yet fsynced when the crash comes, as a power cut loses the page
   * cache: at the crash each such write is undone (its old bytes put back, newest first).
   */
  loseUnsyncedWrites?: boolean;
}

/** A write that fsync has not made durable yet, with the bytes it replaced. */
interface UnsyncedWrite {
  path: string;
  position: number;
  previous: Uint8Array;
}

/**
 * Wraps a FileSystemAccess and simulates the process dying at the Nth write or fsync: that
 * operation and every later one throws InjectedCrash, so nothing after the crash point reaches
 * the disk. Counting `operations` without a crash plan tells a test how many points to try.
 */
export class FaultInjectingFileSystem implements FileSystemAccess {
  operations = 0;
  crashed = false;
  /** Writes since each file's last fsync, oldest first (only with loseUnsyncedWrites). */
  readonly unsynced: UnsyncedWrite[] = [];
  /** How many writes the crash undid. */
  lostWrites = 0;

  constructor(
    private readonly inner: FileSystemAccess,
    private readonly plan: FaultPlan = {},
  ) {}

  /** Count one durable operation; throw if this is the crash point or the process already "died". */
  async step(): Promise<void> {
    if (this.crashed) throw new InjectedCrash(this.operations);
    this.operations += 1;
    if (this.plan.crashAtOperation !== undefined && this.operations >= this.plan.crashAtOperation) {
      this.crashed = true;
      if (this.plan.loseUnsyncedWrites) await this.loseUnsynced();
      throw new InjectedCrash(this.operations);
    }
  }

  get recordsUnsynced(): boolean {
    return this.plan.loseUnsyncedWrites === true;
  }

  /** Put back the bytes every unsynced write replaced, newest first. */
  private async loseUnsynced(): Promise<void> {
    this.lostWrites = this.unsynced.length;
    for (const write of this.unsynced.reverse()) {
      const file = await this.inner.open(write.path, 'write');
      try {
        await file.write(write.previous, write.position);
      } finally {
        await file.close();
      }
    }
    this.unsynced.length = 0;
  }

  /** fsync of `path`: its writes so far are durable. */
  synced(path: string): void {
    for (let i = this.unsynced.length - 1; i >= 0; i--) if (this.unsynced[i]!.path === path) this.unsynced.splice(i, 1);
  }

  async open(path: string, mode: OpenMode, options?: OpenOptions): Promise<HostFile> {
    if (this.crashed) throw new InjectedCrash(this.operations);
    if (mode !== 'read') await this.step();
    // Pass the care flags on: without them a FIFO named by an image would block here.
    const file = await this.inner.open(path, mode, options);
    return new FaultInjectingFile(file, this);
  }

  async syncDirectory(path: string): Promise<void> {
    await this.step();
    await this.inner.syncDirectory(path);
  }

  /** Cleanup after a failure: a crashed process runs none, so its partial files stay for the test to inspect. */
  async remove(path: string): Promise<void> {
    if (this.crashed) throw new InjectedCrash(this.operations);
    await this.inner.remove(path);
  }
}

class FaultInjectingFile implements HostFile {
  constructor(
    private readonly file: HostFile,
    private readonly owner: FaultInjectingFileSystem,
  ) {}

  get path(): string {
    return this.file.path;
  }
  get writable(): boolean {
    return this.file.writable;
  }
  length(): Promise<number> {
    return this.file.length();
  }
  read(into: Uint8Array, position: number): Promise<number> {
    if (this.owner.crashed) throw new InjectedCrash(this.owner.operations);
    return this.file.read(into, position);
  }
  async write(data: Uint8Array, position: number): Promise<void> {
    await this.owner.step();
    if (this.owner.recordsUnsynced) {
      const previous = new Uint8Array(data.length);
      await this.file.read(previous, position); // past the end reads as zeros
      this.owner.unsynced.push({ path: this.file.path, position, previous });
    }
    await this.file.write(data, position);
  }
  async truncate(length: number): Promise<void> {
    await this.owner.step();
    await this.file.truncate(length);
  }
  async sync(): Promise<void> {
    await this.owner.step();
    await this.file.sync();
    this.owner.synced(this.file.path);
  }
  async close(): Promise<void> {
    // Closing is not a durable operation; a crashed process's files are closed by the kernel.
    await this.file.close();
  }
}
