/**
 * Create a new qcow2 image. The whole metadata layout is computed up front (header, refcount
 * table, L1, refcount blocks, and with preallocation=metadata every L2 table and data cluster)
 * so the refcounts are exact from the first write: cluster 0 header, then the refcount table,
 * the L1 table, the refcount blocks, L2 tables, and data clusters last (left sparse).
 */
import { isAbsolute, resolve } from 'node:path';
import { nodeFileSystem, syncParentDirectory, type FileSystemAccess } from '../io/host-file.js';
import { resolveReferencedPath } from './referenced-names.js';
import { ChainError, Qcow2Error } from './errors.js';
import {
  Compatible,
  ExtensionType,
  HEADER_V2_LENGTH,
  HEADER_V3_LENGTH,
  Incompatible,
  MAX_CLUSTER_BITS,
  MAX_L1_BYTES,
  MAX_REFTABLE_BYTES,
  MAX_VIRTUAL_SIZE,
  MIN_CLUSTER_BITS,
  serializeHeader,
  standardFeatureNameTable,
  stringExtensionData,
  type HeaderExtension,
  type Qcow2Header,
} from './header.js';
import { COPIED_HI, encodeEntry, geometry, setRefcount, writeL2Entry } from './layout.js';
import { Qcow2Image } from './image.js';

export interface CreateImageOptions {
  path: string;
  /** Virtual size in bytes (rounded up to 512). Default: the backing file's virtual size. */
  size?: number;
  version?: 2 | 3;
  /** 9..21; default 16 (64 KiB). */
  clusterBits?: number;
  /** 1, 2, 4, ..., 64; default 16. */
  refcountBits?: number;
  extendedL2?: boolean;
  /** Backing file: the name is stored as given; a relative name is resolved against the new image's folder. */
  backing?: { path: string; format: 'qcow2' | 'raw' };
  preallocation?: 'off' | 'metadata';
  lazyRefcounts?: boolean;
  /** Refuse to replace an existing file (default true). */
  exclusive?: boolean;
  fs?: FileSystemAccess;
}

function bad(message: string): never {
  throw new Qcow2Error('qcow2.bad-argument', `createImage: ${message}`);
}

async function backingSize(path: string, format: 'qcow2' | 'raw', fs: FileSystemAccess): Promise<number> {
  try {
    return await openBackingSize(path, format, fs);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT' || (error as Qcow2Error).code === 'qcow2.not-found') {
      throw new ChainError('chain.backing-not-found', `createImage: backing file ${path} does not exist`, { cause: error });
    }
    throw error;
  }
}

async function openBackingSize(path: string, format: 'qcow2' | 'raw', fs: FileSystemAccess): Promise<number> {
  if (format === 'raw') {
    const file = await fs.open(path, 'read');
    try {
      return await file.length();
    } finally {
      await file.close();
    }
  }
  const image = await Qcow2Image.open(path, { fs });
  try {
    return image.size;
  } finally {
    await image.close();
  }
}

/** Create the image and return its header. The file is fsynced, and its folder too. */
export async function createImage(options: CreateImageOptions): Promise<Qcow2Header> {
  const fs = options.fs ?? nodeFileSystem;
  const version = options.version ?? 3;
  const clusterBits = options.clusterBits ?? 16;
  const refcountBits = options.refcountBits ?? 16;
  const extendedL2 = options.extendedL2 ?? false;
  const lazyRefcounts = options.lazyRefcounts ?? false;
  const preallocate = (options.preallocation ?? 'off') === 'metadata';
  if (version !== 2 && version !== 3) bad(`version ${String(version)} (must be 2 or 3)`);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) bad(`clusterBits ${clusterBits} (must be ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS})`);
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) bad(`refcountBits ${refcountBits} (must be a power of two from 1 to 64)`);
  if (version === 2 && (refcountBits !== 16 || extendedL2 || lazyRefcounts)) bad('version 2 supports only 16-bit refcounts, no extended L2 and no lazy refcounts');
  if (extendedL2 && clusterBits < 14) bad('extended L2 entries need clusters of at least 16 KiB');

  let backingName: string | null = null;
  let backingFormat: 'qcow2' | 'raw' | null = null;
  let size = options.size;
  if (options.backing) {
    if (options.backing.format !== 'qcow2' && options.backing.format !== 'raw') bad(`backing format ${String(options.backing.format)}`);
    backingName = options.backing.path;
    backingFormat = options.backing.format;
    const resolved = resolveReferencedPath(backingName, resolve(options.path), 'backing file');
    // Like qemu-img create: the backing file must exist and be of the stated format.
    const backingVirtualSize = await backingSize(resolved, backingFormat, fs);
    if (size === undefined) size = backingVirtualSize;
  }
  if (size === undefined) bad('size is required without a backing file');
  if (!Number.isSafeInteger(size) || size < 0 || size > MAX_VIRTUAL_SIZE) bad(`size ${size}`);
  size = Math.ceil(size / 512) * 512;

  const g = geometry(clusterBits, extendedL2, refcountOrder);
  const cs = g.clusterSize;
  const l1Entries = Math.ceil(size / g.l2Coverage);
  if (l1Entries * 8 > MAX_L1_BYTES) throw new Qcow2Error('qcow2.too-large', `createImage: size ${size} needs an L1 table over ${MAX_L1_BYTES} bytes`);
  const l1Clusters = Math.max(1, Math.ceil((l1Entries * 8) / cs));
  const dataClusters = preallocate ? Math.ceil(size / cs) : 0;
  const l2Tables = preallocate ? l1Entries : 0;

  // Refcount blocks and table must count themselves: iterate to a fixed point.
  let refblocks = 1;
  let reftableClusters = 1;
  let total = 0;
  for (;;) {
    total = 1 + reftableClusters + l1Clusters + refblocks + l2Tables + dataClusters;
    const needBlocks = Math.ceil(total / g.refcountBlockEntries);
    const needTable = Math.max(1, Math.ceil((needBlocks * 8) / cs));
    if (needBlocks === refblocks && needTable === reftableClusters) break;
    refblocks = Math.max(refblocks, needBlocks);
    reftableClusters = Math.max(reftableClusters, needTable);
  }
  if (reftableClusters * cs > MAX_REFTABLE_BYTES) throw new Qcow2Error('qcow2.too-large', 'createImage: refcount table would exceed 8 MiB');

  const reftableAt = 1;
  const l1At = reftableAt + reftableClusters;
  const refblocksAt = l1At + l1Clusters;
  const l2At = refblocksAt + refblocks;
  const dataAt = l2At + l2Tables;
  const metadataClusters = dataAt;

  const extensions: HeaderExtension[] = [];
  if (backingFormat) extensions.push({ type: ExtensionType.backingFormat, data: stringExtensionData(backingFormat) });
  if (version === 3) extensions.push({ type: ExtensionType.featureNameTable, data: standardFeatureNameTable() });

  const header: Qcow2Header = {
    version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits,
    size,
    cryptMethod: 0,
    l1Size: l1Entries,
    l1TableOffset: l1At * cs,
    refcountTableOffset: reftableAt * cs,
    refcountTableClusters: reftableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: extendedL2 ? Incompatible.extendedL2 : 0n,
    compatibleFeatures: lazyRefcounts ? Compatible.lazyRefcounts : 0n,
    autoclearFeatures: 0n,
    refcountOrder,
    headerLength: version === 3 ? HEADER_V3_LENGTH : HEADER_V2_LENGTH,
    compressionType: 0,
    extensions,
    backingFile: backingName,
  };

  // All metadata in one buffer, written with one call.
  const meta = new Uint8Array(metadataClusters * cs);
  const metaView = new DataView(meta.buffer);
  const serialized = serializeHeader(header);
  meta.set(serialized.bytes, 0);
  for (let b = 0; b < refblocks; b++) encodeEntry(metaView, reftableAt * cs + b * 8, (refblocksAt + b) * cs, 0, 0);
  for (let b = 0; b < refblocks; b++) {
    const block = meta.subarray((refblocksAt + b) * cs, (refblocksAt + b + 1) * cs);
    const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
    const first = b * g.refcountBlockEntries;
    const last = Math.min(total, first + g.refcountBlockEntries);
    for (let c = first; c < last; c++) setRefcount(block, view, c - first, refcountOrder, 1);
  }
  if (preallocate) {
    for (let t = 0; t < l2Tables; t++) {
      encodeEntry(metaView, l1At * cs + t * 8, (l2At + t) * cs, COPIED_HI, 0);
      const table = meta.subarray((l2At + t) * cs, (l2At + t + 1) * cs);
      const view = new DataView(table.buffer, table.byteOffset, table.byteLength);
      for (let i = 0; i < g.l2Entries; i++) {
        const guestCluster = t * g.l2Entries + i;
        if (guestCluster >= dataClusters) break;
        const host = (dataAt + guestCluster) * cs;
        writeL2Entry(view, i, g, { hi: (Math.floor(host / 0x1_0000_0000) | COPIED_HI) >>> 0, lo: host >>> 0, zeroBits: 0, allocBits: extendedL2 ? 0xffffffff : 0 });
      }
    }
  }

  const path = isAbsolute(options.path) ? options.path : resolve(options.path);
  const file = await fs.open(path, options.exclusive === false ? 'create' : 'create-exclusive').catch((error: unknown) => {
    if ((error as NodeJS.ErrnoException).code === 'EEXIST') {
      throw new Qcow2Error('qcow2.bad-argument', `createImage: ${path} already exists (pass exclusive: false to replace it)`, { cause: error });
    }
    throw error;
  });
  try {
    await file.write(meta, 0);
    await file.truncate(total * cs);
    await file.sync();
  } finally {
    await file.close();
  }
  await syncParentDirectory(fs, path);
  return serialized.header;
}
