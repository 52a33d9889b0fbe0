/**
 * Partition tables on a virtual disk: MBR (primary entries and the extended/EBR chain) and GPT
 * (header and entry-array CRCs checked, backup header used when the primary is damaged), or
 * none at all when a filesystem fills the whole disk. Sector size is 512 bytes, which is what
 * virtio-blk presents by default; a GPT written for 4 KiB sectors is recognised too.
 */
import { readBytes, type ByteSource } from '../io/byte-source.js';
import { crc32 } from './crc.js';
import { Ext4Error } from './errors.js';
import { findVolume, scanLvm, type LvmScan, type LvmVolumeDetails } from './lvm/scan.js';

export type PartitionScheme = 'mbr' | 'gpt' | 'none' | 'lvm';

export interface Partition {
  /**
   * 1-based like Linux (vda1, vda5 for the first logical MBR partition); 0 is the whole disk.
   * An LVM logical volume (scheme "lvm") carries the index of the partition holding its PV.
   */
  index: number;
  /**
   * Byte offset of the partition on the virtual disk. An LV need not be contiguous: this is
   * where its first piece starts, and `lvm.pieces` says where every byte is.
   */
  offset: number;
  /** Length in bytes. */
  length: number;
  /** MBR: "0x83"; GPT: the type GUID in lower case; whole disk: "none"; LV: "linear", "thin", ... */
  type: string;
  scheme: PartitionScheme;
  /** GPT partition name, when there is one; "VG/LV" for a logical volume. */
  name?: string;
  /** True for MBR type 0x83 and the GPT "Linux filesystem" GUID, and for an LV holding an ext filesystem. */
  linux: boolean;
  /** Logical volumes only: VG, LV, and where its bytes are (or why it cannot be read). */
  lvm?: LvmVolumeDetails;
}

export const LINUX_FILESYSTEM_GUID = '0fc63daf-8483-4772-8e79-3d69d8477de4';
const SECTOR = 512;
const EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
/** A chain of logical partitions longer than this is a loop or garbage. */
const MAX_LOGICAL = 128;

function tableError(message: string): Ext4Error {
  return new Ext4Error('fs.partition-table-corrupt', `partition table: ${message}`);
}

function readU64(view: DataView, at: number): number {
  const value = view.getUint32(at + 4, true) * 2 ** 32 + view.getUint32(at, true);
  return value;
}

/** Mixed-endian GUID text as GPT tools print it. */
export function formatGuid(bytes: Uint8Array): string {
  const hex = (from: number, to: number, reverse: boolean): string => {
    const part = Array.from(bytes.subarray(from, to));
    if (reverse) part.reverse();
    return part.map((b) => b.toString(16).padStart(2, '0')).join('');
  };
  return `${hex(0, 4, true)}-${hex(4, 6, true)}-${hex(6, 8, true)}-${hex(8, 10, false)}-${hex(10, 16, false)}`;
}

interface MbrEntry {
  type: number;
  start: number;
  sectors: number;
}

function mbrEntries(sector: Buffer): MbrEntry[] {
  const entries: MbrEntry[] = [];
  for (let i = 0; i < 4; i += 1) {
    const at = 446 + i * 16;
    entries.push({ type: sector[at + 4]!, start: sector.readUInt32LE(at + 8), sectors: sector.readUInt32LE(at + 12) });
  }
  return entries;
}

function hasMbrSignature(sector: Buffer): boolean {
  return sector[510] === 0x55 && sector[511] === 0xaa;
}

function checkBounds(disk: ByteSource, offset: number, length: number, what: string): void {
  if (length <= 0 || offset + length > disk.size) {
    throw tableError(`${what} (${offset}+${length} bytes) lies outside the ${disk.size}-byte disk`);
  }
}

async function readMbr(disk: ByteSource, sector0: Buffer): Promise<Partition[]> {
  const partitions: Partition[] = [];
  const entries = mbrEntries(sector0);
  let extended: MbrEntry | undefined;
  entries.forEach((entry, i) => {
    if (entry.type === 0 || entry.sectors === 0) return;
    if (EXTENDED_TYPES.has(entry.type)) {
      if (extended) throw tableError('more than one extended partition in the MBR');
      extended = entry;
      return;
    }
    const offset = entry.start * SECTOR;
    const length = entry.sectors * SECTOR;
    checkBounds(disk, offset, length, `MBR partition ${i + 1}`);
    partitions.push(mbrPartition(i + 1, offset, length, entry.type));
  });
  if (extended) {
    // Logical partitions: each EBR holds one partition (relative to this EBR) and a link to the
    // next EBR (relative to the start of the extended partition).
    const base = extended.start;
    let ebr = base;
    const seen = new Set<number>();
    for (let n = 0; ; n += 1) {
      if (n >= MAX_LOGICAL || seen.has(ebr)) throw tableError('the extended partition chain loops');
      seen.add(ebr);
      checkBounds(disk, ebr * SECTOR, SECTOR, 'extended boot record');
      const sector = await readBytes(disk, ebr * SECTOR, SECTOR);
      if (!hasMbrSignature(sector)) throw tableError(`extended boot record at sector ${ebr} has no 0x55AA signature`);
      const [logical, link] = mbrEntries(sector);
      if (logical && logical.type !== 0 && logical.sectors !== 0) {
        const offset = (ebr + logical.start) * SECTOR;
        const length = logical.sectors * SECTOR;
        checkBounds(disk, offset, length, `logical partition ${5 + n}`);
        partitions.push(mbrPartition(5 + n, offset, length, logical.type));
      }
      if (!link || link.type === 0 || link.sectors === 0) break;
      ebr = base + link.start;
    }
  }
  return partitions;
}

function mbrPartition(index: number, offset: number, length: number, type: number): Partition {
  return {
    index,
    offset,
    length,
    type: `0x${type.toString(16).padStart(2, '0')}`,
    scheme: 'mbr',
    linux: type === 0x83,
  };
}

interface GptHeader {
  entriesLba: number;
  count: number;
  entrySize: number;
  entriesCrc: number;
}

async function readGptHeader(disk: ByteSource, lba: number, sectorSize: number): Promise<GptHeader | string> {
  if ((lba + 1) * sectorSize > disk.size) return `header LBA ${lba} is past the end of the disk`;
  const sector = await readBytes(disk, lba * sectorSize, sectorSize);
  if (sector.toString('latin1', 0, 8) !== 'EFI PART') return `no "EFI PART" signature at LBA ${lba}`;
  const headerSize = sector.readUInt32LE(12);
  if (headerSize < 92 || headerSize > sectorSize) return `header_size ${headerSize} is out of range`;
  const stored = sector.readUInt32LE(16);
  const copy = Buffer.from(sector.subarray(0, headerSize));
  copy.writeUInt32LE(0, 16);
  if (crc32(copy) !== stored) return `header CRC32 mismatch at LBA ${lba}`;
  const view = new DataView(sector.buffer, sector.byteOffset, sector.length);
  const entriesLba = readU64(view, 72);
  const count = sector.readUInt32LE(80);
  const entrySize = sector.readUInt32LE(84);
  if (entrySize < 128 || entrySize % 8 !== 0 || entrySize > 4096) return `entry size ${entrySize} is invalid`;
  if (count > 4096) return `${count} partition entries is more than this reader accepts`;
  return { entriesLba, count, entrySize, entriesCrc: sector.readUInt32LE(88) };
}

/** Partitions described by one GPT header (primary or backup) and its entry array, or why not. */
async function readGptCopy(disk: ByteSource, lba: number, sectorSize: number): Promise<Partition[] | string> {
  const header = await readGptHeader(disk, lba, sectorSize);
  if (typeof header === 'string') return header;
  const arrayBytes = header.count * header.entrySize;
  const arrayOffset = header.entriesLba * sectorSize;
  if (arrayBytes === 0 || arrayOffset + arrayBytes > disk.size) return `partition entry array (LBA ${header.entriesLba}) lies outside the disk`;
  const array = await readBytes(disk, arrayOffset, arrayBytes);
  if (crc32(array) !== header.entriesCrc) return `partition entry array CRC32 mismatch (header at LBA ${lba})`;
  const view = new DataView(array.buffer, array.byteOffset, array.length);
  const partitions: Partition[] = [];
  for (let i = 0; i < header.count; i += 1) {
    const at = i * header.entrySize;
    const typeBytes = array.subarray(at, at + 16);
    if (typeBytes.every((b) => b === 0)) continue;
    const first = readU64(view, at + 32);
    const last = readU64(view, at + 40);
    if (last < first) throw tableError(`GPT entry ${i + 1} ends (LBA ${last}) before it starts (LBA ${first})`);
    const offset = first * sectorSize;
    const length = (last - first + 1) * sectorSize;
    checkBounds(disk, offset, length, `GPT partition ${i + 1}`);
    const type = formatGuid(typeBytes);
    const name = array.toString('utf16le', at + 56, at + 128).replace(/\0.*$/s, '');
    partitions.push({ index: i + 1, offset, length, type, scheme: 'gpt', linux: type === LINUX_FILESYSTEM_GUID, ...(name ? { name } : {}) });
  }
  return partitions;
}

/**
 * The GPT, from the primary header and array, or else from the backup pair at the end of the
 * disk (as firmware does). Undefined when there is no GPT signature at all.
 */
async function readGpt(disk: ByteSource): Promise<Partition[] | undefined> {
  for (const sectorSize of [SECTOR, 4096]) {
    const primary = await readGptCopy(disk, 1, sectorSize);
    if (typeof primary !== 'string') return primary;
    const backup = await readGptCopy(disk, Math.floor(disk.size / sectorSize) - 1, sectorSize);
    if (typeof backup !== 'string') return backup;
    if (primary.startsWith('no "EFI PART"') && backup.startsWith('no "EFI PART"')) continue;
    throw tableError(`GPT primary copy is invalid (${primary}) and so is the backup (${backup})`);
  }
  return undefined;
}

/** ext2/3/4 superblock magic at byte 1080 of the filesystem. */
export async function hasExtMagic(disk: ByteSource, offset: number): Promise<boolean> {
  if (offset + 2048 > disk.size) return false;
  const magic = await readBytes(disk, offset + 1024 + 0x38, 2);
  return magic.readUInt16LE(0) === 0xef53;
}

/**
 * Every partition on the disk. A disk without a table yields one entry, index 0, covering the
 * whole disk (scheme "none"); a disk with an MBR signature but no entries yields none.
 */
export async function readPartitions(disk: ByteSource): Promise<Partition[]> {
  const whole: Partition = { index: 0, offset: 0, length: disk.size, type: 'none', scheme: 'none', linux: false };
  if (disk.size < SECTOR) return [whole];
  const sector0 = await readBytes(disk, 0, SECTOR);
  if (hasMbrSignature(sector0)) {
    const entries = mbrEntries(sector0);
    if (entries.some((e) => e.type === 0xee)) {
      const gpt = await readGpt(disk);
      if (gpt) return gpt;
      throw tableError('the MBR is a GPT protective MBR, but no valid GPT header was found');
    }
    // A filesystem's boot sector (or an ext superblock at 1024) can carry 0x55AA too; an MBR
    // with no plausible entry is not a table.
    if (entries.some((e) => e.type !== 0 && e.sectors !== 0)) return readMbr(disk, sector0);
  }
  const gpt = await readGpt(disk).catch(() => undefined);
  if (gpt) return gpt;
  return [{ ...whole, linux: await hasExtMagic(disk, 0) }];
}

/** The partitions and, after them, every LVM logical volume on the disk (scheme "lvm"). */
export async function readVolumes(disk: ByteSource): Promise<{ volumes: Partition[]; lvm: LvmScan }> {
  const partitions = await readPartitions(disk);
  const lvm = await scanLvm(disk, partitions, hasExtMagic);
  return { volumes: [...partitions, ...lvm.volumes], lvm };
}

/** A `--partition` value: a number (0 = the whole disk) or "VG/LV". */
export type PartitionSelector = number | string;

/** Parse what a user typed after --partition; undefined when it is neither a number nor VG/LV. */
export function parsePartitionSelector(value: string): PartitionSelector | undefined {
  if (/^[0-9]+$/.test(value)) return Number(value);
  // LVM's own name rules: letters, digits and + _ . -, not starting with "-".
  if (/^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*\/[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$/.test(value)) return value;
  return undefined;
}

function describe(p: Partition): string {
  if (p.scheme === 'lvm') return `${p.name} (LVM ${p.type}, ${p.length} bytes${p.lvm?.refused ? ', cannot be read' : ''})`;
  return `${p.index} (${p.scheme} type ${p.type}, ${p.length} bytes at ${p.offset})`;
}

/**
 * The partition or LV to read: `wanted` when given (a partition number, or "VG/LV"), else the
 * only Linux partition or LV holding an ext filesystem (or the whole disk when it is a
 * filesystem itself), else the only partition holding an ext superblock.
 */
export async function choosePartition(disk: ByteSource, volumes: Partition[], wanted?: PartitionSelector, lvm?: LvmScan): Promise<Partition> {
  const partitions = volumes.filter((p) => p.scheme !== 'lvm');
  const list = volumes.map(describe).join(', ');
  if (typeof wanted === 'string') {
    return findVolume(lvm ?? { pvs: [], vgs: [], volumes: volumes.filter((p) => p.scheme === 'lvm'), problems: [] }, wanted);
  }
  if (wanted !== undefined) {
    const found = partitions.find((p) => p.index === wanted);
    if (!found) throw new Ext4Error('fs.partition-not-found', `partition ${wanted} does not exist; the disk has: ${list || 'no partitions'}`);
    return found;
  }
  const linux = volumes.filter((p) => p.linux);
  if (linux.length === 1) return linux[0]!;
  if (linux.length > 1) {
    throw new Ext4Error('fs.partition-ambiguous', `the disk has ${linux.length} Linux partitions or LVs (${list}); pick one with --partition N or --partition VG/LV`);
  }
  const pvPartitions = new Set(lvm?.pvs.map((pv) => pv.partition) ?? []);
  const withExt: Partition[] = [];
  for (const p of partitions) if (!pvPartitions.has(p.index) && (await hasExtMagic(disk, p.offset))) withExt.push(p);
  if (withExt.length === 1) return withExt[0]!;
  if (withExt.length > 1) {
    throw new Ext4Error('fs.partition-ambiguous', `${withExt.length} partitions hold ext filesystems (${list}); pick one with --partition N`);
  }
  if (lvm && (lvm.pvs.length > 0 || lvm.problems.length > 0)) {
    // The root is presumably on LVM: say what stood in the way.
    if (lvm.problems.length > 0) throw lvm.problems[0]!;
    const refused = lvm.volumes.filter((v) => v.lvm?.refused).map((v) => v.lvm!.refused!);
    throw new Ext4Error(
      'fs.partition-not-found',
      `no LVM logical volume holding an ext filesystem could be read; the disk has: ${list}${refused.length > 0 ? `. ${refused.join('; ')}` : ''}`,
    );
  }
  if (partitions.length === 1) return partitions[0]!; // let the filesystem probe name what it is
  throw new Ext4Error('fs.partition-not-found', `no Linux partition and no ext filesystem found; the disk has: ${list || 'no partitions'}`);
}
