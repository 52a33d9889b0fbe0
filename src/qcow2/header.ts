/**
 * The qcow2 header (first cluster of the file): fixed fields, header extensions and the backing
 * file name. Parsing validates every field before anything is sized from it, because the file
 * may come from an untrusted guest owner; serializing writes back exactly what was parsed plus
 * the caller's changes (unknown extensions are kept byte for byte).
 */
import { Qcow2Error } from './errors.js';

export const QCOW2_MAGIC = 0x514649fb;
export const HEADER_V2_LENGTH = 72;
export const HEADER_V3_MIN_LENGTH = 104;
/** Header length QEMU writes for v3 (with the compression_type byte and padding). */
export const HEADER_V3_LENGTH = 112;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** Largest backing file name QEMU accepts. */
export const MAX_BACKING_NAME = 1023;
/** Bounds QEMU applies too; anything larger is not an image QEMU would open. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
/** Virtual sizes stay exact JavaScript numbers (and within QEMU's own 2^61 limit). */
export const MAX_VIRTUAL_SIZE = Number.MAX_SAFE_INTEGER - (Number.MAX_SAFE_INTEGER % (2 * 1024 * 1024));

/** incompatible_features bits. */
export const Incompatible = {
  dirty: 1n << 0n,
  corrupt: 1n << 1n,
  externalDataFile: 1n << 2n,
  compressionType: 1n << 3n,
  extendedL2: 1n << 4n,
} as const;
export const KNOWN_INCOMPATIBLE = 0x1fn;

/** compatible_features bits. */
export const Compatible = { lazyRefcounts: 1n << 0n } as const;
export const KNOWN_COMPATIBLE = 0x1n;

/** autoclear_features bits. */
export const Autoclear = { bitmaps: 1n << 0n, rawExternalData: 1n << 1n } as const;
export const KNOWN_AUTOCLEAR = 0x3n;

export const ExtensionType = {
  end: 0x00000000,
  backingFormat: 0xe2792aca,
  featureNameTable: 0x6803f857,
  bitmaps: 0x23852875,
  fullDiskEncryption: 0x0537be77,
  externalDataFile: 0x44415441,
} as const;

export const CompressionType = { deflate: 0, zstd: 1 } as const;

export interface HeaderExtension {
  type: number;
  /** The extension's data, without padding, exactly as in the file. */
  data: Uint8Array;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  /** Virtual disk size in bytes. */
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** All header extensions in file order (known ones too, as raw data). */
  extensions: HeaderExtension[];
  /** Backing file name as stored (not resolved), or null. */
  backingFile: string | null;
}

export interface FeatureName {
  kind: 'incompatible' | 'compatible' | 'autoclear';
  bit: number;
  name: string;
}

export interface BitmapsExtension {
  nbBitmaps: number;
  bitmapDirectorySize: number;
  bitmapDirectoryOffset: number;
}

export interface EncryptionExtension {
  offset: number;
  length: number;
}

function fail(field: string, message: string): never {
  throw new Qcow2Error('qcow2.bad-header-field', `qcow2 header field ${field}: ${message}`);
}

/** Read a big-endian u64 as an exact number, failing (naming the field) above 2^53. */
export function readU64(view: DataView, at: number, field: string): number {
  const hi = view.getUint32(at);
  const lo = view.getUint32(at + 4);
  if (hi > 0x1fffff) fail(field, `value 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is too large`);
  return hi * 0x1_0000_0000 + lo;
}

export function writeU64(view: DataView, at: number, value: number): void {
  view.setUint32(at, Math.floor(value / 0x1_0000_0000));
  view.setUint32(at + 4, value >>> 0);
}

const latin = new TextDecoder('utf-8', { fatal: false });

/** How many bytes of the file the parser needs before it knows the cluster size. */
export const HEADER_PROBE_BYTES = 512;

/**
 * Parse the header. `firstCluster` must hold at least the first cluster of the file (or the
 * whole file if shorter); `fileLength` bounds every offset. Throws Qcow2Error on anything invalid.
 */
export function parseHeader(firstCluster: Uint8Array, fileLength: number): Qcow2Header {
  if (firstCluster.length < HEADER_V2_LENGTH || fileLength < HEADER_V2_LENGTH) {
    throw new Qcow2Error('qcow2.bad-magic', `file is ${fileLength} bytes, too short for a qcow2 header`);
  }
  const view = new DataView(firstCluster.buffer, firstCluster.byteOffset, firstCluster.byteLength);
  const magic = view.getUint32(0);
  if (magic !== QCOW2_MAGIC) {
    throw new Qcow2Error('qcow2.bad-magic', `not a qcow2 file (magic 0x${magic.toString(16).padStart(8, '0')})`);
  }
  const version = view.getUint32(4);
  if (version !== 2 && version !== 3) {
    throw new Qcow2Error('qcow2.unsupported-version', `qcow2 version ${version} is not supported (only 2 and 3)`);
  }
  const clusterBits = view.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    fail('cluster_bits', `${clusterBits} is outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`);
  }
  const clusterSize = 2 ** clusterBits;
  if (firstCluster.length < Math.min(clusterSize, fileLength)) {
    throw new RangeError(`parseHeader needs the first cluster (${clusterSize} bytes), got ${firstCluster.length}`);
  }
  // Everything below is bounded by what is really present.
  const available = Math.min(clusterSize, fileLength, firstCluster.length);

  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  let headerLength = HEADER_V2_LENGTH;
  let compressionType = 0;
  if (version === 3) {
    if (available < HEADER_V3_MIN_LENGTH) fail('header_length', 'file too short for a version 3 header');
    incompatibleFeatures = view.getBigUint64(72);
    compatibleFeatures = view.getBigUint64(80);
    autoclearFeatures = view.getBigUint64(88);
    refcountOrder = view.getUint32(96);
    headerLength = view.getUint32(100);
    if (headerLength < HEADER_V3_MIN_LENGTH) fail('header_length', `${headerLength} is less than ${HEADER_V3_MIN_LENGTH}`);
    if (headerLength % 8 !== 0) fail('header_length', `${headerLength} is not a multiple of 8`);
    if (headerLength > available) fail('header_length', `${headerLength} runs past the first cluster`);
    if (refcountOrder > 6) fail('refcount_order', `${refcountOrder} is outside 0..6`);
    if (headerLength >= 105) compressionType = firstCluster[104] ?? 0;
  }

  // Extensions first: the feature name table makes the unknown-feature error readable.
  const extensionsStart = headerLength;
  const extensions = parseExtensions(firstCluster.subarray(0, available), extensionsStart);
  const names = featureNamesFrom(extensions);

  const unknownIncompatible = incompatibleFeatures & ~KNOWN_INCOMPATIBLE;
  if (unknownIncompatible !== 0n) {
    const bits: string[] = [];
    for (let bit = 0; bit < 64; bit++) {
      if (unknownIncompatible & (1n << BigInt(bit))) {
        const named = names.find((n) => n.kind === 'incompatible' && n.bit === bit);
        bits.push(named ? `bit ${bit} (${named.name})` : `bit ${bit}`);
      }
    }
    throw new Qcow2Error(
      'qcow2.unknown-incompatible-feature',
      `qcow2 image uses unknown incompatible feature ${bits.join(', ')}; refusing to open it`,
    );
  }
  if (incompatibleFeatures & Incompatible.compressionType) {
    if (headerLength < 105) fail('compression_type', 'compression type bit set but header_length has no compression_type field');
    if (compressionType !== CompressionType.deflate && compressionType !== CompressionType.zstd) {
      fail('compression_type', `unknown compression type ${compressionType}`);
    }
  } else if (compressionType !== CompressionType.deflate) {
    fail('compression_type', `${compressionType} without the compression type incompatible bit`);
  }
  if (incompatibleFeatures & Incompatible.extendedL2 && clusterBits < 14) {
    fail('cluster_bits', `extended L2 entries need clusters of at least 16 KiB (cluster_bits ${clusterBits})`);
  }
  if (version === 2 && refcountOrder !== 4) fail('refcount_order', 'version 2 images have 16-bit refcounts');

  const cryptMethod = view.getUint32(32);
  if (cryptMethod === 1 || cryptMethod === 2) {
    throw new Qcow2Error('qcow2.encrypted', `qcow2 image is encrypted (${cryptMethod === 1 ? 'AES' : 'LUKS'}); encryption is not supported`);
  }
  if (cryptMethod !== 0) fail('crypt_method', `unknown value ${cryptMethod}`);

  const size = readU64(view, 24, 'size');
  if (size > MAX_VIRTUAL_SIZE) throw new Qcow2Error('qcow2.too-large', `virtual size ${size} is too large`);

  const clusterMask = clusterSize - 1;
  const l2Entries = clusterSize / ((incompatibleFeatures & Incompatible.extendedL2) ? 16 : 8);
  const bytesPerL1Entry = clusterSize * l2Entries;
  const requiredL1 = Math.ceil(size / bytesPerL1Entry);
  const l1Size = view.getUint32(36);
  const l1TableOffset = readU64(view, 40, 'l1_table_offset');
  if (requiredL1 * 8 > MAX_L1_BYTES) {
    throw new Qcow2Error('qcow2.too-large', `virtual size ${size} needs an L1 table larger than ${MAX_L1_BYTES} bytes with ${clusterSize}-byte clusters`);
  }
  if (l1Size < requiredL1) fail('l1_size', `${l1Size} entries cannot map the virtual size ${size} (needs ${requiredL1})`);
  if (l1Size * 8 > MAX_L1_BYTES) fail('l1_size', `${l1Size} entries is larger than the ${MAX_L1_BYTES}-byte limit`);
  if (l1Size > 0) {
    if (l1TableOffset % clusterSize !== 0 || l1TableOffset === 0) fail('l1_table_offset', `0x${l1TableOffset.toString(16)} is not a cluster-aligned offset`);
    if (l1TableOffset + l1Size * 8 > fileLength) {
      throw new Qcow2Error('qcow2.offset-past-eof', `L1 table (0x${l1TableOffset.toString(16)} + ${l1Size * 8}) runs past the end of the file (${fileLength})`);
    }
  }

  const refcountTableOffset = readU64(view, 48, 'refcount_table_offset');
  const refcountTableClusters = view.getUint32(56);
  if (refcountTableClusters === 0) fail('refcount_table_clusters', 'is 0');
  if (refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) fail('refcount_table_clusters', `${refcountTableClusters} clusters is larger than the ${MAX_REFTABLE_BYTES}-byte limit`);
  if (refcountTableOffset === 0 || (refcountTableOffset & clusterMask) !== 0) fail('refcount_table_offset', `0x${refcountTableOffset.toString(16)} is not a cluster-aligned offset`);
  if (refcountTableOffset + refcountTableClusters * clusterSize > fileLength) {
    throw new Qcow2Error('qcow2.offset-past-eof', `refcount table (0x${refcountTableOffset.toString(16)}, ${refcountTableClusters} clusters) runs past the end of the file (${fileLength})`);
  }

  const nbSnapshots = view.getUint32(60);
  const snapshotsOffset = readU64(view, 64, 'snapshots_offset');
  if (nbSnapshots > MAX_SNAPSHOTS) fail('nb_snapshots', `${nbSnapshots} is more than ${MAX_SNAPSHOTS}`);
  if (nbSnapshots > 0) {
    if (snapshotsOffset === 0 || (snapshotsOffset & clusterMask) !== 0) fail('snapshots_offset', `0x${snapshotsOffset.toString(16)} is not a cluster-aligned offset`);
    // Each entry is at least 40 bytes.
    if (snapshotsOffset + nbSnapshots * 40 > fileLength) {
      throw new Qcow2Error('qcow2.offset-past-eof', `snapshot table (0x${snapshotsOffset.toString(16)}, ${nbSnapshots} entries) runs past the end of the file`);
    }
  }

  const backingFileOffset = readU64(view, 8, 'backing_file_offset');
  const backingFileSize = view.getUint32(16);
  let backingFile: string | null = null;
  if (backingFileOffset !== 0) {
    if (backingFileSize === 0 || backingFileSize > MAX_BACKING_NAME) fail('backing_file_size', `${backingFileSize} is outside 1..${MAX_BACKING_NAME}`);
    if (backingFileOffset < extensionsStart || backingFileOffset + backingFileSize > available) {
      fail('backing_file_offset', `name at ${backingFileOffset}+${backingFileSize} is not inside the first cluster after the header`);
    }
    const bytes = firstCluster.subarray(backingFileOffset, backingFileOffset + backingFileSize);
    if (bytes.includes(0)) fail('backing_file_offset', 'backing file name contains a NUL byte');
    backingFile = latin.decode(bytes);
  }

  return {
    version,
    backingFileOffset,
    backingFileSize,
    clusterBits,
    size,
    cryptMethod,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    extensions,
    backingFile,
  };
}

function parseExtensions(area: Uint8Array, start: number): HeaderExtension[] {
  const view = new DataView(area.buffer, area.byteOffset, area.byteLength);
  const extensions: HeaderExtension[] = [];
  let at = start;
  for (;;) {
    if (at + 8 > area.length) {
      // A v2 header may have no end marker when nothing follows; only accept that at the very end.
      if (at >= area.length) break;
      throw new Qcow2Error('qcow2.bad-header-extension', `header extension at ${at} runs past the first cluster`);
    }
    const type = view.getUint32(at);
    const length = view.getUint32(at + 4);
    if (type === ExtensionType.end) break;
    const padded = Math.ceil(length / 8) * 8;
    if (at + 8 + padded > area.length) {
      throw new Qcow2Error('qcow2.bad-header-extension', `header extension 0x${type.toString(16)} (${length} bytes at ${at}) runs past the first cluster`);
    }
    extensions.push({ type, data: area.slice(at + 8, at + 8 + length) });
    at += 8 + padded;
  }
  for (const ext of extensions) validateExtension(ext);
  return extensions;
}

function validateExtension(ext: HeaderExtension): void {
  const need = (n: number, what: string) => {
    if (ext.data.length < n) throw new Qcow2Error('qcow2.bad-header-extension', `${what} header extension is ${ext.data.length} bytes, expected at least ${n}`);
  };
  switch (ext.type) {
    case ExtensionType.bitmaps:
      need(24, 'bitmaps');
      break;
    case ExtensionType.fullDiskEncryption:
      need(16, 'full disk encryption');
      break;
    case ExtensionType.featureNameTable:
      if (ext.data.length % 48 !== 0) throw new Qcow2Error('qcow2.bad-header-extension', `feature name table length ${ext.data.length} is not a multiple of 48`);
      break;
    default:
      break;
  }
}

function extensionOf(header: Pick<Qcow2Header, 'extensions'>, type: number): HeaderExtension | undefined {
  return header.extensions.find((e) => e.type === type);
}

function cString(bytes: Uint8Array): string {
  const nul = bytes.indexOf(0);
  return latin.decode(nul >= 0 ? bytes.subarray(0, nul) : bytes);
}

/** Backing format from its extension (e.g. 'qcow2', 'raw'), or null when absent. */
export function backingFormatOf(header: Pick<Qcow2Header, 'extensions'>): string | null {
  const ext = extensionOf(header, ExtensionType.backingFormat);
  return ext ? cString(ext.data) : null;
}

/** External data file name from its extension, or null. */
export function externalDataFileOf(header: Pick<Qcow2Header, 'extensions'>): string | null {
  const ext = extensionOf(header, ExtensionType.externalDataFile);
  return ext ? cString(ext.data) : null;
}

function featureNamesFrom(extensions: HeaderExtension[]): FeatureName[] {
  const ext = extensions.find((e) => e.type === ExtensionType.featureNameTable);
  if (!ext) return [];
  const names: FeatureName[] = [];
  for (let at = 0; at + 48 <= ext.data.length; at += 48) {
    const kind = ext.data[at];
    const bit = ext.data[at + 1] ?? 0;
    if (kind !== 0 && kind !== 1 && kind !== 2) continue;
    names.push({ kind: (['incompatible', 'compatible', 'autoclear'] as const)[kind], bit, name: cString(ext.data.subarray(at + 2, at + 48)) });
  }
  return names;
}

export function featureNamesOf(header: Pick<Qcow2Header, 'extensions'>): FeatureName[] {
  return featureNamesFrom(header.extensions);
}

export function bitmapsExtensionOf(header: Pick<Qcow2Header, 'extensions'>): BitmapsExtension | null {
  const ext = extensionOf(header, ExtensionType.bitmaps);
  if (!ext) return null;
  const view = new DataView(ext.data.buffer, ext.data.byteOffset, ext.data.byteLength);
  return {
    nbBitmaps: view.getUint32(0),
    bitmapDirectorySize: readU64(view, 8, 'bitmap_directory_size'),
    bitmapDirectoryOffset: readU64(view, 16, 'bitmap_directory_offset'),
  };
}

export function encryptionExtensionOf(header: Pick<Qcow2Header, 'extensions'>): EncryptionExtension | null {
  const ext = extensionOf(header, ExtensionType.fullDiskEncryption);
  if (!ext) return null;
  const view = new DataView(ext.data.buffer, ext.data.byteOffset, ext.data.byteLength);
  return { offset: readU64(view, 0, 'fde offset'), length: readU64(view, 8, 'fde length') };
}

/** Replace (or with null remove) the extension of `type`, keeping the others in order. */
export function withExtension(extensions: HeaderExtension[], type: number, data: Uint8Array | null): HeaderExtension[] {
  const index = extensions.findIndex((e) => e.type === type);
  const out = extensions.filter((e) => e.type !== type);
  if (data !== null) out.splice(index >= 0 ? index : out.length, 0, { type, data });
  return out;
}

export function stringExtensionData(value: string): Uint8Array {
  return new TextEncoder().encode(value);
}

/** The feature name table QEMU writes for the features this engine knows. */
export function standardFeatureNameTable(): Uint8Array {
  const entries: Array<[number, number, string]> = [
    [0, 0, 'dirty bit'],
    [0, 1, 'corrupt bit'],
    [0, 2, 'external data file'],
    [0, 3, 'compression type'],
    [0, 4, 'extended L2 entries'],
    [1, 0, 'lazy refcounts'],
    [2, 0, 'bitmaps'],
    [2, 1, 'raw external data'],
  ];
  const out = new Uint8Array(entries.length * 48);
  entries.forEach(([kind, bit, name], i) => {
    out[i * 48] = kind;
    out[i * 48 + 1] = bit;
    out.set(new TextEncoder().encode(name), i * 48 + 2);
  });
  return out;
}

export function clusterSizeOf(header: Pick<Qcow2Header, 'clusterBits'>): number {
  return 2 ** header.clusterBits;
}

/**
 * Serialize the header, its extensions (in order, end marker) and the backing file name into a
 * buffer of `clusterSize` bytes (the whole first cluster). backingFileOffset/Size and
 * headerLength are recomputed; every other field is written as given.
 */
export function serializeHeader(header: Qcow2Header): { bytes: Uint8Array; header: Qcow2Header } {
  // The feature name table is only informational: like QEMU, leave it out when the first
  // cluster (512-byte clusters) has no room for it next to the backing name and format.
  if (!fitsInFirstCluster(header) && header.extensions.some((e) => e.type === ExtensionType.featureNameTable)) {
    header = { ...header, extensions: header.extensions.filter((e) => e.type !== ExtensionType.featureNameTable) };
  }
  return serializeFitting(header);
}

function fitsInFirstCluster(header: Qcow2Header): boolean {
  const headerLength = header.version === 2 ? HEADER_V2_LENGTH : Math.max(header.headerLength, HEADER_V3_LENGTH);
  const extensions = header.extensions.reduce((n, e) => n + 8 + Math.ceil(e.data.length / 8) * 8, 0);
  const name = header.backingFile === null ? 0 : new TextEncoder().encode(header.backingFile).length;
  return headerLength + extensions + 8 + name <= clusterSizeOf(header);
}

function serializeFitting(header: Qcow2Header): { bytes: Uint8Array; header: Qcow2Header } {
  const clusterSize = clusterSizeOf(header);
  const out = new Uint8Array(clusterSize);
  const view = new DataView(out.buffer);
  const headerLength = header.version === 2 ? HEADER_V2_LENGTH : Math.max(header.headerLength, HEADER_V3_LENGTH);
  let at = headerLength;
  for (const ext of header.extensions) {
    const padded = Math.ceil(ext.data.length / 8) * 8;
    if (at + 8 + padded + 8 > clusterSize) {
      throw new Qcow2Error('qcow2.bad-header-extension', 'header extensions do not fit in the first cluster');
    }
    view.setUint32(at, ext.type);
    view.setUint32(at + 4, ext.data.length);
    out.set(ext.data, at + 8);
    at += 8 + padded;
  }
  // End marker (type 0, length 0) is already zero; reserve its 8 bytes.
  at += 8;
  let backingFileOffset = 0;
  let backingFileSize = 0;
  if (header.backingFile !== null) {
    const name = new TextEncoder().encode(header.backingFile);
    if (name.length === 0 || name.length > MAX_BACKING_NAME) {
      throw new Qcow2Error('qcow2.bad-argument', `backing file name must be 1..${MAX_BACKING_NAME} bytes`);
    }
    if (at + name.length > clusterSize) throw new Qcow2Error('qcow2.bad-argument', 'backing file name does not fit in the first cluster');
    out.set(name, at);
    backingFileOffset = at;
    backingFileSize = name.length;
  }
  view.setUint32(0, QCOW2_MAGIC);
  view.setUint32(4, header.version);
  writeU64(view, 8, backingFileOffset);
  view.setUint32(16, backingFileSize);
  view.setUint32(20, header.clusterBits);
  writeU64(view, 24, header.size);
  view.setUint32(32, header.cryptMethod);
  view.setUint32(36, header.l1Size);
  writeU64(view, 40, header.l1TableOffset);
  writeU64(view, 48, header.refcountTableOffset);
  view.setUint32(56, header.refcountTableClusters);
  view.setUint32(60, header.nbSnapshots);
  writeU64(view, 64, header.snapshotsOffset);
  if (header.version === 3) {
    view.setBigUint64(72, header.incompatibleFeatures);
    view.setBigUint64(80, header.compatibleFeatures);
    view.setBigUint64(88, header.autoclearFeatures);
    view.setUint32(96, header.refcountOrder);
    view.setUint32(100, headerLength);
    out[104] = header.compressionType;
  }
  return { bytes: out, header: { ...header, headerLength, backingFileOffset, backingFileSize } };
}

/** Human names of the feature bits set in a header (for info output and error messages). */
export function describeFeatures(header: Qcow2Header): { incompatible: string[]; compatible: string[]; autoclear: string[] } {
  const pick = (value: bigint, table: Record<string, bigint>) =>
    Object.entries(table)
      .filter(([, bit]) => (value & bit) !== 0n)
      .map(([name]) => name);
  return {
    incompatible: pick(header.incompatibleFeatures, Incompatible),
    compatible: pick(header.compatibleFeatures, Compatible),
    autoclear: pick(header.autoclearFeatures, Autoclear),
  };
}
