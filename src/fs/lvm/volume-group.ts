/**
 * A volume group as its text metadata describes it: extent size, physical volumes (UUID, where
 * their extents start, how many) and logical volumes (segments of extents on PVs). Only what a
 * read-only mapping needs is kept; every value is checked against the others.
 */
import { lvmCorrupt } from './errors.js';
import {
  child,
  getInt,
  getSection,
  getString,
  getStringList,
  isSection,
  parseMetadataText,
  subsections,
  type ConfigSection,
} from './metadata-text.js';

export const SECTOR = 512;

export interface PhysicalVolumeInfo {
  /** The name the metadata uses for it ("pv0"). */
  key: string;
  /** UUID without dashes, as in the PV label. */
  uuid: string;
  /** UUID as LVM prints it (with dashes). */
  printableUuid: string;
  /** The device path LVM last saw it on: a hint for messages only, never opened. */
  deviceHint?: string;
  /** First extent, in bytes from the start of the PV. */
  peStart: number;
  peCount: number;
}

export interface StripeRef {
  /** A PV key ("pv0") or, for stacked LVs, an LV name. */
  on: string;
  startExtent: number;
}

export interface Segment {
  startExtent: number;
  extentCount: number;
  type: string;
  stripes: StripeRef[];
  /** type "snapshot": the LV holding the copy-on-write data and its origin. */
  cowStore?: string;
  origin?: string;
}

export interface LogicalVolumeInfo {
  name: string;
  visible: boolean;
  status: string[];
  segments: Segment[];
  extentCount: number;
}

export interface VolumeGroupInfo {
  name: string;
  id: string;
  seqno: number;
  /** Bytes. */
  extentSize: number;
  pvs: PhysicalVolumeInfo[];
  lvs: LogicalVolumeInfo[];
}

/** Segments of a stack deeper than this, or more of them, are not a plausible LV. */
const MAX_SEGMENTS = 100_000;

function parseSegment(section: ConfigSection, where: string): Segment {
  const type = getString(section, 'type', where);
  const startExtent = getInt(section, 'start_extent', where);
  const extentCount = getInt(section, 'extent_count', where, 1);
  const segment: Segment = { startExtent, extentCount, type, stripes: [] };
  if (type === 'striped') {
    const count = getInt(section, 'stripe_count', where, 1);
    const list = child(section, 'stripes');
    if (!Array.isArray(list) || list.length !== count * 2) throw lvmCorrupt(`${where}: "stripes" is not a list of ${count} (PV, extent) pairs`);
    for (let i = 0; i < count; i += 1) {
      const on = list[i * 2];
      const start = list[i * 2 + 1];
      if (typeof on !== 'string' || typeof start !== 'number' || !Number.isSafeInteger(start) || start < 0) {
        throw lvmCorrupt(`${where}: stripe ${i + 1} is not a (PV name, extent) pair`);
      }
      segment.stripes.push({ on, startExtent: start });
    }
  } else if (type === 'snapshot') {
    const cow = child(section, 'cow_store');
    const origin = child(section, 'origin');
    if (typeof cow === 'string') segment.cowStore = cow;
    if (typeof origin === 'string') segment.origin = origin;
  }
  return segment;
}

function parseLv(name: string, section: ConfigSection, where: string): LogicalVolumeInfo {
  const at = `${where} LV ${name}`;
  const status = getStringList(section, 'status', at);
  const count = getInt(section, 'segment_count', at, 1);
  if (count > MAX_SEGMENTS) throw lvmCorrupt(`${at}: ${count} segments`);
  const segments: Segment[] = [];
  let next = 0;
  for (let i = 1; i <= count; i += 1) {
    const segment = parseSegment(getSection(section, `segment${i}`, at), `${at} segment${i}`);
    // Segments tile the LV from extent 0 upwards, in order, without gaps or overlaps.
    if (segment.startExtent !== next) throw lvmCorrupt(`${at} segment${i} starts at extent ${segment.startExtent}, expected ${next}`);
    next += segment.extentCount;
    segments.push(segment);
  }
  return { name, visible: status.includes('VISIBLE'), status, segments, extentCount: next };
}

/** LVM prints UUIDs in groups 6-4-4-4-4-4-6; the label stores the 32 characters alone. */
function undash(uuid: string): string {
  return uuid.replace(/-/g, '');
}

/** Interpret one metadata copy. The VG is the one top-level section. */
export function parseVolumeGroup(text: string, where: string): VolumeGroupInfo {
  const root = parseMetadataText(text);
  const sections = subsections(root);
  if (sections.length !== 1) throw lvmCorrupt(`${where}: expected one volume group section in the metadata, found ${sections.length}`);
  const [name, vg] = sections[0]!;
  const at = `${where} VG ${name}`;
  const id = getString(vg, 'id', at);
  const seqno = getInt(vg, 'seqno', at);
  const format = child(vg, 'format');
  if (format !== undefined && format !== 'lvm2') throw lvmCorrupt(`${at}: format ${JSON.stringify(format)} is not "lvm2"`);
  const extentSectors = getInt(vg, 'extent_size', at, 1);
  // LVM's extent size is a power of two of at least one sector and at most 16 GiB.
  if ((extentSectors & (extentSectors - 1)) !== 0 || extentSectors > 2 ** 25) throw lvmCorrupt(`${at}: extent_size ${extentSectors} sectors is not a power of two up to 16 GiB`);
  const extentSize = extentSectors * SECTOR;
  const pvs: PhysicalVolumeInfo[] = [];
  const pvSection = child(vg, 'physical_volumes');
  if (isSection(pvSection)) {
    for (const [key, pv] of subsections(pvSection)) {
      const pvAt = `${at} PV ${key}`;
      const printableUuid = getString(pv, 'id', pvAt);
      const device = child(pv, 'device');
      const peStart = getInt(pv, 'pe_start', pvAt) * SECTOR;
      const peCount = getInt(pv, 'pe_count', pvAt);
      if (!Number.isSafeInteger(peStart + peCount * extentSize)) throw lvmCorrupt(`${pvAt}: pe_start and pe_count are absurdly large`);
      pvs.push({ key, uuid: undash(printableUuid), printableUuid, ...(typeof device === 'string' ? { deviceHint: device } : {}), peStart, peCount });
    }
  }
  const lvs: LogicalVolumeInfo[] = [];
  const lvSection = child(vg, 'logical_volumes');
  if (isSection(lvSection)) {
    for (const [lvName, lv] of subsections(lvSection)) lvs.push(parseLv(lvName, lv, at));
  }
  return { name, id, seqno, extentSize, pvs, lvs };
}
