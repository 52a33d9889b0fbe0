/**
 * `measure`: how large a file a conversion (or a new image of --size) needs, with the numbers
 * and rules of qemu-img measure 7.2 (block/qcow2.c qcow2_measure, block/raw-format.c):
 * - raw output: the virtual size, whatever the content;
 * - qcow2 output: "fully-allocated" is the metadata for every cluster plus every cluster
 *   (qcow2_calc_prealloc_size); "required" replaces the data part by the output clusters that
 *   hold data in the source (zero and unallocated ranges are not counted). The metadata is still
 *   counted for the whole disk: qemu-img overestimates on purpose, and so does this;
 * - "bitmaps": the space the source's persistent bitmaps would take (qcow2 v3 output from a
 *   qcow2 source only, as qemu-img reports it).
 */
import type { FileSystemAccess } from '../io/host-file.js';
import { Qcow2Error } from '../qcow2/errors.js';
import { MAX_L1_BYTES } from '../qcow2/header.js';
import { infoImage } from './info.js';
import { chainStatus } from './map.js';
import { closeLayers, openLayers } from './map-layer.js';

export interface MeasureOptions {
  fs?: FileSystemAccess;
  /** Source format (-f); default qcow2. */
  sourceFormat?: 'qcow2' | 'raw';
  /** Output format (-O); default raw, like qemu-img. */
  outputFormat?: 'qcow2' | 'raw';
  clusterSize?: number;
  refcountBits?: number;
  extendedL2?: boolean;
  allowedDirectories?: string[];
}

/** Same key order as qemu-img's JSON; bitmaps only when qemu-img prints it. */
export interface MeasureResult {
  bitmaps?: number;
  required: number;
  'fully-allocated': number;
}

const roundUp = (n: number, to: number) => Math.ceil(n / to) * to;

/** qcow2_refcount_metadata_size: refcount blocks and table for `clusters`, counting themselves. */
function refcountMetadataSize(clusters: number, clusterSize: number, refcountBits: number): number {
  const blocksPerTableCluster = clusterSize / 8;
  const refcountsPerBlock = (clusterSize * 8) / refcountBits;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / refcountsPerBlock);
    table = Math.ceil(blocks / blocksPerTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** qcow2_calc_prealloc_size: a fully allocated qcow2 file of `size` bytes. */
export function qcow2FullyAllocatedSize(size: number, clusterSize: number, refcountBits: number, extendedL2: boolean): number {
  const aligned = roundUp(size, clusterSize);
  const l2EntrySize = extendedL2 ? 16 : 8;
  // qemu-img refuses a size whose L1 table would exceed QEMU's limit, as create does.
  if (Math.ceil(aligned / ((clusterSize * clusterSize) / l2EntrySize)) * 8 > MAX_L1_BYTES) {
    throw new Qcow2Error('qcow2.too-large', `the image size ${size} is too large for cluster size ${clusterSize} (try using a larger cluster size)`);
  }
  let meta = clusterSize; // header
  const l2Entries = roundUp(aligned / clusterSize, clusterSize / l2EntrySize);
  meta += l2Entries * l2EntrySize;
  const l1Entries = roundUp((l2Entries * l2EntrySize) / clusterSize, clusterSize / 8);
  meta += l1Entries * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountBits);
  return meta + aligned;
}

/** Persistent bitmaps as qcow2_measure_bitmaps counts them: every bitmap fully allocated. */
function bitmapsSize(bitmaps: Array<{ name: string; granularity: number }>, virtualSize: number, clusterSize: number): number {
  let total = 0;
  let directory = 0;
  for (const bm of bitmaps) {
    const bytes = Math.ceil(Math.ceil(virtualSize / bm.granularity) / 8);
    const clusters = Math.ceil(bytes / clusterSize);
    total += clusters * clusterSize;
    total += roundUp(clusters * 8, clusterSize); // bitmap table
    directory += roundUp(24 + Buffer.byteLength(bm.name), 8);
  }
  return total + roundUp(directory, clusterSize);
}

/** Measure for a new image of `size` bytes (qemu-img measure --size). */
export function measureSize(size: number, options: MeasureOptions = {}): MeasureResult {
  const virtualSize = roundUp(size, 512);
  if ((options.outputFormat ?? 'raw') === 'raw') return { required: virtualSize, 'fully-allocated': virtualSize };
  const { clusterSize, refcountBits, extendedL2 } = qcow2Parameters(options);
  const full = qcow2FullyAllocatedSize(virtualSize, clusterSize, refcountBits, extendedL2);
  // Nothing to copy: the required size is the metadata alone.
  return { required: full - roundUp(virtualSize, clusterSize), 'fully-allocated': full };
}

function qcow2Parameters(options: MeasureOptions): { clusterSize: number; refcountBits: number; extendedL2: boolean } {
  const clusterSize = options.clusterSize ?? 65536;
  const refcountBits = options.refcountBits ?? 16;
  const extendedL2 = options.extendedL2 ?? false;
  if (!Number.isInteger(Math.log2(clusterSize)) || clusterSize < 512 || clusterSize > 2 * 1024 * 1024 || (extendedL2 && clusterSize < 16384)) {
    throw new Qcow2Error('qcow2.bad-argument', `cluster size ${clusterSize} must be a power of two between 512 (16 KiB with extended L2) and 2 MiB`);
  }
  if (!Number.isInteger(Math.log2(refcountBits)) || refcountBits < 1 || refcountBits > 64) {
    throw new Qcow2Error('qcow2.bad-argument', `refcount width ${refcountBits} must be a power of two between 1 and 64`);
  }
  return { clusterSize, refcountBits, extendedL2 };
}

/** Measure for converting the image at `path` (with its backing chain) to the output format. */
export async function measureImage(path: string, options: MeasureOptions = {}): Promise<MeasureResult> {
  const sourceFormat = options.sourceFormat ?? 'qcow2';
  const outputFormat = options.outputFormat ?? 'raw';
  const params = outputFormat === 'qcow2' ? qcow2Parameters(options) : undefined;
  const layers = await openLayers(path, { fs: options.fs, format: sourceFormat, allowedDirectories: options.allowedDirectories });
  let dataBytes = 0;
  let size: number;
  try {
    size = roundUp(layers[0]!.size, 512);
    if (!params) return { required: size, 'fully-allocated': size };
    // Every output cluster that holds some data counts whole, once (qemu-img rounds each data
    // run up to the cluster end and goes on from there).
    const cs = params.clusterSize;
    let countedTo = 0;
    const span = 2 ** 30;
    for (let from = 0; from < layers[0]!.size; from += span) {
      for (const row of await chainStatus(layers, from, Math.min(layers[0]!.size, from + span))) {
        if (!row.data || row.zero) continue;
        const first = Math.max(countedTo, Math.floor(row.start / cs) * cs);
        const end = roundUp(row.start + row.length, cs);
        if (end > first) dataBytes += end - first;
        countedTo = Math.max(countedTo, end);
      }
    }
  } finally {
    await closeLayers(layers);
  }
  const full = qcow2FullyAllocatedSize(size, params.clusterSize, params.refcountBits, params.extendedL2);
  // qemu-img works on the size rounded up to whole clusters, in both terms.
  const result: MeasureResult = { required: full - roundUp(size, params.clusterSize) + dataBytes, 'fully-allocated': full };
  if (sourceFormat === 'qcow2') {
    const [info] = await infoImage(path, { fs: options.fs, format: 'qcow2', allowedDirectories: options.allowedDirectories });
    // Only a v3 source supports persistent bitmaps; qemu-img leaves the key out otherwise.
    if (info?.['format-specific']?.data.compat !== '1.1') return result;
    const bitmaps = info?.['format-specific']?.data.bitmaps ?? [];
    return { bitmaps: bitmapsSize(bitmaps, size, params.clusterSize), ...result };
  }
  return result;
}
