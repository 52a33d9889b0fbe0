import { QlayerError } from '../errors.js';
import type { FileSystemAccess, HostFile, OpenMode } from './host-file.js';

/** Thrown by a FaultInjectingFileSystem when its budget of durable operations runs out. */
export class InjectedCrash extends QlayerError {
  constructor(readonly operationIndex: number) {
    super('test.injected-crash', `injected crash at durable operation #${operationIndex}`);
  }
}

export interface FaultPlan {
  /** Crash when this many writes+fsyncs (counted together, from 1) have been attempted; the Nth does not happen. */
  crashAtOperation?: number;
}

/**
 * Wraps a FileSystemAccess and simulates the process dying at the Nth write or fsync: that
 * operation and every later one throws InjectedCrash, so nothing after the crash point reaches
 * the disk. Counting `operations` without a crash plan tells a test how many points to try.
 */
export class FaultInjectingFileSystem implements FileSystemAccess {
  operations = 0;
  crashed = false;

  constructor(
    private readonly inner: FileSystemAccess,
    private readonly plan: FaultPlan = {},
  ) {}

  /** Count one durable operation; throw if this is the crash point or the process already "died". */
  step(): void {
    if (this.crashed) throw new InjectedCrash(this.operations);
    this.operations += 1;
    if (this.plan.crashAtOperation !== undefined && this.operations >= this.plan.crashAtOperation) {
      this.crashed = true;
      throw new InjectedCrash(this.operations);
    }
  }

  async open(path: string, mode: OpenMode): Promise<HostFile> {
    if (this.crashed) throw new InjectedCrash(this.operations);
    if (mode !== 'read') this.step();
    const file = await this.inner.open(path, mode);
    return new FaultInjectingFile(file, this);
  }

  async syncDirectory(path: string): Promise<void> {
    this.step();
    await this.inner.syncDirectory(path);
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
    this.owner.step();
    await this.file.write(data, position);
  }
  async truncate(length: number): Promise<void> {
    this.owner.step();
    await this.file.truncate(length);
  }
  async sync(): Promise<void> {
    this.owner.step();
    await this.file.sync();
  }
  async close(): Promise<void> {
    // Closing is not a durable operation; a crashed process's files are closed by the kernel.
    await this.file.close();
  }
}
