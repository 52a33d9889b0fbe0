/**
 * A backing chain opened from its top image: every layer opened (shared layers read-only),
 * each qcow2 layer's unallocated reads wired to the layer below, and the whole exposed as one
 * ByteSource. Every backing and data file is resolved, confined and opened by one
 * NamedFilePolicy (src/qcow2/named-files.ts); formats are never probed.
 */
import { stat } from 'node:fs/promises';
import type { ByteSource } from '../io/byte-source.js';
import { nodeFileSystem, type FileSystemAccess, type HostFile } from '../io/host-file.js';
import { ChainError, Qcow2Error } from '../qcow2/errors.js';
import { Qcow2Image } from '../qcow2/image.js';
import { NamedFilePolicy } from '../qcow2/named-files.js';

export type LayerFormat = 'qcow2' | 'raw';

export interface ChainLayer {
  /** Path as resolved from the referring image (or as given for the top). */
  path: string;
  /** Real path (symlinks resolved). */
  realPath: string;
  format: LayerFormat;
  /** The qcow2 image; null for a raw layer. */
  image: Qcow2Image | null;
  /** This layer seen as a disk, including everything below it. */
  source: ByteSource;
  /** Virtual size of this layer (raw: file length). */
  size: number;
  /** 0 for the top, increasing downwards. */
  depth: number;
}

export interface OpenChainOptions {
  /**
   * Folders whose files the chain may name, besides the top image's own folder tree: every
   * backing and external data file must be inside one of these (after realpath).
   */
  allowedDirectories?: readonly string[];
  /** Most layers in the chain, top included (default 16). */
  maxDepth?: number;
  /** Open the top image writable (default false). Lower layers are always read-only. */
  writableTop?: boolean;
  fs?: FileSystemAccess;
  /** Format of the top file (default qcow2). */
  topFormat?: LayerFormat;
  /** Used only when an image names a backing file without the backing format extension. */
  assumeBackingFormat?: LayerFormat;
}

class RawLayerSource implements ByteSource {
  constructor(
    private readonly file: HostFile,
    readonly size: number,
  ) {}
  async readAt(into: Uint8Array, offset: number): Promise<void> {
    const inside = Math.max(0, Math.min(into.length, this.size - offset));
    if (inside < into.length) into.fill(0, inside);
    if (inside > 0) await this.file.read(into.subarray(0, inside), offset);
  }
}

export class Chain implements ByteSource {
  constructor(
    /** Top first. */
    readonly layers: ChainLayer[],
    private readonly rawFiles: HostFile[],
  ) {}

  get top(): ChainLayer {
    return this.layers[0]!;
  }
  /** The top image (throws if the top is raw). */
  get topImage(): Qcow2Image {
    const image = this.top.image;
    if (!image) throw new Qcow2Error('qcow2.bad-argument', `${this.top.path} is a raw file, not a qcow2 image`);
    return image;
  }
  get size(): number {
    return this.top.size;
  }
  readAt(into: Uint8Array, offset: number): Promise<void> {
    return this.top.source.readAt(into, offset);
  }
  async close(): Promise<void> {
    const errors: unknown[] = [];
    for (const layer of this.layers) {
      try {
        await layer.image?.close();
      } catch (error) {
        errors.push(error);
      }
    }
    for (const file of this.rawFiles) await file.close().catch((error: unknown) => errors.push(error));
    if (errors.length) throw errors[0];
  }
}

function normalizeFormat(format: string, referrer: string): LayerFormat {
  if (format === 'qcow2' || format === 'raw') return format;
  throw new ChainError('chain.unsupported-format', `${referrer}: backing format "${format}" is not supported (only qcow2 and raw)`);
}

export async function openChain(topPath: string, options: OpenChainOptions = {}): Promise<Chain> {
  const fs = options.fs ?? nodeFileSystem;
  const maxDepth = options.maxDepth ?? 16;
  const writableTop = options.writableTop ?? false;
  const policy = await NamedFilePolicy.forImage(topPath, { allowedDirectories: options.allowedDirectories, fs });
  const layers: ChainLayer[] = [];
  const rawFiles: HostFile[] = [];
  const seen = new Set<string>();
  const chain = new Chain(layers, rawFiles);
  // The file opened for the next layer and not yet owned by one (closed if anything fails).
  let pending: HostFile | null = null;
  try {
    let path = topPath;
    let format: LayerFormat = options.topFormat ?? 'qcow2';
    // The top is opened as the user named it; every file below it by the policy, once each.
    const top = await policy.openTop(topPath, writableTop ? 'write' : 'read');
    pending = top.file;
    let realPath = top.realPath;
    for (let depth = 0; ; depth++) {
      if (depth >= maxDepth) throw new ChainError('chain.too-deep', `${topPath}: backing chain is deeper than ${maxDepth} layers`);
      const info = await stat(realPath);
      const identity = `${info.dev}:${info.ino}`;
      if (seen.has(identity)) throw new ChainError('chain.loop', `${topPath}: backing chain loops back to ${realPath}`);
      seen.add(identity);
      const writable = depth === 0 && writableTop;
      const file: HostFile = pending!;
      pending = null;
      if (format === 'raw') {
        rawFiles.push(file);
        const size = await file.length();
        layers.push({ path, realPath, format, image: null, source: new RawLayerSource(file, size), size, depth });
        break;
      }
      const image = await Qcow2Image.open(path, { fs, writable, namedFiles: policy, opened: file });
      layers.push({ path, realPath, format, image, source: image, size: image.size, depth });
      const backingName = image.backingFile;
      if (backingName === null) break;
      const stored = image.backingFormat;
      if (stored === null && options.assumeBackingFormat === undefined) {
        throw new ChainError('chain.missing-backing-format', `${path}: backing file "${backingName}" has no backing format recorded; formats are never probed (pass assumeBackingFormat, or rebase with an explicit format)`);
      }
      format = normalizeFormat(stored ?? options.assumeBackingFormat!, path);
      const next = await policy.open(backingName, path, 'backing file', 'read');
      pending = next.file;
      path = next.path;
      realPath = next.realPath;
    }
    // Wire each qcow2 layer's unallocated reads to the layer below.
    for (let i = 0; i + 1 < layers.length; i++) {
      const image = layers[i]!.image;
      if (image) image.backing = layers[i + 1]!.source;
    }
    return chain;
  } catch (error) {
    await pending?.close().catch(() => undefined);
    await chain.close().catch(() => undefined);
    throw error;
  }
}
