/**
 * The one read interface shared by every layer above the host files: a raw disk file, a qcow2
 * backing chain, and a partition window inside either all look like this. The ext4 reader only
 * ever sees a ByteSource, which is why it can be tested on raw files and used on chains.
 */
export interface ByteSource {
  /** Addressable size in bytes (for an image: the virtual disk size). */
  readonly size: number;
  /**
   * Fill `into` with the bytes at [offset, offset + into.length). Bytes at or past `size` read
   * as zero, like a disk read past the end of a short backing file.
   */
  readAt(into: Uint8Array, offset: number): Promise<void>;
}

/** A source that can also be written in place (the writable top of a chain, a raw file). */
export interface WritableByteSource extends ByteSource {
  writeAt(data: Uint8Array, offset: number): Promise<void>;
}

/** Read `length` bytes at `offset` into a fresh buffer. */
export async function readBytes(source: ByteSource, offset: number, length: number): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  await source.readAt(buffer, offset);
  return buffer;
}

/** A window [start, start + length) of another source, e.g. a partition on a virtual disk. */
export function windowOf(source: ByteSource, start: number, length: number): ByteSource {
  if (start < 0 || length < 0 || !Number.isSafeInteger(start + length)) {
    throw new RangeError(`invalid window ${start}+${length}`);
  }
  return {
    size: length,
    async readAt(into, offset) {
      const inside = Math.max(0, Math.min(into.length, length - offset));
      if (inside < into.length) into.fill(0, Math.max(0, inside));
      if (inside > 0) await source.readAt(into.subarray(0, inside), start + offset);
    },
  };
}

/** An in-memory source, for tests and small synthetic disks. */
export function bufferSource(data: Uint8Array): ByteSource {
  return {
    size: data.length,
    async readAt(into, offset) {
      into.fill(0);
      if (offset < data.length) into.set(data.subarray(offset, Math.min(data.length, offset + into.length)));
    },
  };
}
