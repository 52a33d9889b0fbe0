/**
 * Writing a desktop's apps layer: a qcow2 over the base whose clusters hold the assigned app
 * files' bytes at the guest offsets their placeholders took. Where the store's file system can
 * share blocks (XFS reflink, btrfs), each app block is cloned from the app's payload.bin, so
 * every desktop's apps layer points at the same host blocks and only its tables, and the base
 * bytes of clusters an app file covers only partly, cost space. Elsewhere the bytes are copied.
 *
 * The layer reads exactly as one written through the engine would: inside app extents the
 * app's bytes (zeros past a file's end up to its block's end, which is what the payload holds
 * there too), elsewhere in each touched cluster the base's bytes, and untouched clusters fall
 * through to the base.
 */
import { dirname } from 'node:path';
import type { ByteSource } from '../io/byte-source.js';
import { cloneRange } from '../io/clone-range.js';
import type { FileSystemAccess, HostFile } from '../io/host-file.js';
import { createImage } from '../qcow2/create.js';
import { Qcow2Image } from '../qcow2/image.js';
import { AppBytes } from './app-bytes.js';
import { PAYLOAD_ALIGNMENT } from './app.js';
import type { LocatedFile } from './state.js';

/** Copies are written in pieces of at most this much. */
const COPY_CHUNK = 8 << 20;

export interface AppsLayerOptions {
  path: string;
  /** Virtual size (the user delta's). */
  size: number;
  /** The base as the new layer names it (relative to the layer's folder). */
  backing: { path: string; format: 'qcow2' };
  /** The base's content, for the base bytes of partly covered clusters. */
  base: ByteSource;
  files: LocatedFile[];
  /** The open payload of an app (name@version). */
  payloadOf: (app: string) => HostFile;
  fs: FileSystemAccess;
  /** Never clone (tests; stores that must not share blocks). */
  noClone?: boolean;
}

export interface AppsLayerReport {
  /** App bytes whose blocks the layer shares with the payloads. */
  bytesCloned: number;
  /** Bytes written: app bytes that could not be cloned, and base bytes of partly covered clusters. */
  bytesCopied: number;
  /** Why nothing more was cloned (null when every app block was). */
  cloneUnavailable: string | null;
}

type Segment =
  | { kind: 'clone'; host: number; length: number; app: string; payloadOffset: number; guest: number }
  | { kind: 'copy'; host: number; length: number; guest: number; appOnly: boolean };

/** Host segments of one cluster, block by block, merged with the previous segment where they continue it. */
function planCluster(segments: Segment[], bytes: AppBytes, guestCluster: number, host: number, clusterSize: number, canClone: boolean): void {
  const block = PAYLOAD_ALIGNMENT;
  for (let at = 0; at < clusterSize; at += block) {
    const guest = guestCluster * clusterSize + at;
    const source = bytes.sourceAt(guest);
    const last = segments[segments.length - 1];
    const contiguous = last !== undefined && last.host + last.length === host + at && last.guest + last.length === guest;
    if (canClone && source && source.runEnd >= guest + block && source.payloadOffset % block === 0) {
      if (contiguous && last.kind === 'clone' && last.app === source.app && last.payloadOffset + last.length === source.payloadOffset) last.length += block;
      else segments.push({ kind: 'clone', host: host + at, length: block, app: source.app, payloadOffset: source.payloadOffset, guest });
      continue;
    }
    const appOnly = bytes.covers(guest, block);
    if (contiguous && last.kind === 'copy' && last.appOnly === appOnly && last.length < COPY_CHUNK) last.length += block;
    else segments.push({ kind: 'copy', host: host + at, length: block, guest, appOnly });
  }
}

/** Fill `into` with what the layer must read at guest `offset`: base bytes, app bytes laid over. */
async function guestBytes(into: Buffer, offset: number, appOnly: boolean, base: ByteSource, bytes: AppBytes): Promise<void> {
  if (appOnly) await bytes.read(into, offset);
  else {
    await base.readAt(into, offset);
    await bytes.overlay(into, offset);
  }
}

/** Create the apps layer at options.path (replacing any partial one) and fill it; durable on return. */
export async function writeAppsLayer(options: AppsLayerOptions): Promise<AppsLayerReport> {
  const { fs } = options;
  await createImage({ path: options.path, size: options.size, backing: options.backing, exclusive: false, fs });
  const image = await Qcow2Image.open(options.path, { writable: true, fs });
  const report: AppsLayerReport = { bytesCloned: 0, bytesCopied: 0, cloneUnavailable: options.noClone ? 'cloning is turned off' : null };
  try {
    const clusterSize = image.clusterSize;
    const bytes = new AppBytes(options.files, options.payloadOf);
    const clusters = new Set<number>();
    for (const range of bytes.ranges()) {
      for (let c = Math.floor(range.offset / clusterSize); c * clusterSize < range.offset + range.length; c++) clusters.add(c);
    }
    const mapped = await image.allocateDataClusters([...clusters]);
    const segments: Segment[] = [];
    for (const { guestCluster, hostOffset } of mapped) planCluster(segments, bytes, guestCluster, hostOffset, clusterSize, !options.noClone);

    const out = await fs.open(options.path, 'write');
    try {
      // Clones go into a range inside the file, never past its end.
      const end = mapped.reduce((max, m) => Math.max(max, m.hostOffset + clusterSize), 0);
      if (end > (await out.length())) await out.truncate(end);
      const buffer = Buffer.allocUnsafe(COPY_CHUNK);
      for (const segment of segments) {
        if (segment.kind === 'clone' && report.cloneUnavailable === null) {
          const result = cloneRange(options.payloadOf(segment.app), segment.payloadOffset, out, segment.host, segment.length);
          if (result.cloned) {
            report.bytesCloned += segment.length;
            continue;
          }
          report.cloneUnavailable = result.reason;
        }
        for (let done = 0; done < segment.length; done += COPY_CHUNK) {
          const piece = buffer.subarray(0, Math.min(COPY_CHUNK, segment.length - done));
          await guestBytes(piece, segment.guest + done, segment.kind === 'clone' || segment.appOnly, options.base, bytes);
          await out.write(piece, segment.host + done);
          report.bytesCopied += piece.length;
        }
      }
      await out.sync();
    } finally {
      await out.close();
    }
    await image.flush();
  } finally {
    await image.close();
  }
  await fs.syncDirectory(dirname(options.path));
  return report;
}
