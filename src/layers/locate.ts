import type { ByteSource } from '../io/byte-source.js';
import { appKey, type AppManifest } from './app.js';
import { LayerError } from './errors.js';
import { findOverlap } from './ranges.js';
import type { LocatedFile } from './state.js';

/** What locate needs of a guest filesystem reader (src/fs provides it). */
export interface PlaceholderReader {
  lookup(path: string, options?: { follow?: boolean }): Promise<{ type: string; size: number; inline?: boolean; inode?: number; mtime?: number }>;
  extents(path: string): Promise<Array<{ fileOffset: number; diskOffset: number; length: number; unwritten: boolean }>>;
}

const ZERO_CHECK_CHUNK = 4 << 20;

/** Does [offset, offset+length) of the disk read as zeros? Reads in large chunks. */
async function readsAsZeros(disk: ByteSource, offset: number, length: number): Promise<boolean> {
  const buffer = Buffer.alloc(Math.min(ZERO_CHECK_CHUNK, length));
  for (let done = 0; done < length; ) {
    const piece = buffer.subarray(0, Math.min(buffer.length, length - done));
    await disk.readAt(piece, offset + done);
    // Compare 8 bytes at a time where possible: a 1 GiB app is a 1 GiB scan.
    const words = new BigUint64Array(piece.buffer, piece.byteOffset, piece.length >> 3);
    for (let i = 0; i < words.length; i++) if (words[i] !== 0n) return false;
    for (let i = words.length << 3; i < piece.length; i++) if (piece[i] !== 0) return false;
    done += piece.length;
  }
  return true;
}

/**
 * Find every placeholder of these apps in the guest filesystem, read offline from the chain,
 * and check it is still exactly what allocate made: a regular file of the manifest's size whose
 * blocks cover it with no hole, and either
 *  - all unwritten (fallocate): nothing was written into it since, and its blocks' stale bytes
 *    are never visible; nothing needs reading, or
 *  - all written and all zeros (the written-zeros fallback): checked byte by byte.
 * A mix means the user wrote into a fallocated placeholder. Guest-reported offsets are never
 * used: the extents come from the filesystem's own metadata.
 */
export async function locatePlaceholders(
  filesystem: PlaceholderReader,
  disk: ByteSource,
  manifests: AppManifest[],
  options: { checkZeros?: boolean } = {},
): Promise<LocatedFile[]> {
  const located: LocatedFile[] = [];
  for (const manifest of manifests) {
    for (const file of manifest.files) {
      const changed = (why: string): LayerError =>
        new LayerError('locate.placeholder-changed', `placeholder ${file.path} of ${appKey(manifest)} ${why}; refusing to recompose (unassign and assign the app again)`);
      let info: { type: string; size: number; inline?: boolean; inode?: number; mtime?: number };
      try {
        // Not following symlinks: a link swapped in for a placeholder must not redirect the write.
        info = await filesystem.lookup(file.path, { follow: false });
      } catch (error) {
        if ((error as { code?: string }).code === 'fs.not-found') throw changed('is missing from the guest filesystem');
        throw error;
      }
      if (info.type !== 'file' && info.type !== 'regular') throw changed(`is no longer a regular file (${info.type})`);
      if (info.size !== file.size) throw changed(`has size ${info.size}, expected ${file.size}`);
      if (info.inline && file.size > 0) throw changed('keeps its data inside the inode (inline data): it has no blocks to compose');
      const identity = { ...(info.inode !== undefined ? { inode: info.inode } : {}), ...(info.mtime !== undefined ? { mtime: info.mtime } : {}) };
      if (file.size === 0) {
        located.push({ app: appKey(manifest), path: file.path, size: 0, payloadOffset: file.payloadOffset, extents: [], ...identity });
        continue;
      }
      const extents = (await filesystem.extents(file.path)).sort((a, b) => a.fileOffset - b.fileOffset);
      let expectedOffset = 0;
      for (const extent of extents) {
        if (extent.fileOffset !== expectedOffset && expectedOffset < file.size) throw changed(`has a hole at byte ${expectedOffset}`);
        expectedOffset = extent.fileOffset + extent.length;
      }
      if (expectedOffset < file.size) throw changed(`has blocks for only ${expectedOffset} of its ${file.size} bytes`);
      const unwritten = extents.filter((e) => e.unwritten).length;
      if (unwritten > 0 && unwritten < extents.length) {
        throw changed(`was partly written after it was allocated (${extents.length - unwritten} of its ${extents.length} extents hold data)`);
      }
      const fallocated = unwritten > 0;
      if (!fallocated && options.checkZeros !== false) {
        for (const extent of extents) {
          const inside = Math.min(extent.length, file.size - extent.fileOffset);
          if (inside > 0 && !(await readsAsZeros(disk, extent.diskOffset, inside))) throw changed('no longer reads as zeros: something wrote to it');
        }
      }
      located.push({
        app: appKey(manifest),
        path: file.path,
        size: file.size,
        payloadOffset: file.payloadOffset,
        extents: extents.map(({ fileOffset, diskOffset, length }) => ({ fileOffset, diskOffset, length })),
        ...(fallocated ? { unwritten: true } : {}),
        ...identity,
      });
    }
  }
  const overlap = findOverlap(located.flatMap((f) => f.extents.map((e) => ({ offset: e.diskOffset, length: e.length, path: f.path }))));
  if (overlap) {
    throw new LayerError('locate.overlap', `the filesystem says ${overlap[0].path} and ${overlap[1].path} share disk blocks; the guest filesystem is damaged (run e2fsck)`);
  }
  return located;
}

/** What recheckAssigned found about the files of apps already assigned. */
export interface RecheckedFiles {
  files: LocatedFile[];
  /** Paths whose blocks the guest no longer gives (wholly or in part) to the app's file. */
  released: Array<{ path: string; why: string; bytes: number }>;
}

/**
 * Before a new plan, look again at the files of apps that stay assigned. A user may have deleted
 * or replaced an app file, or truncated it, since its assign: the guest then freed its blocks and
 * may have given them to anything since, new placeholders included. The apps layer must no longer
 * hold the app's bytes there, or they would collide with the new owner's. So keep of each recorded
 * extent only the part the same file (same inode, same file offset) still maps to the same disk
 * blocks, and report the rest as released. What the file still holds keeps its app bytes.
 */
export async function recheckAssigned(filesystem: PlaceholderReader, files: LocatedFile[]): Promise<RecheckedFiles> {
  const released: RecheckedFiles['released'] = [];
  const kept: LocatedFile[] = [];
  for (const file of files) {
    const recordedBytes = file.extents.reduce((n, e) => n + e.length, 0);
    if (recordedBytes === 0) {
      kept.push(file);
      continue;
    }
    const release = (why: string, extents: LocatedFile['extents']): void => {
      const keptBytes = extents.reduce((n, e) => n + e.length, 0);
      released.push({ path: file.path, why, bytes: recordedBytes - keptBytes });
      kept.push({ ...file, extents });
    };
    let info: { type: string; inode?: number };
    try {
      info = await filesystem.lookup(file.path, { follow: false });
    } catch (error) {
      if ((error as { code?: string }).code === 'fs.not-found') {
        release('deleted in the guest', []);
        continue;
      }
      throw error;
    }
    if (info.type !== 'file' && info.type !== 'regular') {
      release(`replaced in the guest by a ${info.type}`, []);
      continue;
    }
    if (file.inode !== undefined && info.inode !== undefined && info.inode !== file.inode) {
      release(`replaced in the guest (inode ${info.inode}, was ${file.inode})`, []);
      continue;
    }
    const now = await filesystem.extents(file.path);
    const still: LocatedFile['extents'] = [];
    for (const recorded of file.extents) {
      const shift = recorded.diskOffset - recorded.fileOffset;
      for (const current of now) {
        if (current.diskOffset - current.fileOffset !== shift) continue;
        const start = Math.max(recorded.fileOffset, current.fileOffset);
        const end = Math.min(recorded.fileOffset + recorded.length, current.fileOffset + current.length);
        if (start < end) still.push({ fileOffset: start, diskOffset: start + shift, length: end - start });
      }
    }
    still.sort((a, b) => a.fileOffset - b.fileOffset);
    if (still.reduce((n, e) => n + e.length, 0) === recordedBytes) kept.push(file);
    else release('truncated or rewritten in the guest: part of its blocks were freed', still);
  }
  return { files: kept, released };
}
