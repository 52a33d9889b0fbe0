/**
 * From a logical volume's segments to byte ranges on the virtual disk, and back again.
 *
 * Only linear LVs are mapped: every segment of type "striped" with a single stripe, i.e. a run
 * of extents on one PV. Each such segment is a plain copy of the PV's bytes (device-mapper's
 * "linear" target), so reading the ranges in order gives exactly what the kernel's
 * /dev/mapper/VG-LV gives. Everything else (thin, RAID, mirror, cache, striped over several
 * PVs, snapshots) needs device-mapper logic to read and is refused by name.
 */
import type { ByteSource } from '../../io/byte-source.js';
import { Ext4Error } from '../errors.js';
import { lvmCorrupt, lvmUnsupported } from './errors.js';
import type { LogicalVolumeInfo, VolumeGroupInfo } from './volume-group.js';

/** One contiguous piece of an LV on the disk. */
export interface LvPiece {
  /** Byte offset inside the LV. */
  offset: number;
  /** Byte offset on the virtual disk. */
  diskOffset: number;
  length: number;
}

/** A PV found on this disk (by its label). */
export interface PvOnDisk {
  uuid: string;
  /** Where the PV starts on the virtual disk, and its length (the partition, or the disk). */
  offset: number;
  length: number;
  /** Partition index holding it (0 = the whole disk). */
  partition: number;
}

/** What the LV is, in the words `lvs -o segtype` would use; "linear" for what can be mapped. */
export function describeLvType(lv: LogicalVolumeInfo): string {
  const types = [...new Set(lv.segments.map((s) => (s.type === 'striped' ? (s.stripes.length === 1 ? 'linear' : 'striped') : s.type)))];
  return types.length === 1 ? types[0]! : types.join('+');
}

/** The snapshot segment whose copy-on-write store this LV is, if any. */
function snapshotUsing(vg: VolumeGroupInfo, lv: LogicalVolumeInfo): { origin: string } | undefined {
  for (const other of vg.lvs) {
    for (const s of other.segments) if (s.type === 'snapshot' && s.cowStore === lv.name) return { origin: s.origin ?? '?' };
  }
  return undefined;
}

/**
 * Whether `lvs` shows this LV, as LVM decides it: an old-style snapshot is shown under the name
 * of its copy-on-write LV (stored without VISIBLE) when its origin is visible, and the internal
 * "snapshotN" LV carrying the snapshot segment is never shown; otherwise the VISIBLE flag.
 */
export function isListed(vg: VolumeGroupInfo, lv: LogicalVolumeInfo): boolean {
  if (lv.segments.some((s) => s.type === 'snapshot')) return false;
  const snapshot = snapshotUsing(vg, lv);
  if (snapshot) return vg.lvs.some((o) => o.name === snapshot.origin && o.visible);
  return lv.visible;
}

/** Why this LV cannot be mapped, or undefined when it is linear. Does not look for the PVs. */
export function refusalReason(vg: VolumeGroupInfo, lv: LogicalVolumeInfo): string | undefined {
  const name = `LV ${vg.name}/${lv.name}`;
  const snapshot = snapshotUsing(vg, lv);
  if (snapshot) {
    return `${name} is a snapshot of ${vg.name}/${snapshot.origin} (type "snapshot"): it holds copy-on-write differences, not a filesystem; only linear LVs can be read`;
  }
  if (!isListed(vg, lv)) return `${name} is a hidden internal volume (part of another LV); only visible linear LVs can be read`;
  for (const [i, segment] of lv.segments.entries()) {
    if (segment.type !== 'striped') {
      return `${name} has type "${segment.type}" (segment ${i + 1}); only linear LVs can be read (thin, RAID, mirror, cache, snapshot and striped LVs cannot)`;
    }
    if (segment.stripes.length !== 1) {
      return `${name} is striped over ${segment.stripes.length} PVs (type "striped", segment ${i + 1}); only linear LVs can be read`;
    }
    const on = segment.stripes[0]!.on;
    if (!vg.pvs.some((pv) => pv.key === on)) {
      const what = vg.lvs.some((other) => other.name === on) ? `LV ${on} (a stacked volume, e.g. a pvmove in progress)` : `"${on}", which the VG does not list`;
      return `${name} segment ${i + 1} lies on ${what}; only LVs on PVs can be read`;
    }
  }
  return undefined;
}

/**
 * The LV's bytes on this disk, in LV order, adjacent pieces merged. Throws fs.lvm-unsupported
 * for an LV that is not linear, fs.lvm-missing-pv when a segment lies on a PV that is not on
 * this disk (naming it), and fs.lvm-corrupt when a segment lies outside its PV.
 */
export function mapLogicalVolume(vg: VolumeGroupInfo, lv: LogicalVolumeInfo, pvsOnDisk: ReadonlyMap<string, PvOnDisk>): LvPiece[] {
  const reason = refusalReason(vg, lv);
  if (reason) throw lvmUnsupported(reason);
  const name = `LV ${vg.name}/${lv.name}`;
  const pieces: LvPiece[] = [];
  for (const [i, segment] of lv.segments.entries()) {
    const stripe = segment.stripes[0]!;
    const pv = vg.pvs.find((p) => p.key === stripe.on)!;
    const onDisk = pvsOnDisk.get(pv.uuid);
    if (!onDisk) {
      throw new Ext4Error(
        'fs.lvm-missing-pv',
        `${name} has extents on PV ${pv.key} (UUID ${pv.printableUuid}${pv.deviceHint ? `, last seen as ${pv.deviceHint}` : ''}), which is not on this disk; a VG spread over several disks cannot be read from one`,
      );
    }
    if (stripe.startExtent + segment.extentCount > pv.peCount) {
      throw lvmCorrupt(`${name} segment ${i + 1} uses extents ${stripe.startExtent}..${stripe.startExtent + segment.extentCount - 1} of PV ${pv.key}, which has ${pv.peCount}`);
    }
    const start = pv.peStart + stripe.startExtent * vg.extentSize;
    const length = segment.extentCount * vg.extentSize;
    if (start + length > onDisk.length) {
      throw lvmCorrupt(`${name} segment ${i + 1} reaches byte ${start + length} of PV ${pv.key}, which is only ${onDisk.length} bytes on this disk`);
    }
    const piece = { offset: segment.startExtent * vg.extentSize, diskOffset: onDisk.offset + start, length };
    const last = pieces[pieces.length - 1];
    if (last && last.diskOffset + last.length === piece.diskOffset) last.length += length;
    else pieces.push(piece);
  }
  return pieces;
}

/**
 * The disk ranges behind [offset, offset + length) of a volume, split where its pieces end.
 * Bytes past the volume's end are an error, not zeros: a caller mapping them has a bug.
 */
export function volumeToDisk(pieces: readonly LvPiece[], offset: number, length: number): Array<{ offset: number; diskOffset: number; length: number }> {
  const out: Array<{ offset: number; diskOffset: number; length: number }> = [];
  let cursor = offset;
  const end = offset + length;
  // Pieces are sorted by offset; binary search for the first one that ends after `cursor`.
  let low = 0;
  let high = pieces.length;
  while (low < high) {
    const mid = (low + high) >> 1;
    if (pieces[mid]!.offset + pieces[mid]!.length <= cursor) low = mid + 1;
    else high = mid;
  }
  for (let i = low; cursor < end; i += 1) {
    const piece = pieces[i];
    if (!piece || piece.offset > cursor) throw new RangeError(`volume byte ${cursor} is outside the volume`);
    const take = Math.min(end, piece.offset + piece.length) - cursor;
    out.push({ offset: cursor, diskOffset: piece.diskOffset + (cursor - piece.offset), length: take });
    cursor += take;
  }
  return out;
}

/** The LV as a ByteSource: reads go to the disk through the pieces (zeros past the end, like windowOf). */
export function volumeSource(disk: ByteSource, pieces: readonly LvPiece[], size: number): ByteSource {
  return {
    size,
    async readAt(into, offset) {
      const inside = Math.max(0, Math.min(into.length, size - offset));
      if (inside < into.length) into.fill(0, Math.max(0, inside));
      if (inside <= 0) return;
      for (const range of volumeToDisk(pieces, offset, inside)) {
        const from = range.offset - offset;
        await disk.readAt(into.subarray(from, from + range.length), range.diskOffset);
      }
    },
  };
}
