/**
 * `rebase`: point an image at a different backing file.
 *
 * Safe mode (the default, like qemu-img rebase): the guest-visible content must not change, so
 * every range the image does not hold itself is read through the old backing chain and through
 * the new one, and wherever they differ the old bytes are written into the image first. Only
 * then is the header switched. Unsafe mode (-u) only rewrites the backing name and format, for
 * when the caller knows the new backing file has the same content (e.g. it was moved).
 */
import type { ByteSource } from '../io/byte-source.js';
import type { FileSystemAccess } from '../io/host-file.js';
import { nodeFileSystem } from '../io/host-file.js';
import { Qcow2Error } from '../qcow2/errors.js';
import { Qcow2Image } from '../qcow2/image.js';
import { openChain, type Chain } from './chain.js';
import { resolveReferencedPath } from './confine.js';

export interface RebaseOptions {
  fs?: FileSystemAccess;
  /** New backing file name as it should be stored (relative to the image's folder), or null for none. */
  backing: string | null;
  /** Format of the new backing file (required with a backing file: formats are never probed). */
  backingFormat?: 'qcow2' | 'raw';
  /** Only rewrite the header (-u). */
  unsafe?: boolean;
  allowedDirectories?: string[];
  progress?: (done: number, total: number) => void;
}

export interface RebaseResult {
  /** Guest bytes copied into the image because old and new backing differ there. */
  copiedBytes: number;
}

/** How much is compared per step; a multiple of every cluster size. */
const STEP = 2 * 1024 * 1024;

export async function rebaseImage(path: string, options: RebaseOptions): Promise<RebaseResult> {
  const fs = options.fs ?? nodeFileSystem;
  if (options.backing !== null && options.backingFormat === undefined) {
    throw new Qcow2Error('qcow2.bad-argument', 'rebase: the new backing format (-F) is required; formats are never probed');
  }
  if (options.unsafe) {
    const image = await Qcow2Image.open(path, { fs, writable: true });
    try {
      await image.setBackingFile(options.backing, options.backing === null ? null : options.backingFormat!);
    } finally {
      await image.close();
    }
    return { copiedBytes: 0 };
  }

  const chain = await openChain(path, { fs, writableTop: true, allowedDirectories: options.allowedDirectories });
  let newChain: Chain | null = null;
  try {
    const image = chain.topImage;
    const oldBacking: ByteSource | null = chain.layers[1]?.source ?? null;
    let newBacking: ByteSource | null = null;
    if (options.backing !== null) {
      const resolved = resolveReferencedPath(options.backing, path, 'new backing file');
      newChain = await openChain(resolved, { fs, topFormat: options.backingFormat!, allowedDirectories: options.allowedDirectories });
      newBacking = newChain;
    }
    const size = image.size;
    const unit = image.geometry.subclusterSize;
    const oldBuf = new Uint8Array(STEP);
    const newBuf = new Uint8Array(STEP);
    let copiedBytes = 0;
    for (let pos = 0; pos < size; pos += STEP) {
      const length = Math.min(STEP, size - pos);
      for (const extent of await image.mapRange(pos, length)) {
        if (extent.mapping.kind !== 'unallocated') continue;
        // This range shows the backing file: old and new must read the same.
        const old = oldBuf.subarray(0, extent.length);
        const now = newBuf.subarray(0, extent.length);
        if (oldBacking) await oldBacking.readAt(old, extent.guestOffset);
        else old.fill(0);
        if (newBacking) await newBacking.readAt(now, extent.guestOffset);
        else now.fill(0);
        // Write differing (sub)clusters, coalescing adjacent ones into one write.
        let runStart = -1;
        for (let at = 0; at <= extent.length; at += unit) {
          const end = Math.min(extent.length, at + unit);
          const differs = at < extent.length && Buffer.compare(old.subarray(at, end), now.subarray(at, end)) !== 0;
          if (differs && runStart < 0) runStart = at;
          if (!differs && runStart >= 0) {
            await image.write(old.subarray(runStart, at), extent.guestOffset + runStart);
            copiedBytes += at - runStart;
            runStart = -1;
          }
        }
      }
      options.progress?.(pos + length, size);
    }
    // Data first (durable), then the header switch.
    await image.flush();
    await image.setBackingFile(options.backing, options.backing === null ? null : options.backingFormat!);
    return { copiedBytes };
  } finally {
    await newChain?.close();
    await chain.close();
  }
}
