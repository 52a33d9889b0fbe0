/**
 * A forward-only walk over a chain's block status (map.ts) for copiers such as convert: where is
 * the next byte that may hold data, and what are the rows of a window. Ranges without data are
 * skipped whole, in spans that double while they stay empty, so an empty 1 PiB disk costs a few
 * thousand map calls (one per L1 entry at most, inside map.ts) instead of one per 2 MiB window.
 */
import { chainStatus, type MapEntry } from './map.js';
import type { MapLayer } from './map-layer.js';

/** The first span scanned after data: small, so the rows kept in memory stay few. */
const MIN_SPAN = 1 << 30;
/** The largest span: 1 TiB of unallocated qcow2 is 2,048 L1 entries with 64 KiB clusters. */
const MAX_SPAN = 2 ** 40;

export class MapCursor {
  /** Rows from rows[first] up to scannedEnd, merged as map.ts returns them. */
  private rows: MapEntry[] = [];
  private first = 0;
  private scannedEnd: number;
  private span = MIN_SPAN;

  /**
   * `align`: callers read windows that start at multiples of it, so rows are kept back to the
   * window boundary before the next data (a window's zero rows clear its buffer).
   */
  constructor(
    private readonly layers: MapLayer[],
    start: number,
    private readonly end: number,
    private readonly align: number,
  ) {
    this.scannedEnd = start;
  }

  /** Map the next span; it grows while spans come back without data. */
  private async scan(): Promise<void> {
    const to = Math.min(this.end, this.scannedEnd + this.span);
    const added = await chainStatus(this.layers, this.scannedEnd, to);
    this.span = added.some((row) => row.data) ? MIN_SPAN : Math.min(MAX_SPAN, this.span * 2);
    for (const row of added) this.rows.push(row);
    this.scannedEnd = to;
  }

  /** Forget rows that end at or before `position`. */
  private drop(position: number): void {
    while (this.first < this.rows.length && this.rows[this.first]!.start + this.rows[this.first]!.length <= position) this.first += 1;
    if (this.first > 4096) {
      this.rows = this.rows.slice(this.first);
      this.first = 0;
    }
  }

  /** The first byte at or after `position` that a data row covers, or the end when none does. */
  async nextData(position: number): Promise<number> {
    this.drop(position);
    for (;;) {
      for (let index = this.first; index < this.rows.length; index += 1) {
        const row = this.rows[index]!;
        if (row.data && row.start + row.length > position) return Math.max(position, row.start);
      }
      if (this.scannedEnd >= this.end) return this.end;
      // Nothing before scannedEnd has data: only the rows of its window can still be needed.
      this.drop(Math.max(position, Math.floor(this.scannedEnd / this.align) * this.align));
      await this.scan();
    }
  }

  /** The rows covering [from, to), cut to that range (host offsets moved with the cut). */
  async window(from: number, to: number): Promise<MapEntry[]> {
    while (this.scannedEnd < Math.min(to, this.end)) {
      this.span = MIN_SPAN; // a window is small: do not scan far past it
      await this.scan();
    }
    this.drop(from);
    const out: MapEntry[] = [];
    for (let index = this.first; index < this.rows.length; index += 1) {
      const row = this.rows[index]!;
      if (row.start >= to) break;
      const start = Math.max(from, row.start);
      const end = Math.min(to, row.start + row.length);
      if (end <= start) continue;
      const cut: MapEntry = { ...row, start, length: end - start };
      if (row.offset !== undefined) cut.offset = row.offset + (start - row.start);
      out.push(cut);
    }
    return out;
  }
}
