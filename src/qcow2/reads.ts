/**
 * The read path: guest bytes through an L1 table (the active one or a snapshot's). Contiguous
 * host ranges are read at once, unallocated ranges come from the backing source (or zeros),
 * and compressed clusters are inflated (the last one kept, as reads of it come in pieces).
 */
import type { ByteSource } from '../io/byte-source.js';
import { decompressCluster } from './compression.js';
import { Qcow2Error } from './errors.js';
import type { ImageFile } from './image-file.js';
import type { ClusterMap, L1View, MappedExtent } from './cluster-map.js';

/** Extent reads in flight at once within one readAt. */
const READ_PARALLELISM = 8;

export class DataReader {
  private lastDecompressed: { hostOffset: number; data: Uint8Array } | null = null;

  constructor(
    private readonly host: ImageFile,
    private readonly clusters: ClusterMap,
    /** The header's compression type (0 zlib, 1 zstd). */
    private readonly compressionType: number,
  ) {}

  /** Read [offset, offset+into.length) under `l1`, all of it inside the virtual disk. */
  async readView(l1: L1View, into: Uint8Array, offset: number, backing: ByteSource | null): Promise<void> {
    // Walk in bounded windows so a huge read does not build a huge extent list.
    const window = Math.max(this.host.g.l2Coverage, 64 * 1024 * 1024);
    for (let done = 0; done < into.length; ) {
      const n = Math.min(window, into.length - done);
      const extents = await this.clusters.mapIn(l1, offset + done, n);
      // Fragmented ranges become many small reads: keep a few in flight (the thread pool runs
      // them in parallel) instead of one at a time. Zero fills need no I/O and run inline.
      let next = 0;
      const worker = async () => {
        while (next < extents.length) {
          const extent = extents[next++]!;
          const start = extent.guestOffset - offset;
          await this.readExtent(extent, into.subarray(start, start + extent.length), backing);
        }
      };
      if (extents.length === 1) await worker();
      else await Promise.all(Array.from({ length: Math.min(READ_PARALLELISM, extents.length) }, worker));
      done += n;
    }
  }

  private async readExtent(extent: MappedExtent, target: Uint8Array, backing: ByteSource | null): Promise<void> {
    const m = extent.mapping;
    switch (m.kind) {
      case 'unallocated':
        if (backing) await backing.readAt(target, extent.guestOffset);
        else target.fill(0);
        return;
      case 'zero':
        target.fill(0);
        return;
      case 'normal': {
        // Like QEMU, bytes past the end of the host file read as zeros (HostFile.read fills).
        await (this.host.dataFile ?? this.host.file).read(target, m.hostOffset);
        return;
      }
      case 'compressed': {
        // Compressed extents never merge, so this is within one cluster.
        const data = await this.decompressedCluster(m.hostOffset, m.size);
        const within = extent.guestOffset % this.host.g.clusterSize;
        target.set(data.subarray(within, within + target.length));
        return;
      }
    }
  }

  private async decompressedCluster(hostOffset: number, size: number): Promise<Uint8Array> {
    if (this.lastDecompressed?.hostOffset === hostOffset) return this.lastDecompressed.data;
    const { path, file, length } = this.host;
    if (hostOffset >= length) {
      throw new Qcow2Error('qcow2.offset-past-eof', `${path}: compressed cluster at 0x${hostOffset.toString(16)} is past the end of the file`);
    }
    const stored = new Uint8Array(Math.min(size, length - hostOffset));
    await file.read(stored, hostOffset);
    const data = decompressCluster(stored, this.host.g.clusterSize, this.compressionType);
    this.lastDecompressed = { hostOffset, data };
    return data;
  }
}
