/**
 * The internal snapshot table: entries of variable length (fixed part, extra data, id, name,
 * padding to 8 bytes). Each snapshot has its own L1 table; reading a snapshot's view reuses the
 * image's read path with that L1.
 */
import type { HostFile } from '../io/host-file.js';
import type { L1View } from './cluster-map.js';
import { Qcow2Error } from './errors.js';
import { MAX_L1_BYTES, readU64 } from './header.js';

/** QEMU's own limits; a table bigger than this is not one QEMU wrote. */
export const MAX_SNAPSHOT_TABLE_BYTES = 64 * 1024 * 1024;
export const MAX_SNAPSHOT_EXTRA_DATA = 1024;

export interface SnapshotInfo {
  index: number;
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  /** Guest-visible disk size at snapshot time (extra data), or null when not recorded. */
  diskSize: number | null;
  vmStateSize: number;
  dateSeconds: number;
  dateNanoseconds: number;
  vmClockNanoseconds: number;
  /** ISO date, for display. */
  date: string;
}

const utf8 = new TextDecoder('utf-8', { fatal: false });

export async function readSnapshotTable(
  file: HostFile,
  offset: number,
  count: number,
  clusterSize: number,
  fileLength: number,
): Promise<SnapshotInfo[]> {
  if (count === 0) return [];
  const available = Math.min(fileLength - offset, MAX_SNAPSHOT_TABLE_BYTES);
  if (available <= 0) throw new Qcow2Error('qcow2.offset-past-eof', `snapshot table at 0x${offset.toString(16)} is past the end of the file`);
  // One read for the whole table (bounded by the file and QEMU's limit), then parse in memory.
  const minimum = Math.min(available, count * 40 + count * (MAX_SNAPSHOT_EXTRA_DATA + 2 * 65535 + 8));
  const table = new Uint8Array(minimum);
  await file.read(table, offset);
  const view = new DataView(table.buffer);
  const snapshots: SnapshotInfo[] = [];
  let at = 0;
  for (let i = 0; i < count; i++) {
    if (at + 40 > table.length) throw new Qcow2Error('qcow2.corrupt', `snapshot table entry ${i} runs past the end of the table`);
    const l1TableOffset = readU64(view, at, `snapshot ${i} l1_table_offset`);
    const l1Size = view.getUint32(at + 8);
    const idSize = view.getUint16(at + 12);
    const nameSize = view.getUint16(at + 14);
    const dateSeconds = view.getUint32(at + 16);
    const dateNanoseconds = view.getUint32(at + 20);
    const vmClockNanoseconds = readU64(view, at + 24, `snapshot ${i} vm_clock_nsec`);
    let vmStateSize = view.getUint32(at + 32);
    const extraSize = view.getUint32(at + 36);
    if (extraSize > MAX_SNAPSHOT_EXTRA_DATA) throw new Qcow2Error('qcow2.corrupt', `snapshot ${i} extra data size ${extraSize} is too large`);
    const entryEnd = at + 40 + extraSize + idSize + nameSize;
    if (entryEnd > table.length) throw new Qcow2Error('qcow2.corrupt', `snapshot ${i} runs past the end of the file`);
    let diskSize: number | null = null;
    if (extraSize >= 8) vmStateSize = readU64(view, at + 40, `snapshot ${i} vm_state_size_large`);
    if (extraSize >= 16) diskSize = readU64(view, at + 48, `snapshot ${i} disk_size`);
    const id = utf8.decode(table.subarray(at + 40 + extraSize, at + 40 + extraSize + idSize));
    const name = utf8.decode(table.subarray(at + 40 + extraSize + idSize, entryEnd));
    if (l1Size * 8 > MAX_L1_BYTES) throw new Qcow2Error('qcow2.corrupt', `snapshot ${id} L1 size ${l1Size} is too large`);
    if (l1Size > 0 && (l1TableOffset % clusterSize !== 0 || l1TableOffset === 0)) {
      throw new Qcow2Error('qcow2.corrupt', `snapshot ${id} L1 table offset 0x${l1TableOffset.toString(16)} is not cluster-aligned`);
    }
    if (l1TableOffset + l1Size * 8 > fileLength) {
      throw new Qcow2Error('qcow2.offset-past-eof', `snapshot ${id} L1 table runs past the end of the file`);
    }
    snapshots.push({
      index: i,
      id,
      name,
      l1TableOffset,
      l1Size,
      diskSize,
      vmStateSize,
      dateSeconds,
      dateNanoseconds,
      vmClockNanoseconds,
      date: new Date(dateSeconds * 1000 + Math.floor(dateNanoseconds / 1e6)).toISOString(),
    });
    at = Math.ceil(entryEnd / 8) * 8;
  }
  return snapshots;
}

/**
 * The L1 table of snapshot `idOrName` (id first, then name) of the image at `path`, mapping the
 * disk size recorded with the snapshot (`currentSize` when none was).
 */
export async function readSnapshotL1(
  file: HostFile,
  path: string,
  list: SnapshotInfo[],
  idOrName: string,
  currentSize: number,
  l2Coverage: number,
): Promise<L1View> {
  const snap = list.find((s) => s.id === idOrName) ?? list.find((s) => s.name === idOrName);
  if (!snap) throw new Qcow2Error('qcow2.no-such-snapshot', `${path}: no snapshot with id or name "${idOrName}"`);
  const size = snap.diskSize ?? currentSize;
  const needed = Math.ceil(size / l2Coverage);
  if (snap.l1Size < needed) throw new Qcow2Error('qcow2.corrupt', `${path}: snapshot ${snap.id} L1 table (${snap.l1Size}) is too small for its disk size ${size}`);
  const table = new Uint8Array(snap.l1Size * 8);
  await file.read(table, snap.l1TableOffset);
  return { table, view: new DataView(table.buffer), size, entries: snap.l1Size };
}
