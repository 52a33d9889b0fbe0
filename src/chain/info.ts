/**
 * `info`: what an image is, in the field names and shapes of `qemu-img info --output=json`, so
 * that scripts written for qemu-img read ours unchanged. With backingChain, one object per
 * layer from the top down, like `qemu-img info --backing-chain`.
 */
import { stat } from 'node:fs/promises';
import type { FileSystemAccess, HostFile } from '../io/host-file.js';
import { nodeFileSystem } from '../io/host-file.js';
import { readSnapshotTable } from '../qcow2/check.js';
import { ChainError, Qcow2Error } from '../qcow2/errors.js';
import {
  backingFormatOf,
  bitmapsExtensionOf,
  Compatible,
  externalDataFileOf,
  HEADER_PROBE_BYTES,
  Incompatible,
  Autoclear,
  parseHeader,
  readU64,
  type Qcow2Header,
} from '../qcow2/header.js';
import { NamedFilePolicy } from '../qcow2/named-files.js';

export interface QemuSnapshotInfo {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  icount?: number;
}

export interface QemuBitmapInfo {
  name: string;
  granularity: number;
  flags: string[];
}

export interface ImageInfo {
  filename: string;
  format: 'qcow2' | 'raw';
  'virtual-size': number;
  'actual-size': number;
  'dirty-flag': boolean;
  'cluster-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  snapshots?: QemuSnapshotInfo[];
  'format-specific'?: {
    type: 'qcow2';
    data: {
      compat: '0.10' | '1.1';
      'compression-type': 'zlib' | 'zstd';
      'lazy-refcounts'?: boolean;
      bitmaps?: QemuBitmapInfo[];
      'refcount-bits': number;
      corrupt?: boolean;
      'extended-l2'?: boolean;
      'data-file'?: string;
      'data-file-raw'?: boolean;
    };
  };
}

export interface InfoOptions {
  fs?: FileSystemAccess;
  format?: 'qcow2' | 'raw';
  backingChain?: boolean;
  allowedDirectories?: string[];
  maxDepth?: number;
}

/** QEMU's path_combine: a relative name is taken from the folder of the referring path as written. */
function combinePath(referrer: string, name: string): string {
  if (name.startsWith('/')) return name;
  const slash = referrer.lastIndexOf('/');
  return slash < 0 ? name : referrer.slice(0, slash + 1) + name;
}

async function readHeader(file: HostFile): Promise<Qcow2Header> {
  const length = await file.length();
  const probe = new Uint8Array(Math.min(length, HEADER_PROBE_BYTES));
  await file.read(probe, 0);
  const bits = probe.length >= 24 ? new DataView(probe.buffer).getUint32(20) : 16;
  const first = new Uint8Array(Math.min(length, 2 ** Math.min(Math.max(bits, 9), 21)));
  await file.read(first, 0);
  try {
    return parseHeader(first, length);
  } catch (error) {
    if (error instanceof Qcow2Error) {
      const hint = error.code === 'qcow2.bad-magic' ? ' (for a raw file, say so: -f raw)' : '';
      throw new Qcow2Error(error.code, `${file.path}: ${error.message}${hint}`, { cause: error });
    }
    throw error;
  }
}

async function readBitmaps(file: HostFile, header: Qcow2Header): Promise<QemuBitmapInfo[] | null> {
  const ext = bitmapsExtensionOf(header);
  if (!ext || (header.autoclearFeatures & Autoclear.bitmaps) === 0n) return null;
  if (ext.bitmapDirectorySize > 64 * 1024 * 1024) return null;
  const dir = new Uint8Array(ext.bitmapDirectorySize);
  await file.read(dir, ext.bitmapDirectoryOffset);
  const view = new DataView(dir.buffer);
  const out: QemuBitmapInfo[] = [];
  let at = 0;
  for (let i = 0; i < ext.nbBitmaps && at + 24 <= dir.length; i += 1) {
    readU64(view, at, 'bitmap_table_offset');
    const flags = view.getUint32(at + 12);
    const granularityBits = dir[at + 17] ?? 0;
    const nameSize = view.getUint16(at + 18);
    const extraSize = view.getUint32(at + 20);
    const nameAt = at + 24 + extraSize;
    const names: string[] = [];
    if (flags & 1) names.push('in-use');
    if (flags & 2) names.push('auto');
    out.push({ flags: names, name: new TextDecoder().decode(dir.subarray(nameAt, nameAt + nameSize)), granularity: 2 ** granularityBits });
    at += Math.ceil((24 + extraSize + nameSize) / 8) * 8;
  }
  return out;
}

/** Info about one image file (not its backing files). `displayName` is the filename field. */
export async function imageInfo(path: string, displayName: string, format: 'qcow2' | 'raw', fs: FileSystemAccess = nodeFileSystem, opened?: HostFile): Promise<ImageInfo> {
  // Never block on a FIFO or read a device: only regular files are images.
  const file = opened ?? (await fs.open(path, 'read', { regularOnly: true }));
  try {
    const st = await stat(file.path);
    const actualSize = st.blocks * 512;
    if (format === 'raw') {
      // Whole sectors, as QEMU sees a raw file.
      return { 'virtual-size': Math.ceil((await file.length()) / 512) * 512, filename: displayName, format: 'raw', 'actual-size': actualSize, 'dirty-flag': false };
    }
    const header = await readHeader(file);
    const info: ImageInfo = {
      'virtual-size': header.size,
      filename: displayName,
      'cluster-size': 2 ** header.clusterBits,
      format: 'qcow2',
      'actual-size': actualSize,
      'dirty-flag': (header.incompatibleFeatures & Incompatible.dirty) !== 0n,
    };
    const snapshots = (await readSnapshotTable(file, header)).entries;
    if (snapshots.length > 0) {
      info.snapshots = snapshots.map((s) => ({
        icount: s.icount ?? undefined,
        'vm-clock-nsec': s.vmClockNsec % 1e9,
        name: s.name,
        'date-sec': s.dateSec,
        'date-nsec': s.dateNsec,
        'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
        id: s.id,
        'vm-state-size': s.vmStateSize,
      }));
      for (const s of info.snapshots) if (s.icount === undefined) delete s.icount;
    }
    const compressionType = header.compressionType === 1 ? 'zstd' : 'zlib';
    if (header.version === 2) {
      info['format-specific'] = { type: 'qcow2', data: { compat: '0.10', 'compression-type': compressionType, 'refcount-bits': 2 ** header.refcountOrder } };
    } else {
      const data: NonNullable<ImageInfo['format-specific']>['data'] = {
        compat: '1.1',
        'compression-type': compressionType,
        'lazy-refcounts': (header.compatibleFeatures & Compatible.lazyRefcounts) !== 0n,
        'refcount-bits': 2 ** header.refcountOrder,
      };
      const bitmaps = await readBitmaps(file, header);
      if (bitmaps) data.bitmaps = bitmaps;
      const dataFile = externalDataFileOf(header);
      if (dataFile !== null) {
        data['data-file'] = dataFile;
        data['data-file-raw'] = (header.autoclearFeatures & Autoclear.rawExternalData) !== 0n;
      }
      data.corrupt = (header.incompatibleFeatures & Incompatible.corrupt) !== 0n;
      data['extended-l2'] = (header.incompatibleFeatures & Incompatible.extendedL2) !== 0n;
      info['format-specific'] = { type: 'qcow2', data };
    }
    if (header.backingFile !== null) {
      const backingFormat = backingFormatOf(header);
      if (backingFormat !== null) info['backing-filename-format'] = backingFormat;
      info['full-backing-filename'] = combinePath(displayName, header.backingFile);
      info['backing-filename'] = header.backingFile;
    }
    return info;
  } finally {
    await file.close();
  }
}

/**
 * Info for `path`, or with backingChain for it and every backing file below it. Like qemu-img
 * info, which opens the backing chain and the data file of every image it describes, every
 * backing and data file name is resolved and checked by one NamedFilePolicy (confined to the
 * image's folder tree and the allowed folders, regular files only) and refused otherwise;
 * formats are never probed.
 */
export async function infoImage(path: string, options: InfoOptions = {}): Promise<ImageInfo[]> {
  const fs = options.fs ?? nodeFileSystem;
  const policy = await NamedFilePolicy.forImage(path, { allowedDirectories: options.allowedDirectories, fs });
  const out: ImageInfo[] = [];
  const seen = new Set<string>();
  let displayName = path;
  let hostPath = path;
  let format: 'qcow2' | 'raw' = options.format ?? 'qcow2';
  let opened: { realPath: string; file: HostFile } = await policy.openTop(path, 'read');
  for (;;) {
    const real = opened.realPath;
    if (seen.has(real) || out.length >= (options.maxDepth ?? 16)) {
      await opened.file.close();
      if (seen.has(real)) throw new ChainError('chain.loop', `backing chain loops back to ${real}`);
      throw new ChainError('chain.too-deep', `backing chain of ${path} is deeper than ${options.maxDepth ?? 16}`);
    }
    seen.add(real);
    const info = await imageInfo(hostPath, displayName, format, fs, opened.file);
    out.push(info);
    const dataFile = info['format-specific']?.data['data-file'];
    if (dataFile !== undefined) await policy.resolve(dataFile, real, 'external data file');
    const backingName = info['backing-filename'];
    if (backingName === undefined) break;
    if (!options.backingChain) {
      await policy.resolve(backingName, real, 'backing file');
      break;
    }
    const backingFormat = info['backing-filename-format'];
    if (backingFormat === undefined) throw new ChainError('chain.missing-backing-format', `${displayName} names backing file "${backingName}" without a backing format; formats are never probed`);
    if (backingFormat !== 'qcow2' && backingFormat !== 'raw') throw new ChainError('chain.unsupported-format', `${displayName}: backing format "${backingFormat}" is not supported (qcow2 or raw)`);
    const next = await policy.open(backingName, real, 'backing file', 'read');
    opened = next;
    hostPath = next.realPath;
    displayName = info['full-backing-filename']!;
    format = backingFormat;
  }
  return out;
}

function humanSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${bytes} B` : `${Number(value.toFixed(3))} ${units[unit]}`;
}

/** The human text, close to qemu-img info's. */
export function formatInfoText(infos: ImageInfo[]): string {
  return infos
    .map((info) => {
      const lines = [
        `image: ${info.filename}`,
        `file format: ${info.format}`,
        `virtual size: ${humanSize(info['virtual-size'])} (${info['virtual-size']} bytes)`,
        `disk size: ${humanSize(info['actual-size'])}`,
      ];
      if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size']}`);
      if (info['backing-filename'] !== undefined) {
        const full = info['full-backing-filename'];
        lines.push(`backing file: ${info['backing-filename']}${full && full !== info['backing-filename'] ? ` (actual path: ${full})` : ''}`);
      }
      if (info['backing-filename-format'] !== undefined) lines.push(`backing file format: ${info['backing-filename-format']}`);
      if (info.snapshots) {
        lines.push('Snapshot list:', 'ID  TAG  VM SIZE  DATE  VM CLOCK');
        for (const s of info.snapshots) lines.push(`${s.id}  ${s.name}  ${s['vm-state-size']}  ${new Date(s['date-sec'] * 1000).toISOString()}  ${s['vm-clock-sec']}s`);
      }
      const fs = info['format-specific'];
      if (fs) {
        lines.push('Format specific information:');
        for (const [key, value] of Object.entries(fs.data)) {
          if (key === 'bitmaps') {
            lines.push('    bitmaps:');
            for (const b of value as QemuBitmapInfo[]) lines.push(`        [${b.name}] granularity ${b.granularity}, flags: ${b.flags.join(', ') || '-'}`);
          } else lines.push(`    ${key}: ${String(value)}`);
        }
      }
      return lines.join('\n');
    })
    .join('\n\n');
}
