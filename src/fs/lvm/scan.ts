/**
 * LVM on one virtual disk: which partitions (or the whole disk) are PVs, which volume groups
 * their metadata describes (the copy with the highest seqno wins, as in LVM), and the logical
 * volumes, each either mapped to disk ranges or refused with the reason.
 *
 * A damaged PV does not hide the rest of the disk: its error is kept in `problems` and shown
 * when the caller needs what it would have held (a VG/LV asked for by name, or no root found).
 */
import { windowOf, type ByteSource } from '../../io/byte-source.js';
import { Ext4Error } from '../errors.js';
import type { Partition } from '../partitions.js';
import { readMetadataArea, readPvLabel } from './label.js';
import { describeLvType, isListed, mapLogicalVolume, refusalReason, volumeSource, type LvPiece, type PvOnDisk } from './mapping.js';
import { parseVolumeGroup, type VolumeGroupInfo } from './volume-group.js';

export interface LvmVolumeDetails {
  vg: string;
  lv: string;
  /** Where the LV's bytes lie on the disk, in LV order. Absent when the LV is refused. */
  pieces?: LvPiece[];
  /** Why it cannot be read (unsupported type, missing PV, bad segment). */
  refused?: string;
  refusedCode?: string;
}

export interface PvFound extends PvOnDisk {
  /** The VG its metadata names, when it holds any. */
  vg?: string;
}

export interface LvmScan {
  pvs: PvFound[];
  vgs: VolumeGroupInfo[];
  /** Every visible LV of every VG found, as a partition-like entry (scheme "lvm"). */
  volumes: Partition[];
  problems: Ext4Error[];
}

function whereOf(p: Partition): string {
  return p.scheme === 'none' ? 'the disk' : `partition ${p.index}`;
}

export async function scanLvm(disk: ByteSource, partitions: readonly Partition[], hasExtMagic: (source: ByteSource, offset: number) => Promise<boolean>): Promise<LvmScan> {
  const pvs: PvFound[] = [];
  const problems: Ext4Error[] = [];
  const newest = new Map<string, VolumeGroupInfo>();
  for (const partition of partitions) {
    if (partition.scheme === 'lvm') continue;
    const where = whereOf(partition);
    const source = windowOf(disk, partition.offset, partition.length);
    try {
      const label = await readPvLabel(source, where);
      if (!label) continue;
      const pv: PvFound = { uuid: label.uuid, offset: partition.offset, length: partition.length, partition: partition.index };
      pvs.push(pv);
      // A PV may have two metadata areas (start and end); a damaged one does not hide the other.
      for (const area of label.metadataAreas) {
        try {
          const copy = await readMetadataArea(source, area, where);
          if (!copy) continue;
          const vg = parseVolumeGroup(copy.text, where);
          pv.vg = vg.name;
          const seen = newest.get(vg.id);
          if (!seen || vg.seqno > seen.seqno) newest.set(vg.id, vg);
        } catch (error) {
          if (!(error instanceof Ext4Error)) throw error;
          problems.push(error);
        }
      }
    } catch (error) {
      if (!(error instanceof Ext4Error)) throw error;
      problems.push(error);
    }
  }
  const pvsOnDisk = new Map(pvs.map((pv) => [pv.uuid, pv] as const));
  const vgs = [...newest.values()];
  const volumes: Partition[] = [];
  for (const vg of vgs) {
    for (const lv of vg.lvs) {
      if (!isListed(vg, lv)) continue;
      const length = lv.extentCount * vg.extentSize;
      const base = { scheme: 'lvm' as const, type: describeLvType(lv), name: `${vg.name}/${lv.name}`, length };
      try {
        const pieces = mapLogicalVolume(vg, lv, pvsOnDisk);
        const first = pieces[0]!;
        const holder = pvs.find((pv) => first.diskOffset >= pv.offset && first.diskOffset < pv.offset + pv.length);
        volumes.push({
          ...base,
          index: holder?.partition ?? 0,
          offset: first.diskOffset,
          linux: await hasExtMagic(volumeSource(disk, pieces, length), 0),
          lvm: { vg: vg.name, lv: lv.name, pieces },
        });
      } catch (error) {
        if (!(error instanceof Ext4Error)) throw error;
        const holder = pvs.find((pv) => pv.vg === vg.name);
        volumes.push({ ...base, index: holder?.partition ?? 0, offset: 0, linux: false, lvm: { vg: vg.name, lv: lv.name, refused: error.message, refusedCode: error.code } });
      }
    }
  }
  return { pvs, vgs, volumes, problems };
}

/** The LV named "VG/LV", mapped, or a clear error (not found, hidden, refused, damaged PV). */
export function findVolume(scan: LvmScan, wanted: string): Partition {
  const slash = wanted.indexOf('/');
  const vgName = wanted.slice(0, slash);
  const lvName = wanted.slice(slash + 1);
  const found = scan.volumes.find((v) => v.lvm?.vg === vgName && v.lvm.lv === lvName);
  if (found) {
    if (found.lvm?.refused) throw new Ext4Error(found.lvm.refusedCode === 'fs.lvm-missing-pv' ? 'fs.lvm-missing-pv' : 'fs.lvm-unsupported', found.lvm.refused);
    return found;
  }
  const damaged = scan.problems.length > 0 ? `; some LVM metadata could not be read: ${scan.problems.map((p) => p.message).join('; ')}` : '';
  const vg = scan.vgs.find((v) => v.name === vgName);
  if (!vg) {
    const known = scan.vgs.map((v) => v.name).join(', ');
    if (scan.problems.length > 0 && !known) throw scan.problems[0]!;
    throw new Ext4Error('fs.partition-not-found', `volume group ${vgName} is not on this disk (volume groups found: ${known || 'none'})${damaged}`);
  }
  const hidden = vg.lvs.find((lv) => lv.name === lvName);
  if (hidden) throw new Ext4Error('fs.lvm-unsupported', refusalReason(vg, hidden) ?? `LV ${vgName}/${lvName} is a hidden internal volume`);
  const known = scan.volumes.filter((v) => v.lvm?.vg === vgName).map((v) => v.lvm!.lv).join(', ');
  throw new Ext4Error('fs.partition-not-found', `volume group ${vgName} has no LV ${lvName} (LVs: ${known || 'none'})`);
}
