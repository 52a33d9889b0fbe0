/**
 * Whole metadata tables (L2 tables, refcount blocks) kept in memory, least recently used
 * first out, like QEMU's qcow2-cache.c. Dirty tables are never evicted: they leave only when
 * written back.
 */
import { Qcow2Error } from './errors.js';
import type { ImageFile } from './image-file.js';

export class TableCache {
  private readonly tables = new Map<number, Uint8Array>();
  private readonly dirty = new Set<number>();

  constructor(
    private readonly host: ImageFile,
    private readonly maxTables: number,
    /** Bytes of the host file in use or reserved: a table must lie below this. */
    private readonly limit: () => number,
  ) {}

  private checkTableOffset(offset: number, what: string): void {
    const { path, g } = this.host;
    if (offset % g.clusterSize !== 0) throw new Qcow2Error('qcow2.corrupt', `${path}: ${what} offset 0x${offset.toString(16)} is not cluster-aligned`);
    if (offset < g.clusterSize) throw new Qcow2Error('qcow2.corrupt', `${path}: ${what} offset 0x${offset.toString(16)} overlaps the header`);
    if (offset + g.clusterSize > this.limit()) {
      throw new Qcow2Error('qcow2.offset-past-eof', `${path}: ${what} at 0x${offset.toString(16)} is past the end of the file`);
    }
  }

  async load(offset: number, what: string): Promise<Uint8Array> {
    const hit = this.tables.get(offset);
    if (hit) {
      this.tables.delete(offset);
      this.tables.set(offset, hit);
      return hit;
    }
    this.checkTableOffset(offset, what);
    const table = new Uint8Array(this.host.g.clusterSize);
    await this.host.file.read(table, offset);
    if (this.tables.size >= this.maxTables) {
      for (const key of this.tables.keys()) {
        if (this.tables.size < this.maxTables) break;
        if (!this.dirty.has(key)) this.tables.delete(key);
      }
    }
    this.tables.set(offset, table);
    return table;
  }

  /** A table new at `offset` (not read from the file): cached and dirty. */
  add(offset: number, table: Uint8Array): void {
    this.tables.set(offset, table);
    this.dirty.add(offset);
  }

  markDirty(offset: number): void {
    this.dirty.add(offset);
  }

  /** Write the dirty tables in offset order (`written` after each), then all are clean. */
  async writeBack(written?: (offset: number) => void): Promise<void> {
    for (const offset of [...this.dirty].sort((a, b) => a - b)) {
      const table = this.tables.get(offset);
      if (table) await this.host.file.write(table, offset);
      written?.(offset);
    }
    this.dirty.clear();
  }
}
