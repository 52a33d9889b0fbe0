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
