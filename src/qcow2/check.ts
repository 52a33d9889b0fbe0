/**
 * `check`: recompute every cluster's reference count from the metadata (header, active and
 * snapshot L1/L2 tables, snapshot table, refcount table and blocks, bitmaps, encryption header),
 * compare with the refcounts stored in the image, and verify the COPIED flags (set exactly
 * when the refcount is 1). A stored refcount above the computed one is a leak (wasted space, no
 * harm); below it is a corruption (a later allocation could overwrite live data). Repair lives
 * in repair.ts; this module only reads.
 *
 * Verdicts and counts follow `qemu-img check`, so that the same image gets the same answer
 * from both tools.
 */
import type { HostFile } from '../io/host-file.js';
import {
  MAX_L1_BYTES,
  bitmapsExtensionOf,
  encryptionExtensionOf,
  externalDataFileOf,
  HEADER_PROBE_BYTES,
  Incompatible,
  parseHeader,
  readU64,
  type Qcow2Header,
} from './header.js';
import { Qcow2Error } from './errors.js';
import { COMPRESSED_HI, COPIED_HI, decodeCompressed, entryOffset, getRefcount, L1_RESERVED_HI, L1_RESERVED_LO, L2_RESERVED_HI, L2_RESERVED_LO } from './layout.js';
import { MAX_SNAPSHOT_EXTRA_DATA } from './snapshots.js';

/** Most clusters check keeps counters for (1 GiB of counters; a 16 TiB file of 64 KiB clusters). */
const MAX_CHECK_CLUSTERS = 2 ** 28;

/** One internal snapshot's table entry (the fields check and info need). */
export interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  icount: number | null;
  diskSize: number | null;
}

export interface SnapshotTable {
  entries: SnapshotEntry[];
  /** Bytes the table occupies from snapshots_offset. */
  length: number;
}

/** Parse the snapshot table (nb_snapshots variable-length entries, each padded to 8 bytes). */
export async function readSnapshotTable(file: HostFile, header: Qcow2Header): Promise<SnapshotTable> {
  const entries: SnapshotEntry[] = [];
  if (header.nbSnapshots === 0) return { entries, length: 0 };
  const fileLength = await file.length();
  let at = header.snapshotsOffset;
  const fixed = new Uint8Array(40);
  for (let i = 0; i < header.nbSnapshots; i += 1) {
    if (at + 40 > fileLength) throw new Qcow2Error('qcow2.corrupt', `snapshot table entry ${i} runs past the end of the file`);
    await file.read(fixed, at);
    const view = new DataView(fixed.buffer);
    const l1TableOffset = readU64(view, 0, `snapshot ${i} l1_table_offset`);
    const l1Size = view.getUint32(8);
    const idSize = view.getUint16(12);
    const nameSize = view.getUint16(14);
    const extraSize = view.getUint32(36);
    // Sizes come from the file: bound them before allocating anything.
    if (extraSize > MAX_SNAPSHOT_EXTRA_DATA || at + 40 + extraSize + idSize + nameSize > fileLength) {
      throw new Qcow2Error('qcow2.corrupt', `snapshot table entry ${i} is invalid (extra data ${extraSize} bytes) or runs past the end of the file`);
    }
    const variable = new Uint8Array(extraSize + idSize + nameSize);
    await file.read(variable, at + 40);
    const extra = new DataView(variable.buffer, 0, extraSize);
    const decoder = new TextDecoder();
    entries.push({
      l1TableOffset,
      l1Size,
      dateSec: view.getUint32(16),
      dateNsec: view.getUint32(20),
      vmClockNsec: readU64(view, 24, `snapshot ${i} vm_clock_nsec`),
      vmStateSize: extraSize >= 8 ? readU64(extra, 0, `snapshot ${i} vm_state_size_large`) : view.getUint32(32),
      diskSize: extraSize >= 16 ? readU64(extra, 8, `snapshot ${i} disk_size`) : null,
      icount: extraSize >= 24 ? Number(extra.getBigInt64(16)) : null,
      id: decoder.decode(variable.subarray(extraSize, extraSize + idSize)),
      name: decoder.decode(variable.subarray(extraSize + idSize)),
    });
    at += Math.ceil((40 + variable.length) / 8) * 8;
  }
  return { entries, length: at - header.snapshotsOffset };
}

/** What `check` found; field names follow qemu-img's JSON (see toQemuJson). */
export interface CheckResult {
  filename: string;
  format: 'qcow2';
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  imageEndOffset: number;
  totalClusters: number;
  allocatedClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  /** One line per problem, in the order found. */
  messages: string[];
}

/** Exit code like qemu-img check: 0 clean, 2 corruptions, 3 leaks only (1 is "could not check"). */
export function checkExitCode(result: CheckResult): number {
  if (result.checkErrors > 0) return 1;
  if (result.corruptions > 0) return 2;
  if (result.leaks > 0) return 3;
  return 0;
}

/** The result in qemu-img's JSON shape: counters that are zero are left out, like qemu-img does. */
export function toQemuJson(result: CheckResult): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  if (result.imageEndOffset) out['image-end-offset'] = result.imageEndOffset;
  if (result.totalClusters) out['total-clusters'] = result.totalClusters;
  if (result.corruptions) out['corruptions'] = result.corruptions;
  if (result.corruptionsFixed) out['corruptions-fixed'] = result.corruptionsFixed;
  out['check-errors'] = result.checkErrors;
  if (result.leaks) out['leaks'] = result.leaks;
  if (result.leaksFixed) out['leaks-fixed'] = result.leaksFixed;
  if (result.allocatedClusters) out['allocated-clusters'] = result.allocatedClusters;
  if (result.fragmentedClusters) out['fragmented-clusters'] = result.fragmentedClusters;
  if (result.compressedClusters) out['compressed-clusters'] = result.compressedClusters;
  out['filename'] = result.filename;
  out['format'] = result.format;
  return out;
}

/**
 * Everything check computed, kept for repair: the reference counts, the stored refcounts and
 * where the refcount structures are.
 */
export interface CheckState {
  header: Qcow2Header;
  file: HostFile;
  clusterSize: number;
  fileLength: number;
  /** Clusters in the file (rounded up). */
  fileClusters: number;
  /** Computed reference count per cluster (index <= fileClusters: one slot past the end). */
  references: Uint32Array;
  /** References to the refcount table and blocks themselves (subset of `references`). */
  refcountStructureClusters: number[];
  /** Refcount per cluster as stored in the image (same indexes; clamped to 2^32-1). */
  stored: Uint32Array;
  /** Refcount table entries (block offsets), and whether the refcount structure itself is damaged. */
  refcountTable: number[];
  refcountStructureBroken: boolean;
  /** Clusters whose stored refcount is wrong. */
  mismatched: number[];
  result: CheckResult;
  /** Active L2 tables read by the walk (bounded), reused by the COPIED check. */
  activeL2: Map<number, Uint8Array>;
}

class ReferenceCounter {
  /** One slot past the last cluster of the file: a range may end inside the cluster after it. */
  readonly references: Uint32Array;
  constructor(
    private readonly clusterSize: number,
    private readonly fileLength: number,
    private readonly result: CheckResult,
  ) {
    this.references = new Uint32Array(Math.ceil(fileLength / clusterSize) + 1);
  }

  /** Count one reference to every cluster overlapping [offset, offset + length). */
  add(offset: number, length: number, what: string): void {
    if (length <= 0) return;
    if (offset + length - this.fileLength >= this.clusterSize) {
      // A whole cluster or more past the end: one corruption for the reference, as qemu-img
      // counts it, and nothing counted (offsets from damaged entries can be huge).
      this.result.corruptions += 1;
      this.result.messages.push(`ERROR ${what} at offset 0x${offset.toString(16)} (+${length}) points past the end of the file`);
      return;
    }
    const first = Math.floor(offset / this.clusterSize);
    const last = first + Math.floor(((offset % this.clusterSize) + length - 1) / this.clusterSize);
    for (let cluster = first; cluster <= last; cluster += 1) this.references[cluster] = (this.references[cluster] ?? 0) + 1;
  }
}

interface TableWalk {
  state: { nextContiguous: number };
  active: boolean;
}

/** Read the whole image metadata and compute references, stored refcounts and mismatches. */
export async function analyzeImage(file: HostFile, filename: string): Promise<CheckState> {
  const fileLength = await file.length();
  const probe = new Uint8Array(Math.min(fileLength, HEADER_PROBE_BYTES));
  await file.read(probe, 0);
  // parseHeader needs the first cluster; read the probe to learn the cluster size first.
  const clusterBitsGuess = probe.length >= 24 ? new DataView(probe.buffer).getUint32(20) : 16;
  const first = new Uint8Array(Math.min(fileLength, 2 ** Math.min(Math.max(clusterBitsGuess, 9), 21)));
  await file.read(first, 0);
  const header = parseHeader(first, fileLength);
  const clusterBits = header.clusterBits;
  const clusterSize = 2 ** clusterBits;
  const fileClusters = Math.ceil(fileLength / clusterSize);
  if (fileClusters > MAX_CHECK_CLUSTERS) {
    throw new Qcow2Error('qcow2.too-large', `${filename}: ${fileClusters} clusters of ${clusterSize} bytes are more than check can count (${MAX_CHECK_CLUSTERS})`);
  }
  const result: CheckResult = {
    filename,
    format: 'qcow2',
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    imageEndOffset: 0,
    totalClusters: Math.ceil(header.size / clusterSize),
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    messages: [],
  };
  const counter = new ReferenceCounter(clusterSize, fileLength, result);
  const tracked = fileClusters + 1;
  const extendedL2 = (header.incompatibleFeatures & Incompatible.extendedL2) !== 0n;
  const externalData = (header.incompatibleFeatures & Incompatible.externalDataFile) !== 0n || externalDataFileOf(header) !== null;
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / l2EntryBytes;

  counter.add(0, clusterSize, 'header');

  // L2 tables are read once per visit; a table shared by a snapshot is visited again, which is
  // what makes its data clusters' references 2.
  const activeL2 = new Map<number, Uint8Array>();
  let activeL2Bytes = 0;
  const walkL1 = async (l1Offset: number, l1Size: number, walk: TableWalk, label: string) => {
    if (l1Size === 0) return;
    if (l1Offset % clusterSize !== 0) {
      result.corruptions += 1;
      result.messages.push(`ERROR ${label} L1 table offset 0x${l1Offset.toString(16)} is not cluster aligned`);
      return;
    }
    if (l1Size * 8 > MAX_L1_BYTES || l1Offset + l1Size * 8 > fileLength) {
      result.corruptions += 1;
      result.messages.push(`ERROR ${label} L1 table (${l1Size} entries at 0x${l1Offset.toString(16)}) is too large or runs past the end of the file`);
      return;
    }
    counter.add(l1Offset, l1Size * 8, `${label} L1 table`);
    const l1 = new Uint8Array(l1Size * 8);
    await file.read(l1, l1Offset);
    const l1View = new DataView(l1.buffer);
    const tables: number[] = [];
    for (let i = 0; i < l1Size; i += 1) {
      const hi = l1View.getUint32(i * 8);
      const lo = l1View.getUint32(i * 8 + 4);
      const l2Offset = entryOffset(hi, lo);
      if (hi & L1_RESERVED_HI || lo & L1_RESERVED_LO) {
        result.corruptions += 1;
        result.messages.push(`ERROR ${label} L1 entry ${i} has reserved bits set`);
      }
      // Like qemu-img, any non-zero entry is followed, even one whose offset bits are zero or
      // unaligned: the same damage then gets the same counts from both tools.
      if (hi === 0 && lo === 0) continue;
      counter.add(l2Offset, clusterSize, `${label} L2 table`);
      if (l2Offset % clusterSize !== 0) {
        result.corruptions += 1;
        result.messages.push(`ERROR ${label} L1 entry ${i}: L2 table offset 0x${l2Offset.toString(16)} is not cluster aligned`);
      }
      if (l2Offset < fileLength) tables.push(l2Offset);
    }
    // Tables are read a batch at a time in parallel, then walked in L1 order.
    const BATCH = 16;
    const buffers = Array.from({ length: Math.min(BATCH, tables.length) }, () => new Uint8Array(clusterSize));
    for (let b = 0; b < tables.length; b += BATCH) {
      const batch = tables.slice(b, b + BATCH);
      const read = await Promise.all(
        batch.map(async (l2Offset, k) => {
          // Active tables are kept (up to 64 MiB) for the COPIED check instead of a second read.
          const keep = walk.active && activeL2Bytes + clusterSize <= 64 * 1024 * 1024 && !activeL2.has(l2Offset);
          if (keep) activeL2Bytes += clusterSize;
          const table = keep ? new Uint8Array(clusterSize) : buffers[k]!;
          await file.read(table, l2Offset);
          if (keep) activeL2.set(l2Offset, table);
          return table;
        }),
      );
      read.forEach((table, k) => walkL2(table, walk, `${label} L2 table 0x${batch[k]!.toString(16)}`));
    }
  };

  const walkL2 = (l2: Uint8Array, walk: TableWalk, label: string) => {
    // qemu-img counts fragmentation within each L2 table (the next table starts afresh).
    walk.state.nextContiguous = 0;
    const view = new DataView(l2.buffer, l2.byteOffset, l2.byteLength);
    for (let j = 0; j < l2Entries; j += 1) {
      const at = j * l2EntryBytes;
      const hi = view.getUint32(at);
      const lo = view.getUint32(at + 4);
      const zeroBits = extendedL2 ? view.getUint32(at + 8) : 0;
      const allocBits = extendedL2 ? view.getUint32(at + 12) : 0;
      if (hi === 0 && lo === 0 && zeroBits === 0 && allocBits === 0) continue;
      if (hi & COMPRESSED_HI) {
        if (hi & COPIED_HI) {
          result.corruptions += 1;
          result.messages.push(`ERROR ${label} entry ${j}: compressed cluster has the COPIED flag`);
        }
        if (extendedL2 && (zeroBits !== 0 || allocBits !== 0)) {
          result.corruptions += 1;
          result.messages.push(`ERROR ${label} entry ${j}: compressed cluster with a subcluster bitmap`);
        }
        const extent = decodeCompressed(hi, lo, header.clusterBits);
        if (walk.active) {
          result.allocatedClusters += 1;
          result.compressedClusters += 1;
          // A compressed cluster shares sectors with its neighbours: qemu-img counts each as fragmented.
          result.fragmentedClusters += 1;
        }
        counter.add(extent.hostOffset, extent.size, `${label} compressed cluster`);
        continue;
      }
      const offset = entryOffset(hi, lo);
      if (hi & L2_RESERVED_HI || lo & L2_RESERVED_LO || (extendedL2 && lo & 1)) {
        result.corruptions += 1;
        result.messages.push(`ERROR ${label} entry ${j} has reserved bits set`);
      }
      if (extendedL2) {
        if ((zeroBits & allocBits) !== 0 || (offset === 0 && !externalData && allocBits !== 0)) {
          result.corruptions += 1;
          result.messages.push(`ERROR ${label} entry ${j}: invalid subcluster bitmap (zero 0x${zeroBits.toString(16)}, allocated 0x${allocBits.toString(16)})`);
          continue;
        }
      }
      if (offset === 0 && !(externalData && (hi & COPIED_HI))) continue;
      if (offset % clusterSize !== 0) {
        // Counted, and then treated like qemu-img does: as a cluster at that (wrong) offset.
        result.corruptions += 1;
        result.messages.push(`ERROR ${label} entry ${j}: data offset 0x${offset.toString(16)} is not cluster aligned`);
      }
      if (walk.active) {
        result.allocatedClusters += 1;
        if (walk.state.nextContiguous !== 0 && offset !== walk.state.nextContiguous) result.fragmentedClusters += 1;
        walk.state.nextContiguous = offset + clusterSize;
      }
      // With an external data file the guest data is not in this file and is not refcounted.
      if (!externalData) counter.add(offset, clusterSize, `${label} data cluster`);
    }
  };

  await walkL1(header.l1TableOffset, header.l1Size, { state: { nextContiguous: 0 }, active: true }, 'active');

  const snapshots = await readSnapshotTable(file, header);
  for (const [index, snapshot] of snapshots.entries.entries()) {
    await walkL1(snapshot.l1TableOffset, snapshot.l1Size, { state: { nextContiguous: 0 }, active: false }, `snapshot ${index}`);
  }
  if (snapshots.length > 0) counter.add(header.snapshotsOffset, snapshots.length, 'snapshot table');

  const bitmaps = bitmapsExtensionOf(header);
  if (bitmaps && (header.autoclearFeatures & 1n) !== 0n) await countBitmaps(file, bitmaps, counter, clusterSize, fileLength, result);
  const crypto = encryptionExtensionOf(header);
  if (crypto) counter.add(crypto.offset, crypto.length, 'encryption header');

  // Refcount structures last: their references are listed so that a rebuild can drop them.
  const before = Uint32Array.from(counter.references);
  counter.add(header.refcountTableOffset, header.refcountTableClusters * clusterSize, 'refcount table');
  const tableBytes = new Uint8Array(header.refcountTableClusters * clusterSize);
  await file.read(tableBytes, header.refcountTableOffset);
  const tableView = new DataView(tableBytes.buffer);
  const refcountTable: number[] = [];
  let refcountStructureBroken = false;
  for (let i = 0; i < tableBytes.length / 8; i += 1) {
    const hi = tableView.getUint32(i * 8);
    const lo = tableView.getUint32(i * 8 + 4);
    const offset = hi * 0x100000000 + lo;
    refcountTable.push(offset);
    if (offset === 0) continue;
    if (hi > 0x00ffffff || offset % clusterSize !== 0) {
      result.corruptions += 1;
      refcountStructureBroken = true;
      result.messages.push(`ERROR refcount block ${i} offset 0x${offset.toString(16)} is not cluster aligned; refcount table entry corrupted`);
      // Not counted as a reference; its refcounts are still read where the offset bits point
      // (bits 9 and up), as qemu-img does, so one flipped low bit is not 1000 corruptions.
      const masked = hi > 0x00ffffff ? 0 : offset - (offset % 512);
      refcountTable[i] = masked < fileLength && masked % clusterSize === 0 ? masked : 0;
      continue;
    }
    if (offset >= fileLength) {
      result.corruptions += 1;
      refcountStructureBroken = true;
      result.messages.push(`ERROR refcount block ${i} is outside the image`);
      refcountTable[i] = 0;
      continue;
    }
    counter.add(offset, clusterSize, 'refcount block');
    // A refcount block is used by nothing else: any other reference to it is a corruption.
    const blockRefs = counter.references[offset / clusterSize] ?? 0;
    if (blockRefs !== 1) {
      refcountStructureBroken = true;
      result.corruptions += 1;
      result.messages.push(`ERROR refcount block ${i} refcount=${blockRefs}`);
    }
  }
  const refcountStructureClusters: number[] = [];
  for (let c = 0; c < tracked; c += 1) {
    const extra = (counter.references[c] ?? 0) - (before[c] ?? 0);
    for (let k = 0; k < extra; k += 1) refcountStructureClusters.push(c);
  }

  // Stored refcounts for every cluster of the file.
  const stored = new Uint32Array(tracked);
  const perBlock = (clusterSize * 8) >> header.refcountOrder;
  const block = new Uint8Array(clusterSize);
  const blockView = new DataView(block.buffer);
  for (let i = 0; i < refcountTable.length && i * perBlock < tracked; i += 1) {
    const offset = refcountTable[i] ?? 0;
    if (offset === 0) continue;
    await file.read(block, offset);
    const count = Math.min(perBlock, tracked - i * perBlock);
    for (let k = 0; k < count; k += 1) {
      stored[i * perBlock + k] = Math.min(getRefcount(block, blockView, k, header.refcountOrder), 0xffffffff);
    }
  }

  const mismatched: number[] = [];
  let highest = -1;
  // The slot past the end only matters when something points into it (as in qemu-img).
  const compared = (counter.references[fileClusters] ?? 0) > 0 ? tracked : fileClusters;
  for (let c = 0; c < compared; c += 1) {
    const have = stored[c] ?? 0;
    const want = counter.references[c] ?? 0;
    if (have > 0 || want > 0) highest = c;
    if (have === want) continue;
    mismatched.push(c);
    if (have < want) {
      result.corruptions += 1;
      result.messages.push(`ERROR cluster ${c} refcount=${have} reference=${want}`);
    } else {
      result.leaks += 1;
      result.messages.push(`Leaked cluster ${c} refcount=${have} reference=${want}`);
    }
  }
  result.imageEndOffset = (highest + 1) * clusterSize;

  const state: CheckState = {
    header,
    file,
    clusterSize,
    fileLength,
    fileClusters,
    references: counter.references,
    refcountStructureClusters,
    stored,
    refcountTable,
    refcountStructureBroken,
    mismatched,
    result,
    activeL2,
  };
  await checkCopiedFlags(state, false);
  return state;
}

/** Bitmap directory, each bitmap's table and the bitmap data clusters it points to. */
async function countBitmaps(
  file: HostFile,
  ext: { nbBitmaps: number; bitmapDirectorySize: number; bitmapDirectoryOffset: number },
  counter: ReferenceCounter,
  clusterSize: number,
  fileLength: number,
  result: CheckResult,
): Promise<void> {
  if (ext.bitmapDirectoryOffset + ext.bitmapDirectorySize > fileLength || ext.bitmapDirectorySize > 64 * 1024 * 1024) {
    result.corruptions += 1;
    result.messages.push('ERROR bitmap directory runs past the end of the file');
    return;
  }
  counter.add(ext.bitmapDirectoryOffset, ext.bitmapDirectorySize, 'bitmap directory');
  const dir = new Uint8Array(ext.bitmapDirectorySize);
  await file.read(dir, ext.bitmapDirectoryOffset);
  const view = new DataView(dir.buffer);
  let at = 0;
  for (let i = 0; i < ext.nbBitmaps && at + 24 <= dir.length; i += 1) {
    const tableOffset = readU64(view, at, 'bitmap_table_offset');
    const tableSize = view.getUint32(at + 8);
    const nameSize = view.getUint16(at + 14);
    const extraSize = view.getUint32(at + 20);
    counter.add(tableOffset, tableSize * 8, 'bitmap table');
    if (tableOffset + tableSize * 8 <= fileLength) {
      const table = new Uint8Array(tableSize * 8);
      await file.read(table, tableOffset);
      const tv = new DataView(table.buffer);
      for (let k = 0; k < tableSize; k += 1) {
        const offset = entryOffset(tv.getUint32(k * 8), tv.getUint32(k * 8 + 4));
        if (offset !== 0) counter.add(offset, clusterSize, 'bitmap data');
      }
    }
    at += Math.ceil((24 + extraSize + nameSize) / 8) * 8;
  }
}

/**
 * COPIED flags of the active tables must say "refcount is exactly 1". With `fix`, wrong flags
 * are rewritten (repair.ts calls this after the refcounts are right).
 */
export async function checkCopiedFlags(state: CheckState, fix: boolean): Promise<void> {
  const { header, file, clusterSize, result } = state;
  if (header.l1Size === 0 || header.l1TableOffset % clusterSize !== 0) return;
  const extendedL2 = (header.incompatibleFeatures & Incompatible.extendedL2) !== 0n;
  const externalData = (header.incompatibleFeatures & Incompatible.externalDataFile) !== 0n;
  const l2EntryBytes = extendedL2 ? 16 : 8;
  const refcountOf = (offset: number) => state.stored[Math.floor(offset / clusterSize)] ?? 0;
  const l1 = new Uint8Array(header.l1Size * 8);
  await file.read(l1, header.l1TableOffset);
  const l1View = new DataView(l1.buffer);
  let l1Dirty = false;
  const buffer = new Uint8Array(clusterSize);
  for (let i = 0; i < header.l1Size; i += 1) {
    const hi = l1View.getUint32(i * 8);
    const lo = l1View.getUint32(i * 8 + 4);
    const l2Offset = entryOffset(hi, lo);
    if (l2Offset === 0) continue;
    // Past the end of the file the refcount is 0 (qemu-img counts the flag too); no table to read.
    const wantCopied = refcountOf(l2Offset) === 1;
    if (wantCopied !== ((hi & COPIED_HI) !== 0)) {
      result.corruptions += 1;
      result.messages.push(`ERROR OFLAG_COPIED L2 cluster: l1_index=${i} refcount=${refcountOf(l2Offset)}`);
      if (fix) {
        l1View.setUint32(i * 8, wantCopied ? (hi | COPIED_HI) >>> 0 : hi & ~COPIED_HI);
        l1Dirty = true;
        result.corruptionsFixed += 1;
        result.corruptions -= 1;
      }
    }
    if (l2Offset >= state.fileLength) continue;
    // The walk's copy when it has one, unless we are about to rewrite flags (read fresh then).
    const cached = fix ? undefined : state.activeL2.get(l2Offset);
    const l2 = cached ?? buffer;
    if (!cached) await file.read(l2, l2Offset);
    const l2View = new DataView(l2.buffer, l2.byteOffset, l2.byteLength);
    let l2Dirty = false;
    for (let at = 0; at < clusterSize; at += l2EntryBytes) {
      const ehi = l2View.getUint32(at);
      const elo = l2View.getUint32(at + 4);
      if (ehi & COMPRESSED_HI) continue;
      const offset = entryOffset(ehi, elo);
      if (offset === 0) continue;
      const refcount = externalData ? 1 : refcountOf(offset);
      const want = refcount === 1;
      if (want !== ((ehi & COPIED_HI) !== 0)) {
        result.corruptions += 1;
        result.messages.push(`ERROR OFLAG_COPIED data cluster: l2 0x${l2Offset.toString(16)} entry ${at / l2EntryBytes} refcount=${refcount}`);
        if (fix) {
          l2View.setUint32(at, want ? (ehi | COPIED_HI) >>> 0 : ehi & ~COPIED_HI);
          l2Dirty = true;
          result.corruptionsFixed += 1;
          result.corruptions -= 1;
        }
      }
    }
    if (l2Dirty) await file.write(l2, l2Offset);
  }
  if (l1Dirty) await file.write(l1, header.l1TableOffset);
}
