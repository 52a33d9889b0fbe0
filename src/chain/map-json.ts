/**
 * `image map --json`: qemu-img's JSON map text, byte for byte, written straight into byte
 * buffers as the chain is walked (no object or string per row).
 */
import { mapInto, type MapEntry, type MapOptions, type RowSink } from './map.js';

/**
 * `qemu-img map --output=json` of an image and its chain, byte for byte as qemu-img prints it,
 * handed to `write` in chunks of about a megabyte as the disk is walked: a fragmented disk has
 * hundreds of thousands of rows, which as objects and one joined string cost more in garbage
 * collection than the walk itself. `write` returns true when it is done with the chunk (it was
 * written synchronously), and then gets the same buffer again; otherwise each chunk is new.
 */
export async function mapImageJson(path: string, options: MapOptions, write: (chunk: Uint8Array) => boolean | void): Promise<void> {
  const writer = new MapJsonWriter(write);
  await mapInto(path, options, writer);
  writer.end(options.start ?? 0);
}

/** Text like qemu-img's JSON map: one object per line inside brackets. */
export function formatMapJson(entries: MapEntry[]): string {
  let text = '';
  const writer = new MapJsonWriter((chunk) => {
    text += Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength).toString('latin1');
  });
  for (const e of entries) writer.row(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset ?? null);
  writer.end(0);
  return text.slice(0, -1); // without the final newline, as before
}

/** Bytes at which MapJsonWriter hands its text on. */
const JSON_CHUNK = 1 << 20;

const ascii = (text: string): Uint8Array => Uint8Array.from(text, (c) => c.charCodeAt(0));
const FIRST_ROW = ascii('[{ "start": ');
const NEXT_ROW = ascii(',\n{ "start": ');
const LENGTH = ascii(', "length": ');
const DEPTH = ascii(', "depth": ');
/** ', "present": ..., "zero": ..., "data": ...' for each combination, indexed present * 4 + zero * 2 + data. */
const FLAGS = Array.from({ length: 8 }, (_, i) => ascii(`, "present": ${(i & 4) !== 0}, "zero": ${(i & 2) !== 0}, "data": ${(i & 1) !== 0}`));
const OFFSET = ascii(', "offset": ');
const ROW_END = ascii('}');
const MAP_END = ascii(']\n');

/**
 * Merges rows as qemu-img map does and writes each finished one as qemu-img prints it:
 * `[{ "start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},`
 * one per line, `]` and a newline after the last. A map with no rows (an empty range) is one
 * row of length 0 at its start, as in qemu-img. The text goes straight into byte buffers (no
 * string per row), each handed to `write` when full and never touched again.
 */
class MapJsonWriter implements RowSink {
  private pending = false;
  private start = 0;
  private length = 0;
  private depth = 0;
  private present = false;
  private zero = false;
  private data = false;
  /** -1 for none (see ExtentMerger). */
  private offset = -1;
  private buffer = new Uint8Array(JSON_CHUNK + 256);
  private at = 0;
  private rows = 0;
  private readonly digits = new Uint8Array(20);

  constructor(private readonly write: (chunk: Uint8Array) => boolean | void) {}

  row(start: number, length: number, depth: number, present: boolean, zero: boolean, data: boolean, offset: number | null): void {
    if (
      this.pending &&
      this.start + this.length === start &&
      this.depth === depth &&
      this.present === present &&
      this.zero === zero &&
      this.data === data &&
      (this.offset === -1) === (offset === null) &&
      (offset === null || this.offset + this.length === offset)
    ) {
      this.length += length;
      return;
    }
    if (this.pending) this.emit();
    this.pending = true;
    this.start = start;
    this.length = length;
    this.depth = depth;
    this.present = present;
    this.zero = zero;
    this.data = data;
    this.offset = offset ?? -1;
  }

  /** Write the last row and the closing bracket; `start` is where an empty map starts. */
  end(start: number): void {
    if (this.pending) this.emit();
    else if (this.rows === 0) {
      this.start = start;
      this.offset = -1;
      this.length = this.depth = 0;
      this.present = this.zero = this.data = false;
      this.emit();
    }
    this.pending = false;
    this.put(MAP_END);
    this.write(this.buffer.subarray(0, this.at));
    this.buffer = new Uint8Array(0);
    this.at = 0;
  }

  /** A few constant bytes (a loop: cheaper than Uint8Array.set for so few). */
  private put(bytes: Uint8Array): void {
    const buffer = this.buffer;
    let at = this.at;
    for (let i = 0; i < bytes.length; i += 1) buffer[at++] = bytes[i]!;
    this.at = at;
  }

  /** A non-negative integer (below 2^53) in decimal, in small-integer arithmetic. */
  private number(value: number): void {
    if (value < 1e9) {
      this.smallNumber(value, 0);
      return;
    }
    const high = Math.floor(value / 1e9);
    this.smallNumber(high, 0);
    this.smallNumber(value - high * 1e9, 9);
  }

  /** value < 1e9, left-padded with zeros to `width` digits. */
  private smallNumber(value: number, width: number): void {
    const digits = this.digits;
    let n = 0;
    let v = value | 0;
    do {
      const next = (v / 10) | 0;
      digits[n++] = 48 + v - next * 10;
      v = next;
    } while (v > 0);
    while (n < width) digits[n++] = 48;
    const buffer = this.buffer;
    let at = this.at;
    while (n > 0) buffer[at++] = digits[--n]!;
    this.at = at;
  }

  private emit(): void {
    this.put(this.rows === 0 ? FIRST_ROW : NEXT_ROW);
    this.number(this.start);
    this.put(LENGTH);
    this.number(this.length);
    this.put(DEPTH);
    this.number(this.depth);
    this.put(FLAGS[(this.present ? 4 : 0) + (this.zero ? 2 : 0) + (this.data ? 1 : 0)]!);
    if (this.offset !== -1) {
      this.put(OFFSET);
      this.number(this.offset);
    }
    this.put(ROW_END);
    this.rows += 1;
    // A row is under 200 bytes: the buffer has room for one more past JSON_CHUNK.
    if (this.at >= JSON_CHUNK) {
      // A writer that has consumed the bytes already (true) gets the same buffer again.
      if (this.write(this.buffer.subarray(0, this.at)) !== true) this.buffer = new Uint8Array(JSON_CHUNK + 256);
      this.at = 0;
    }
  }
}
