import type { HostFile } from '../io/host-file.js';
import type { DiskRange } from './ranges.js';
import type { LocatedFile } from './state.js';

/** One extent of one located file, with where its bytes come from. */
interface Piece {
  diskOffset: number;
  length: number;
  /** Offset of the piece's first byte inside the file. */
  fileOffset: number;
  file: LocatedFile;
}

/**
 * What the virtual disk must read inside the located app files' extents: each file's bytes
 * from its app's payload, and zeros past the file's end up to its last block's end (that is what
 * the placeholder held there, so dropping it changes nothing the guest can see).
 */
export class AppBytes {
  private readonly pieces: Piece[];

  constructor(
    files: LocatedFile[],
    /** Opens the payload of `file.app` (name@version). */
    private readonly payloadOf: (app: string) => HostFile,
  ) {
    this.pieces = files
      .flatMap((file) => file.extents.map((e) => ({ diskOffset: e.diskOffset, length: e.length, fileOffset: e.fileOffset, file })))
      .sort((a, b) => a.diskOffset - b.diskOffset);
  }

  /** Every extent, as disk ranges in disk order. */
  ranges(): DiskRange[] {
    return this.pieces.map((p) => ({ offset: p.diskOffset, length: p.length }));
  }

  /** Fill `into` with the app bytes of [offset, offset + into.length); it must lie inside extents. */
  async read(into: Uint8Array, offset: number): Promise<void> {
    const end = offset + into.length;
    let cursor = offset;
    let index = this.firstPieceEndingAfter(offset);
    while (cursor < end) {
      const piece = this.pieces[index];
      if (!piece || piece.diskOffset > cursor) throw new RangeError(`disk byte ${cursor} is not inside any app file extent`);
      const pieceEnd = piece.diskOffset + piece.length;
      const take = Math.min(end, pieceEnd) - cursor;
      const target = into.subarray(cursor - offset, cursor - offset + take);
      const inFile = piece.fileOffset + (cursor - piece.diskOffset);
      const fromFile = Math.max(0, Math.min(take, piece.file.size - inFile));
      if (fromFile > 0) await this.payloadOf(piece.file.app).read(target.subarray(0, fromFile), piece.file.payloadOffset + inFile);
      target.fill(0, fromFile);
      cursor += take;
      index += 1;
    }
  }

  /**
   * Where the app byte at disk `offset` comes from: its payload (app name@version) and offset in
   * it, and how far the same contiguous payload run goes on the disk. Null outside every
   * extent, or past the file's end inside its last block (those bytes read as zeros).
   */
  sourceAt(offset: number): { app: string; payloadOffset: number; runEnd: number } | null {
    const piece = this.pieces[this.firstPieceEndingAfter(offset)];
    if (!piece || piece.diskOffset > offset) return null;
    const inFile = piece.fileOffset + (offset - piece.diskOffset);
    return { app: piece.file.app, payloadOffset: piece.file.payloadOffset + inFile, runEnd: piece.diskOffset + piece.length };
  }

  /** Does [offset, offset + length) lie wholly inside extents? */
  covers(offset: number, length: number): boolean {
    for (let cursor = offset, index = this.firstPieceEndingAfter(offset); cursor < offset + length; index += 1) {
      const piece = this.pieces[index];
      if (!piece || piece.diskOffset > cursor) return false;
      cursor = piece.diskOffset + piece.length;
    }
    return true;
  }

  /** Lay the app bytes of every extent that meets [offset, offset + into.length) over `into`. */
  async overlay(into: Uint8Array, offset: number): Promise<void> {
    const end = offset + into.length;
    for (let index = this.firstPieceEndingAfter(offset); index < this.pieces.length; index += 1) {
      const piece = this.pieces[index]!;
      if (piece.diskOffset >= end) break;
      const from = Math.max(offset, piece.diskOffset);
      const to = Math.min(end, piece.diskOffset + piece.length);
      await this.read(into.subarray(from - offset, to - offset), from);
    }
  }

  private firstPieceEndingAfter(offset: number): number {
    let low = 0;
    let high = this.pieces.length;
    while (low < high) {
      const mid = (low + high) >> 1;
      const piece = this.pieces[mid]!;
      if (piece.diskOffset + piece.length <= offset) low = mid + 1;
      else high = mid;
    }
    return low;
  }
}
