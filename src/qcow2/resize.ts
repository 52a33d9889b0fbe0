/**
 * `resize`: grow a qcow2 image's virtual disk. Shrinking is refused: it would silently drop
 * whatever the guest stored at the end of the disk, and a layered desktop never needs it.
 */
import type { FileSystemAccess } from '../io/host-file.js';
import { nodeFileSystem } from '../io/host-file.js';
import { Qcow2Error } from './errors.js';
import { Qcow2Image } from './image.js';

export interface ResizeOptions {
  fs?: FileSystemAccess;
}

/**
 * `size` is the new size in bytes, or with `relative` the number of bytes to add. Rounded up
 * to whole 512-byte sectors. Returns the new and old virtual sizes.
 */
export async function resizeImage(path: string, size: number, options: ResizeOptions & { relative?: boolean } = {}): Promise<{ oldSize: number; newSize: number }> {
  const fs = options.fs ?? nodeFileSystem;
  const image = await Qcow2Image.open(path, { fs, writable: true });
  try {
    const oldSize = image.size;
    const wanted = options.relative ? oldSize + size : size;
    if (!Number.isSafeInteger(wanted) || wanted < 0) throw new Qcow2Error('qcow2.bad-argument', `resize: ${wanted} is not a valid size`);
    const newSize = Math.ceil(wanted / 512) * 512;
    if (newSize < oldSize) {
      throw new Qcow2Error('qcow2.bad-argument', `resize: shrinking is not supported (${path} is ${oldSize} bytes, asked for ${newSize}); only growing is allowed`);
    }
    if (newSize > oldSize) await image.growVirtualSize(newSize);
    return { oldSize, newSize };
  } finally {
    await image.close();
  }
}
