/**
 * Block-granular reads of one filesystem through its partition's ByteSource, with a small LRU
 * cache for metadata (group descriptors, inode table blocks, tree nodes, directory blocks).
 * File data bypasses the cache and is read in large coalesced runs. Counters let tests and the
 * benchmark prove a lookup reads only what it needs.
 */
import type { ByteSource } from '../../io/byte-source.js';
import { corrupt } from '../errors.js';

export interface ReadStats {
  /** Metadata blocks fetched from the source (cache misses). */
  metadataBlocksRead: number;
  /** Every byte fetched from the source, metadata and data. */
  bytesRead: number;
  cacheHits: number;
}

export class BlockReader {
  private readonly cache = new Map<number, Buffer>();
  readonly stats: ReadStats = { metadataBlocksRead: 0, bytesRead: 0, cacheHits: 0 };

  constructor(
    readonly source: ByteSource,
    readonly blockSize: number,
    readonly blocksCount: number,
    private readonly cacheBlocks = 4096,
  ) {}

  /** Throws fs.corrupt when [block, block+count) is not inside the filesystem. */
  checkRange(block: number, count: number, what: string): void {
    if (!Number.isSafeInteger(block) || block < 0 || count < 0 || block + count > this.blocksCount) {
      throw corrupt(`${what} points at block ${block}${count > 1 ? `+${count}` : ''}, outside the ${this.blocksCount}-block filesystem`);
    }
  }

  /** One metadata block (cached). The returned buffer is shared: never modify it. */
  async block(block: number, what: string): Promise<Buffer> {
    const hit = this.cache.get(block);
    if (hit) {
      this.stats.cacheHits += 1;
      // Re-insert to mark it most recently used.
      this.cache.delete(block);
      this.cache.set(block, hit);
      return hit;
    }
    this.checkRange(block, 1, what);
    const data = Buffer.alloc(this.blockSize);
    await this.source.readAt(data, block * this.blockSize);
    this.stats.metadataBlocksRead += 1;
    this.stats.bytesRead += this.blockSize;
    this.cache.set(block, data);
    if (this.cache.size > this.cacheBlocks) {
      const oldest = this.cache.keys().next().value;
      if (oldest !== undefined) this.cache.delete(oldest);
    }
    return data;
  }

  /** Uncached read of raw bytes at a byte offset of the filesystem (file data). */
  async readBytesAt(into: Uint8Array, offset: number): Promise<void> {
    await this.source.readAt(into, offset);
    this.stats.bytesRead += into.length;
  }
}
