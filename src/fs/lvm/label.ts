/**
 * The on-disk head of an LVM2 physical volume, read from a ByteSource that starts where the PV
 * starts (a partition or the whole disk):
 *
 * - label header in one of the first four 512-byte sectors: "LABELONE", its own sector number,
 *   a CRC over the rest of the sector, the offset of the PV header, and the type "LVM2 001";
 * - PV header: the PV UUID (32 characters, no dashes), the device size, then two zero-terminated
 *   lists of (offset, size) byte ranges: data areas, then metadata areas;
 * - each metadata area starts with a 512-byte mda header (checksum, magic, version, its own
 *   start, its size) and a zero-terminated list of raw locations; the first one says where the
 *   current VG metadata text lies in the area, which is a circular buffer: text that runs past
 *   the end of the area continues right after the mda header.
 *
 * All integers are little-endian. Every checksum is LVM's CRC (below), and every one is checked.
 */
import { readBytes, type ByteSource } from '../../io/byte-source.js';
import { lvmCorrupt } from './errors.js';
import { MAX_METADATA_BYTES } from './metadata-text.js';

const SECTOR = 512;
const LABEL_SCAN_SECTORS = 4;
const MDA_HEADER_SIZE = 512;
/** " LVM2 x[5A%r0N*>" */
const MDA_MAGIC = Buffer.from([0x20, 0x4c, 0x56, 0x4d, 0x32, 0x20, 0x78, 0x5b, 0x35, 0x41, 0x25, 0x72, 0x30, 0x4e, 0x2a, 0x3e]);
const RAW_LOCN_IGNORED = 1;
/** LVM seeds its CRC with this value (lib/misc/crc.h). */
const LVM_INITIAL_CRC = 0xf597a6cf;
/** A PV header with more areas than this is garbage. */
const MAX_AREAS = 16;

const table = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n += 1) {
    let c = n;
    for (let k = 0; k < 8; k += 1) c = c & 1 ? (c >>> 1) ^ 0xedb88320 : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/**
 * LVM's checksum: the reflected CRC-32 polynomial (as in zlib), but seeded with 0xf597a6cf and
 * with no final inversion. `register` continues a CRC across the two halves of wrapped text.
 */
export function lvmCrc(data: Uint8Array, register = LVM_INITIAL_CRC): number {
  let c = register >>> 0;
  for (let i = 0; i < data.length; i += 1) c = (table[(c ^ data[i]!) & 0xff]! ^ (c >>> 8)) >>> 0;
  return c >>> 0;
}

export interface DiskArea {
  /** Bytes from the start of the PV. */
  offset: number;
  size: number;
}

export interface PvLabel {
  /** Sector (0-3) holding the label. */
  sector: number;
  /** 32 characters, as LVM stores it (the metadata spells it with dashes). */
  uuid: string;
  deviceSize: number;
  dataAreas: DiskArea[];
  metadataAreas: DiskArea[];
}

export interface MetadataCopy {
  /** The metadata area it came from. */
  area: DiskArea;
  text: string;
}

function u64(buffer: Buffer, at: number, what: string): number {
  const value = buffer.readBigUInt64LE(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw lvmCorrupt(`${what} (${value}) is absurdly large`);
  return Number(value);
}

/** The label, or undefined when none of the first four sectors carries "LABELONE". */
export async function readPvLabel(pv: ByteSource, where: string): Promise<PvLabel | undefined> {
  if (pv.size < LABEL_SCAN_SECTORS * SECTOR) return undefined;
  const head = await readBytes(pv, 0, LABEL_SCAN_SECTORS * SECTOR);
  for (let sector = 0; sector < LABEL_SCAN_SECTORS; sector += 1) {
    const label = head.subarray(sector * SECTOR, (sector + 1) * SECTOR);
    if (label.toString('latin1', 0, 8) !== 'LABELONE') continue;
    const claimed = u64(label, 8, `${where}: label sector number`);
    if (claimed !== sector) throw lvmCorrupt(`${where}: the label in sector ${sector} says it is in sector ${claimed}`);
    const crc = label.readUInt32LE(16);
    if (lvmCrc(label.subarray(20)) !== crc) throw lvmCorrupt(`${where}: PV label checksum mismatch (sector ${sector})`);
    const type = label.toString('latin1', 24, 32);
    if (type !== 'LVM2 001') throw lvmCorrupt(`${where}: label type ${JSON.stringify(type)} is not "LVM2 001" (only LVM2 text-format PVs can be read)`);
    const headerOffset = label.readUInt32LE(20);
    // The PV header and its area lists must fit in the label's sector.
    if (headerOffset < 32 || headerOffset > SECTOR - 40 - 32) throw lvmCorrupt(`${where}: PV header offset ${headerOffset} is outside the label sector`);
    const uuid = label.toString('latin1', headerOffset, headerOffset + 32);
    if (!/^[A-Za-z0-9!#]{32}$/.test(uuid)) throw lvmCorrupt(`${where}: PV UUID is not 32 printable characters`);
    const deviceSize = u64(label, headerOffset + 32, `${where}: PV device size`);
    let at = headerOffset + 40;
    const list = (name: string): DiskArea[] => {
      const areas: DiskArea[] = [];
      for (;;) {
        if (at + 16 > SECTOR) throw lvmCorrupt(`${where}: the PV header's ${name} list runs past the label sector`);
        const offset = u64(label, at, `${where}: ${name} offset`);
        const size = u64(label, at + 8, `${where}: ${name} size`);
        at += 16;
        if (offset === 0) return areas;
        if (areas.length >= MAX_AREAS) throw lvmCorrupt(`${where}: more than ${MAX_AREAS} ${name}s`);
        areas.push({ offset, size });
      }
    };
    const dataAreas = list('data area');
    const metadataAreas = list('metadata area');
    return { sector, uuid, deviceSize, dataAreas, metadataAreas };
  }
  return undefined;
}

/**
 * The current VG metadata text of one metadata area, or undefined when the area holds none
 * (a fresh PV not in a VG, or a copy LVM marked ignored). Checks the mda header's checksum,
 * magic, version and self-described start, and the text's checksum.
 */
export async function readMetadataArea(pv: ByteSource, area: DiskArea, where: string): Promise<MetadataCopy | undefined> {
  const name = `${where}: metadata area at byte ${area.offset}`;
  if (area.offset + MDA_HEADER_SIZE > pv.size) throw lvmCorrupt(`${name} lies outside the ${pv.size}-byte PV`);
  const header = await readBytes(pv, area.offset, MDA_HEADER_SIZE);
  if (lvmCrc(header.subarray(4)) !== header.readUInt32LE(0)) throw lvmCorrupt(`${name}: mda header checksum mismatch`);
  if (!header.subarray(4, 20).equals(MDA_MAGIC)) throw lvmCorrupt(`${name}: no metadata area magic`);
  const version = header.readUInt32LE(20);
  if (version !== 1) throw lvmCorrupt(`${name}: mda header version ${version} is not 1`);
  const start = u64(header, 24, `${name}: start`);
  if (start !== area.offset) throw lvmCorrupt(`${name}: the mda header says it starts at byte ${start}`);
  // The header's size is authoritative for the circular buffer; the PV header's may be 0 (= to the end).
  const size = u64(header, 32, `${name}: size`);
  if (size <= MDA_HEADER_SIZE || start + size > pv.size) throw lvmCorrupt(`${name}: size ${size} does not fit the ${pv.size}-byte PV`);
  const offset = u64(header, 40, `${name}: metadata offset`);
  const length = u64(header, 48, `${name}: metadata size`);
  const checksum = header.readUInt32LE(56);
  const flags = header.readUInt32LE(60);
  if (offset === 0 && length === 0) return undefined;
  if (flags & RAW_LOCN_IGNORED) return undefined;
  if (offset < MDA_HEADER_SIZE || offset >= size) throw lvmCorrupt(`${name}: metadata offset ${offset} is outside the area`);
  if (length > size - MDA_HEADER_SIZE || length > MAX_METADATA_BYTES) throw lvmCorrupt(`${name}: metadata size ${length} does not fit the area`);
  // Text that runs past the end of the area continues right after the mda header.
  const first = Math.min(length, size - offset);
  const text = Buffer.alloc(length);
  await pv.readAt(text.subarray(0, first), start + offset);
  if (first < length) await pv.readAt(text.subarray(first), start + MDA_HEADER_SIZE);
  if (lvmCrc(text) !== checksum) throw lvmCorrupt(`${name}: metadata text checksum mismatch`);
  return { area: { offset: start, size }, text: text.toString('latin1').replace(/\0+$/, '') };
}
