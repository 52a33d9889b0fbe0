/**
 * Building real ext2/3/4 images with e2fsprogs for the reader's tests, and asking debugfs (the
 * oracle) what it sees: extent lists (stat), file contents (dump), directory listings (ls -p).
 */
import { execa } from 'execa';
import { mkdir, readFile, writeFile, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { openGuestFilesystem, type GuestFilesystem, type OpenGuestFilesystemOptions } from '../../src/fs/index.js';
import { nodeFileSystem, rawFileSource, type HostFile } from '../../src/io/host-file.js';

export interface MkfsOptions {
  /** Size of the raw image in bytes. */
  size: number;
  blockSize: 1024 | 2048 | 4096 | 8192 | 65536;
  type?: 'ext2' | 'ext3' | 'ext4';
  /** -O feature list, e.g. ['^has_journal', '64bit']. */
  features?: string[];
  /** Extra mke2fs arguments (e.g. ['-I', '256']). */
  extra?: string[];
  /** Folder to copy in with -d. */
  from?: string;
  /** Byte offset inside the image (for partitioned images: E2FSPROGS offset= syntax). */
  offset?: number;
  /** Filesystem size in bytes when it does not fill the image from offset. */
  fsBytes?: number;
}

export async function mkfs(image: string, options: MkfsOptions): Promise<void> {
  await writeFile(image, '', { flag: 'a' });
  await truncate(image, options.size);
  const args = ['-q', '-F', '-t', options.type ?? 'ext4', '-b', String(options.blockSize)];
  // mke2fs would take defaults from /etc/mke2fs.conf; pinning the UUID and hash seed keeps runs alike.
  args.push('-U', 'c0ffee00-1234-4321-8888-0123456789ab', '-E', `hash_seed=c0ffee00-1234-4321-8888-0123456789ab${options.offset ? `,offset=${options.offset}` : ''}`);
  if (options.features?.length) args.push('-O', options.features.join(','));
  if (options.from) args.push('-d', options.from);
  args.push(...(options.extra ?? []), image);
  if (options.fsBytes) args.push(`${Math.floor(options.fsBytes / 1024)}k`);
  await execa('mke2fs', args, { env: { MKE2FS_DEVICE_SECTSIZE: '512', E2FSPROGS_FAKE_TIME: '1700000000' } });
}

/** Run debugfs with a list of commands (one process, a command file on stdin). */
export async function debugfs(image: string, commands: string[], write = false): Promise<string> {
  const result = await execa('debugfs', [...(write ? ['-w'] : []), '-f', '-', image], {
    input: `${commands.join('\n')}\n`,
    reject: false,
  });
  if (result.exitCode !== 0) throw new Error(`debugfs failed: ${result.stderr}`);
  return result.stdout;
}

export async function debugfsOne(image: string, command: string): Promise<string> {
  const result = await execa('debugfs', ['-R', command, image], { reject: false });
  if (result.exitCode !== 0) throw new Error(`debugfs -R '${command}' failed: ${result.stderr}`);
  return result.stdout;
}

export interface OracleExtent {
  fileOffset: number;
  diskOffset: number;
  length: number;
  unwritten: boolean;
}

/**
 * Data extents of `path` from debugfs `stat` (EXTENTS: or BLOCKS: section), in bytes, with
 * metadata entries ((IND), (DIND), (TIND), (ETBn)) left out and adjacent ranges merged.
 */
export async function oracleExtents(image: string, path: string, blockSize: number, partitionOffset = 0): Promise<OracleExtent[]> {
  const out = await debugfsOne(image, `stat "${path}"`);
  const at = out.search(/^(EXTENTS|BLOCKS):/m);
  if (at < 0) return [];
  const text = out.slice(at).replace(/^(EXTENTS|BLOCKS):/, '');
  const extents: OracleExtent[] = [];
  const re = /\((\d+)(?:-(\d+))?(\[u\])?\):(\d+)(?:-(\d+))?/g;
  for (const m of text.matchAll(re)) {
    const first = Number(m[1]);
    const last = m[2] ? Number(m[2]) : first;
    const physical = Number(m[4]);
    const count = last - first + 1;
    const e: OracleExtent = {
      fileOffset: first * blockSize,
      diskOffset: partitionOffset + physical * blockSize,
      length: count * blockSize,
      unwritten: m[3] !== undefined,
    };
    const prev = extents[extents.length - 1];
    if (prev && prev.unwritten === e.unwritten && prev.fileOffset + prev.length === e.fileOffset && prev.diskOffset + prev.length === e.diskOffset) {
      prev.length += e.length;
    } else {
      extents.push(e);
    }
  }
  return extents;
}

/**
 * File bytes as debugfs dumps them, cut to the i_size debugfs reports: debugfs 1.47.0 dumps
 * all 60 bytes of i_block for an empty inline-data file.
 */
export async function oracleDump(image: string, path: string, scratch: string): Promise<Buffer> {
  const out = join(scratch, `dump-${Math.random().toString(36).slice(2)}`);
  await debugfsOne(image, `dump "${path}" ${out}`);
  const size = /Size: (\d+)/.exec(await debugfsOne(image, `stat "${path}"`));
  const data = await readFile(out);
  return size ? data.subarray(0, Number(size[1])) : data;
}

export interface OracleDirEntry {
  name: string;
  inode: number;
}

/** Directory entries as `debugfs ls -p` lists them (names with "/" or newlines are not used in tests). */
export async function oracleLs(image: string, path: string): Promise<OracleDirEntry[]> {
  const out = await debugfsOne(image, `ls -p "${path}"`);
  const entries: OracleDirEntry[] = [];
  for (const line of out.split('\n')) {
    const m = /^\/(\d+)\/(\d+)\/(\d+)\/(\d+)\/(.*)\/(\d*)\/$/.exec(line);
    // ls -p also prints the empty records of unused blocks (inode 0): not entries.
    if (m && m[1] !== '0') entries.push({ inode: Number(m[1]), name: m[5]! });
  }
  return entries;
}

const opened: HostFile[] = [];

/** Open a raw image's filesystem; the file stays open until closeOpened(). */
export async function openRaw(image: string, options: OpenGuestFilesystemOptions = {}): Promise<GuestFilesystem> {
  const file = await nodeFileSystem.open(image, 'read');
  opened.push(file);
  return openGuestFilesystem(await rawFileSource(file), options);
}

/** Close every file openRaw opened (call from afterAll). */
export async function closeOpened(): Promise<void> {
  for (const file of opened.splice(0)) await file.close();
}

/** Deterministic bytes (fast, seedable): xorshift32 stream. */
export function patternBytes(length: number, seed: number): Buffer {
  const out = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i + 4 <= length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out.writeUInt32LE(x, i);
  }
  for (let i = length - (length % 4); i < length; i += 1) out[i] = i & 0xff;
  return out;
}

export async function makeTree(root: string, files: Record<string, Buffer | string | { symlink: string } | { sparse: number; writes: Array<[number, Buffer]> }>): Promise<void> {
  const { symlink, open } = await import('node:fs/promises');
  const entries = Object.entries(files);
  for (const folder of new Set(entries.map(([path]) => join(root, path, '..')))) await mkdir(folder, { recursive: true });
  // Files in small parallel batches: trees of 10,000 files are built in seconds.
  for (let i = 0; i < entries.length; i += 64) await Promise.all(entries.slice(i, i + 64).map(([path, content]) => makeEntry(join(root, path), content)));
  async function makeEntry(full: string, content: Buffer | string | { symlink: string } | { sparse: number; writes: Array<[number, Buffer]> }): Promise<void> {
    if (typeof content === 'string' || Buffer.isBuffer(content)) {
      await writeFile(full, content);
    } else if ('symlink' in content) {
      await symlink(content.symlink, full);
    } else {
      const handle = await open(full, 'w');
      await handle.truncate(content.sparse);
      for (const [offset, data] of content.writes) await handle.write(data, 0, data.length, offset);
      await handle.close();
    }
  }
}
