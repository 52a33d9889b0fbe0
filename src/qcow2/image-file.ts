/**
 * The host side of one open image, shared by its parts (cluster map, refcounts, reads,
 * writes): the file and its external data file, the geometry, and how long the file is.
 */
import type { HostFile } from '../io/host-file.js';
import { Qcow2Error } from './errors.js';
import type { Geometry } from './layout.js';

export class ImageFile {
  constructor(
    readonly path: string,
    readonly file: HostFile,
    /** External data file holding the guest clusters, or null when they are in `file`. */
    readonly dataFile: HostFile | null,
    readonly g: Geometry,
    /** Length of the host file in bytes (as this image last knew it). */
    public length: number,
  ) {}

  /** Bytes up to `end` now exist in the host file. */
  grow(end: number): void {
    this.length = Math.max(this.length, end);
  }

  /** A guest range must lie inside a virtual disk of `size` bytes. */
  checkGuestRange(offset: number, length: number, size: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
      throw new Qcow2Error('qcow2.out-of-range', `${this.path}: range ${offset}+${length} is outside the virtual disk (${size} bytes)`);
    }
  }
}
