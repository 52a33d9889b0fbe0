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

function unzstdCluster(compressed: Uint8Array, clusterSize: number): Uint8Array {
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
