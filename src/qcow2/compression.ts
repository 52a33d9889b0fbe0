/**
 * Decompression of compressed clusters. The stored bytes run to the end of a 512-byte sector,
 * so the compressed stream is followed by padding the decoders must ignore; output is always
 * exactly one cluster and never allowed to grow past it.
 */
import { constants, inflateRawSync } from 'node:zlib';
import { Decompress } from 'fzstd';
import { Qcow2Error } from './errors.js';
import { CompressionType } from './header.js';

export function decompressCluster(compressed: Uint8Array, clusterSize: number, type: number): Uint8Array {
  if (type === CompressionType.deflate) return inflateCluster(compressed, clusterSize);
  if (type === CompressionType.zstd) return unzstdCluster(compressed, clusterSize);
  throw new Qcow2Error('qcow2.unsupported-feature', `compression type ${type} is not supported`);
}

function inflateCluster(compressed: Uint8Array, clusterSize: number): Uint8Array {
  let out: Buffer;
  try {
    // Sync flush: QEMU's stream may end without the final-block marker being followed by
    // anything we can rely on; trailing sector padding after the stream end is ignored.
    out = inflateRawSync(compressed, { windowBits: 12, finishFlush: constants.Z_SYNC_FLUSH, maxOutputLength: clusterSize });
  } catch (cause) {
    throw new Qcow2Error('qcow2.decompress-failed', `deflate-compressed cluster does not decompress: ${(cause as Error).message}`, { cause });
  }
  if (out.length !== clusterSize) {
    throw new Qcow2Error('qcow2.decompress-failed', `deflate-compressed cluster decompressed to ${out.length} bytes, expected ${clusterSize}`);
  }
  return out;
}

/** Thrown from the zstd output callback to stop decoding once the cluster is full. */
class ClusterFull extends Error {}

/** Largest zstd window accepted: QEMU's clusters are at most 2 MiB, so its frames never need more. */
const MAX_ZSTD_WINDOW = 8 * 1024 * 1024;

/**
 * Read the window (or single-segment content) size from a zstd frame header, so a hostile
 * frame cannot make the decoder allocate gigabytes before failing.
 */
function zstdWindowSize(frame: Uint8Array): number {
  if (frame.length < 6) throw new Qcow2Error('qcow2.decompress-failed', 'zstd-compressed cluster is too short for a frame header');
  const magic = (frame[0]! | (frame[1]! << 8) | (frame[2]! << 16) | (frame[3]! << 24)) >>> 0;
  if (magic !== 0xfd2fb528) throw new Qcow2Error('qcow2.decompress-failed', `zstd-compressed cluster has bad frame magic 0x${magic.toString(16)}`);
  const descriptor = frame[4]!;
  const singleSegment = (descriptor & 0x20) !== 0;
  if (!singleSegment) {
    const wd = frame[5]!;
    const base = 2 ** (10 + (wd >> 3));
    return base + (base / 8) * (wd & 7);
  }
  const dictionaryBytes = [0, 1, 2, 4][descriptor & 3]!;
  const sizeFlag = descriptor >> 6;
  const sizeBytes = [1, 2, 4, 8][sizeFlag]!;
  const at = 5 + dictionaryBytes;
  if (frame.length < at + sizeBytes) throw new Qcow2Error('qcow2.decompress-failed', 'zstd frame header is truncated');
  let size = 0;
  for (let i = sizeBytes - 1; i >= 0; i--) size = size * 256 + frame[at + i]!;
  return sizeFlag === 1 ? size + 256 : size;
}

function unzstdCluster(compressed: Uint8Array, clusterSize: number): Uint8Array {
  const window = zstdWindowSize(compressed);
  if (window > Math.max(MAX_ZSTD_WINDOW, clusterSize)) {
    throw new Qcow2Error('qcow2.decompress-failed', `zstd-compressed cluster asks for a ${window}-byte window (limit ${MAX_ZSTD_WINDOW})`);
  }
  const out = new Uint8Array(clusterSize);
  let filled = 0;
  const stream = new Decompress((chunk) => {
    const take = Math.min(chunk.length, clusterSize - filled);
    out.set(chunk.subarray(0, take), filled);
    filled += take;
    // Like QEMU, stop as soon as one cluster of output exists: what follows is sector padding.
    if (filled === clusterSize) throw new ClusterFull();
  });
  try {
    stream.push(compressed, true);
  } catch (cause) {
    if (!(cause instanceof ClusterFull) && filled !== clusterSize) {
      throw new Qcow2Error('qcow2.decompress-failed', `zstd-compressed cluster does not decompress: ${(cause as Error).message}`, { cause });
    }
  }
  if (filled !== clusterSize) {
    throw new Qcow2Error('qcow2.decompress-failed', `zstd-compressed cluster decompressed to ${filled} bytes, expected ${clusterSize}`);
  }
  return out;
}
