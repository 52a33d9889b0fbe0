import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { lstat, mkdir, open, readdir, readFile, rename, rm } from 'node:fs/promises';
import { join, posix, relative } from 'node:path';
import { processStartTime, sameProcessAlive } from '../io/process.js';
import { LayerError } from './errors.js';
import { checkGuestPath, checkName, parseAppRef } from './names.js';
import type { Store } from './store.js';

/** Every file starts at a multiple of this in payload.bin, so its blocks can be cloned or mapped whole. */
export const PAYLOAD_ALIGNMENT = 4096;

export interface AppFile {
  /** Absolute guest path. */
  path: string;
  size: number;
  mode: number;
  uid: number;
  gid: number;
  sha256: string;
  /** Where the file's bytes start in payload.bin. */
  payloadOffset: number;
}

export interface AppDirectory {
  path: string;
  mode: number;
  uid: number;
  gid: number;
}

export interface AppManifest {
  format: 'qlayer-app/1';
  name: string;
  version: string;
  prefix: string;
  directories: AppDirectory[];
  files: AppFile[];
  payloadSize: number;
  createdAt: string;
}

export interface BuildAppOptions {
  name: string;
  sourceDir: string;
  version?: string;
  /** Guest folder the app's files go under; default /opt/NAME. */
  prefix?: string;
  uid?: number;
  gid?: number;
}

const alignUp = (value: number, alignment: number): number => Math.ceil(value / alignment) * alignment;

/** Walk a host folder: directories first (parents before children), then files, both sorted. */
async function walk(root: string): Promise<{ directories: string[]; files: string[] }> {
  const directories: string[] = [];
  const files: string[] = [];
  const visit = async (dir: string): Promise<void> => {
    const entries = (await readdir(dir, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : 1));
    for (const entry of entries) {
      const full = join(dir, entry.name);
      if (entry.isDirectory()) {
        directories.push(full);
        await visit(full);
      } else if (entry.isFile()) {
        files.push(full);
      } else {
        throw new LayerError('app.unsupported-file', `${full}: only regular files and folders can go into an app (this is a ${entry.isSymbolicLink() ? 'symlink' : 'special file'})`);
      }
    }
  };
  await visit(root);
  return { directories, files };
}

/**
 * Build an immutable app version in the store: manifest.json (path, size, mode, owner, sha256
 * of every file) and payload.bin (each file's bytes at a 4 KiB-aligned offset).
 * Written into a temporary folder and renamed into place, so a version is whole or absent.
 */
export async function buildApp(store: Store, options: BuildAppOptions): Promise<AppManifest> {
  const name = checkName('app', options.name);
  const prefix = checkGuestPath(options.prefix ?? `/opt/${name}`);
  const source = await lstat(options.sourceDir).catch(() => null);
  if (!source?.isDirectory()) throw new LayerError('app.no-source', `${options.sourceDir} is not a folder`);
  const uid = options.uid ?? 0;
  const gid = options.gid ?? 0;

  const { directories, files } = await walk(options.sourceDir);
  const guestPath = (hostPath: string): string => checkGuestPath(posix.join(prefix, relative(options.sourceDir, hostPath).split('\\').join('/')));

  await sweepStaging(store);
  const staging = store.path('apps', stagingName(name));
  await mkdir(staging, { recursive: true });
  try {
    const payload = await open(join(staging, 'payload.bin'), 'w');
    const manifestFiles: AppFile[] = [];
    const contentHash = createHash('sha256');
    let offset = 0;
    try {
      for (const hostPath of files) {
        const info = await lstat(hostPath);
        const hash = createHash('sha256');
        let written = 0;
        for await (const chunk of createReadStream(hostPath, { highWaterMark: 1 << 20 })) {
          const bytes = chunk as Buffer;
          hash.update(bytes);
          await payload.write(bytes, 0, bytes.length, offset + written);
          written += bytes.length;
        }
        if (written !== info.size) throw new LayerError('app.source-changed', `${hostPath} changed size while it was read`);
        const file: AppFile = {
          path: guestPath(hostPath),
          size: info.size,
          mode: info.mode & 0o7777,
          uid,
          gid,
          sha256: hash.digest('hex'),
          payloadOffset: offset,
        };
        manifestFiles.push(file);
        contentHash.update(`${file.path}\0${file.size}\0${file.mode}\0${file.sha256}\n`);
        offset = alignUp(offset + info.size, PAYLOAD_ALIGNMENT);
      }
      await payload.truncate(offset);
      await payload.sync();
    } finally {
      await payload.close();
    }

    const manifestDirectories: AppDirectory[] = [{ path: prefix, mode: 0o755, uid, gid }];
    for (const hostPath of directories) {
      const info = await lstat(hostPath);
      manifestDirectories.push({ path: guestPath(hostPath), mode: info.mode & 0o7777, uid, gid });
    }
    // Without --version, the version names the content, so rebuilding the same folder is a no-op.
    const version = checkName('app version', options.version ?? contentHash.digest('hex').slice(0, 12));
    const manifest: AppManifest = {
      format: 'qlayer-app/1',
      name,
      version,
      prefix,
      directories: manifestDirectories,
      files: manifestFiles,
      payloadSize: offset,
      createdAt: new Date().toISOString(),
    };
    const manifestHandle = await open(join(staging, 'manifest.json'), 'w');
    try {
      await manifestHandle.writeFile(`${JSON.stringify(manifest, null, 2)}\n`);
      await manifestHandle.sync();
    } finally {
      await manifestHandle.close();
    }

    const finalDir = store.path('apps', name, version);
    await mkdir(store.path('apps', name), { recursive: true });
    const existing = await readManifestAt(finalDir).catch(() => null);
    if (existing) {
      if (sameContent(existing, manifest)) {
        await rm(staging, { recursive: true, force: true });
        return existing;
      }
      throw new LayerError('app.version-exists', `app ${name}@${version} already exists with other content; versions are immutable, pick another --version`);
    }
    await rename(staging, finalDir);
    return manifest;
  } catch (error) {
    await rm(staging, { recursive: true, force: true });
    throw error;
  }
}

/**
 * A build's temporary folder: .staging-NAME-PID-STARTTIME-RANDOM. The builder's pid and start
 * time (io/process.ts) let a later build tell a dead build's leftover from a running one's,
 * even after the pid was reused.
 */
function stagingName(name: string): string {
  return `.staging-${name}-${process.pid}-${processStartTime(process.pid) ?? 'x'}-${randomBytes(4).toString('hex')}`;
}

/**
 * Remove the staging folders of builds that died (killed half-way, so their own cleanup never
 * ran). Folders of live builds are kept; so are names this cannot read. Older qlayers named
 * them .staging-NAME-PID-MILLISECONDS: only the pid can be checked for those.
 */
export async function sweepStaging(store: Store): Promise<string[]> {
  const swept: string[] = [];
  for (const entry of await readdir(store.path('apps')).catch(() => [] as string[])) {
    if (!entry.startsWith('.staging-')) continue;
    const current = /-(\d+)-(\d+|x)-[0-9a-f]{8}$/.exec(entry);
    const older = current ? null : /-(\d+)-\d{13}$/.exec(entry);
    const owner = current ? { pid: Number(current[1]), start: current[2] === 'x' ? null : current[2]! } : older ? { pid: Number(older[1]), start: null } : null;
    if (owner === null || sameProcessAlive(owner.pid, owner.start)) continue;
    await rm(store.path('apps', entry), { recursive: true, force: true });
    swept.push(entry);
  }
  return swept;
}

function sameContent(a: AppManifest, b: AppManifest): boolean {
  const key = (m: AppManifest): string => JSON.stringify([m.prefix, m.directories, m.files]);
  return key(a) === key(b);
}

async function readManifestAt(dir: string): Promise<AppManifest> {
  const manifest = JSON.parse(await readFile(join(dir, 'manifest.json'), 'utf8')) as AppManifest;
  if (manifest.format !== 'qlayer-app/1') throw new LayerError('app.bad-manifest', `${dir}/manifest.json: unknown format`);
  return manifest;
}

/** Versions of an app present in the store, oldest first. */
export async function listAppVersions(store: Store, name: string): Promise<AppManifest[]> {
  const dir = store.path('apps', checkName('app', name));
  const versions = await readdir(dir).catch(() => [] as string[]);
  const manifests = await Promise.all(versions.filter((v) => !v.startsWith('.')).map((v) => readManifestAt(join(dir, v)).catch(() => null)));
  return manifests.filter((m): m is AppManifest => m !== null).sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

/** All apps in the store, by name. */
export async function listApps(store: Store): Promise<Record<string, AppManifest[]>> {
  const names = (await readdir(store.path('apps')).catch(() => [] as string[])).filter((n) => !n.startsWith('.'));
  const result: Record<string, AppManifest[]> = {};
  for (const name of names.sort()) result[name] = await listAppVersions(store, name);
  return result;
}

/** Resolve NAME or NAME@VERSION to a manifest; without a version, the newest. */
export async function resolveApp(store: Store, ref: string): Promise<AppManifest> {
  const { name, version } = parseAppRef(ref);
  const versions = await listAppVersions(store, name);
  if (versions.length === 0) throw new LayerError('app.not-found', `no app named ${name} in the store (build it with: qlayer app build ${name} DIR)`);
  if (version === null) return versions[versions.length - 1]!;
  const match = versions.find((m) => m.version === version);
  if (!match) throw new LayerError('app.not-found', `app ${name} has no version ${version} (it has: ${versions.map((m) => m.version).join(', ')})`);
  return match;
}

export const appKey = (manifest: Pick<AppManifest, 'name' | 'version'>): string => `${manifest.name}@${manifest.version}`;

/** The payload file of an app version. */
export const payloadPath = (store: Store, manifest: Pick<AppManifest, 'name' | 'version'>): string =>
  store.path('apps', manifest.name, manifest.version, 'payload.bin');
