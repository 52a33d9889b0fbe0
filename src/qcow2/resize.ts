/**
 * `resize`: change a qcow2 image's virtual disk size. Growing is always allowed. Shrinking cuts
 * off whatever the guest stored past the new end, so, like qemu-img, it is refused unless the
 * caller says so (`shrink`, the CLI's --shrink); the refusal says whether data would be lost.
 *
 * A shrink follows qemu's order (qcow2_co_truncate): the clusters past the new end are discarded
 * first (refcounts drop, clusters a snapshot still uses stay), then the size in the header is
 * lowered. A crash in between leaves the old size with zeros at the end, never a smaller disk
 * whose cut-off clusters are still referenced. The L1 table keeps its length (a longer L1 than
 * the size needs is valid), so growing again later needs no new table.
 */
import type { FileSystemAccess } from '../io/host-file.js';
import { nodeFileSystem } from '../io/host-file.js';
import { Qcow2Error } from './errors.js';
import { Autoclear, ExtensionType, Incompatible } from './header.js';
import { Qcow2Image } from './image.js';

export interface ResizeOptions {
  fs?: FileSystemAccess;
  /** Allow a smaller size (qemu-img's --shrink): data past the new end is deleted. */
  shrink?: boolean;
}

export interface ResizeResult {
  oldSize: number;
  newSize: number;
  /** Guest bytes past the new end that were allocated (data or zero clusters) and are now gone. */
  discardedBytes: number;
}

/** Offset of the virtual size (u64, big-endian) in a qcow2 header. */
const SIZE_FIELD = 24;

/**
 * `size` is the new size in bytes, or with `relative` the change (negative to shrink). Rounded
 * up to whole 512-byte sectors.
 */
export async function resizeImage(path: string, size: number, options: ResizeOptions & { relative?: boolean } = {}): Promise<ResizeResult> {
  const fs = options.fs ?? nodeFileSystem;
  const image = await Qcow2Image.open(path, { fs, writable: true });
  try {
    const oldSize = image.size;
    const wanted = options.relative ? oldSize + size : size;
    if (!Number.isSafeInteger(wanted) || wanted < 0) throw new Qcow2Error('qcow2.bad-argument', `resize: ${wanted} is not a valid size`);
    const newSize = Math.ceil(wanted / 512) * 512;
    if (newSize > oldSize) await image.growVirtualSize(newSize);
    if (newSize >= oldSize) return { oldSize, newSize, discardedBytes: 0 };

    const allocated = await allocatedBytes(image, newSize, oldSize);
    if (!options.shrink) {
      const loss = allocated > 0 ? `${allocated} bytes of data past ${newSize} would be deleted` : 'nothing is allocated past the new end';
      throw new Qcow2Error('qcow2.bad-argument', `resize: ${path} would shrink from ${oldSize} to ${newSize} bytes (${loss}); use --shrink to shrink it`);
    }
    const header = image.header;
    // Bitmaps and external data files have their own sizes to cut; qlayer does not shrink those.
    if ((header.autoclearFeatures & Autoclear.bitmaps) !== 0n || header.extensions.some((e) => e.type === ExtensionType.bitmaps)) {
      throw new Qcow2Error('qcow2.bitmaps-present', `resize: ${path} has persistent bitmaps; shrinking it is not supported`);
    }
    if ((header.incompatibleFeatures & Incompatible.externalDataFile) !== 0n) {
      throw new Qcow2Error('qcow2.unsupported-feature', `resize: ${path} has an external data file; shrinking it is not supported`);
    }
    const cs = image.clusterSize;
    const firstWhole = Math.ceil(newSize / cs) * cs;
    if (firstWhole < oldSize) await image.discard(firstWhole, oldSize - firstWhole);
    // The cluster that straddles the new end keeps its bytes past the end: zero them, so that
    // growing the disk again shows zeros there, not the old data.
    if (firstWhole > newSize) {
      const tail = await image.mapRange(newSize, Math.min(firstWhole, oldSize) - newSize);
      if (tail.some((e) => e.mapping.kind === 'normal' || e.mapping.kind === 'compressed')) await image.writeZeroes(newSize, Math.min(firstWhole, oldSize) - newSize);
    }
    await image.flush();
    // Qcow2Image only grows; the size field is lowered here, on the same file, after every
    // metadata change above is durable (flush fsyncs), then synced itself.
    const file = await fs.open(path, 'write', { regularOnly: true });
    try {
      const field = new Uint8Array(8);
      new DataView(field.buffer).setBigUint64(0, BigInt(newSize));
      await file.write(field, SIZE_FIELD);
      await file.sync();
    } finally {
      await file.close();
    }
    return { oldSize, newSize, discardedBytes: allocated };
  } finally {
    await image.close();
  }
}

/** Guest bytes in [from, to) that this image (not its backing file) allocates. */
async function allocatedBytes(image: Qcow2Image, from: number, to: number): Promise<number> {
  let total = 0;
  const step = 2 ** 30;
  for (let at = from; at < to; at += step) {
    for (const e of await image.mapRange(at, Math.min(step, to - at))) if (e.mapping.kind !== 'unallocated') total += e.length;
  }
  return total;
}
