/**
 * `commit`: write everything an image holds into its backing file, then empty the image so
 * that it reads through to the (now updated) backing file, like `qemu-img commit`.
 *
 * Order for crash safety: the backing file is written and fsynced completely before any L2
 * entry of the top is cleared; a crash in between leaves both files consistent (the top still
 * holds the same data on top of a backing that now holds it too). Clearing the top goes
 * through detachClusters (entries set to 0, never to the zero flag), then the host clusters
 * are released.
 *
 * Refusing to commit into a shared base is the layers code's job; this only needs the backing
 * file to be writable.
 */
import type { FileSystemAccess, HostFile } from '../io/host-file.js';
import { nodeFileSystem } from '../io/host-file.js';
import { Qcow2Error } from '../qcow2/errors.js';
import { Qcow2Image } from '../qcow2/image.js';
import { NamedFilePolicy } from '../qcow2/named-files.js';

export interface CommitOptions {
  fs?: FileSystemAccess;
  /** Keep the top image's content instead of emptying it (-d). */
  keepTop?: boolean;
  /** Folders (besides the image's folder tree) that its backing and data files may be in. */
  allowedDirectories?: readonly string[];
  progress?: (done: number, total: number) => void;
}

export interface CommitResult {
  backing: string;
  /** Guest bytes written into the backing file (data and zeros). */
  committedBytes: number;
}

const STEP = 4 * 1024 * 1024;

/** The backing file, writable: a qcow2 image or a raw file. */
type Target = { kind: 'qcow2'; image: Qcow2Image } | { kind: 'raw'; file: HostFile };

export async function commitImage(path: string, options: CommitOptions = {}): Promise<CommitResult> {
  const fs = options.fs ?? nodeFileSystem;
  const policy = await NamedFilePolicy.forImage(path, { allowedDirectories: options.allowedDirectories, fs });
  const top = await Qcow2Image.open(path, { fs, writable: !options.keepTop, namedFiles: policy });
  let target: Target | null = null;
  try {
    const name = top.backingFile;
    if (name === null) throw new Qcow2Error('qcow2.bad-argument', `${path} has no backing file to commit into`);
    const format = top.backingFormat;
    if (format !== 'qcow2' && format !== 'raw') {
      throw new Qcow2Error('qcow2.bad-argument', `${path}: backing format ${format === null ? '(none recorded)' : `"${format}"`} cannot be committed into; formats are never probed`);
    }
    // Commit writes into the backing file: the policy decides which file that may be, as for a read.
    const backing = await policy.open(name, path, 'backing file', 'write');
    const backingPath = backing.path;
    target = format === 'qcow2'
      ? { kind: 'qcow2', image: await Qcow2Image.open(backingPath, { fs, writable: true, namedFiles: policy, opened: backing.file }) }
      : { kind: 'raw', file: backing.file };
    const size = top.size;
    // A larger top grows its backing file, as qemu-img commit does.
    if (target.kind === 'qcow2' && target.image.size < size) await target.image.growVirtualSize(size);
    if (target.kind === 'raw' && (await target.file.length()) < size) await target.file.truncate(size);

    let committedBytes = 0;
    const buffer = new Uint8Array(STEP);
    const clusters = new Set<number>();
    for (let pos = 0; pos < size; pos += STEP) {
      const length = Math.min(STEP, size - pos);
      for (const extent of await top.mapRange(pos, length)) {
        const kind = extent.mapping.kind;
        if (kind === 'unallocated') continue;
        for (let c = Math.floor(extent.guestOffset / top.clusterSize); c * top.clusterSize < extent.guestOffset + extent.length; c += 1) clusters.add(c);
        committedBytes += extent.length;
        if (kind === 'zero') {
          if (target.kind === 'qcow2') await target.image.writeZeroes(extent.guestOffset, extent.length);
          else await target.file.write(new Uint8Array(extent.length), extent.guestOffset);
          continue;
        }
        const data = buffer.subarray(0, extent.length);
        await top.readAt(data, extent.guestOffset);
        if (target.kind === 'qcow2') await target.image.write(data, extent.guestOffset);
        else await target.file.write(data, extent.guestOffset);
      }
      options.progress?.(pos + length, size);
    }
    if (target.kind === 'qcow2') await target.image.flush();
    else await target.file.sync();

    if (!options.keepTop && clusters.size > 0) {
      const released = await top.detachClusters([...clusters].sort((a, b) => a - b));
      await top.releaseHostClusters(released);
    }
    return { backing: backingPath, committedBytes };
  } finally {
    if (target?.kind === 'qcow2') await target.image.close();
    if (target?.kind === 'raw') await target.file.close();
    await top.close();
  }
}
