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

function unzstdCluster(compressed: Uint8Array, clusterSize: number): Uint8Array {
  const out = new Uint8Array(clusterSize);
  let filled = 0;
  let overflow = false;
  const stream = new Decompress((chunk) => {
    if (filled + chunk.length > clusterSize) {
      overflow = true;
      return;
    }
    out.set(chunk, filled);
    filled += chunk.length;
  });
  try {
    stream.push(compressed, true);
  } catch (cause) {
    // The padding after the frame can look like a broken second frame; what counts is that
    // the first frame gave exactly one cluster.
    if (filled !== clusterSize) {
      throw new Qcow2Error('qcow2.decompress-failed', `zstd-compressed cluster does not decompress: ${(cause as Error).message}`, { cause });
    }
  }
  if (overflow || filled !== clusterSize) {
    throw new Qcow2Error('qcow2.decompress-failed', `zstd-compressed cluster decompressed to ${overflow ? 'more than' : filled} bytes, expected ${clusterSize}`);
  }
  return out;
}
