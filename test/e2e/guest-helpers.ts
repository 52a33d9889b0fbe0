/**
 * What the e2e tests share. Offline oracles: what e2fsprogs and qemu-img say about an image after
 * a guest ran on it. Everything reads a raw export (`qemu-img convert -O raw`), never the qcow2
 * file directly, so the tools see exactly the virtual disk QEMU presented to the guest. And the
 * set-up the tests have in common: app source folders, the Debian guests' runtime, the CLI killed
 * at a step.
 */
import { spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, truncate, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { execa } from 'execa';
import { qemuImg } from '../helpers/qemu.js';
import { LibvirtConnection } from '../../src/virt/libvirt.js';
import { buildApp, type AppManifest } from '../../src/layers/app.js';
import type { Store } from '../../src/layers/store.js';
import { runGuestScript, shellQuote, type GuestShell } from '../../src/layers/guest-script.js';
import { createImage } from '../../src/qcow2/create.js';
import { bootGuest, type RunningGuest } from '../../src/virt/boot.js';
import type { DebianFixture, Fixture } from '../../src/virt/fixture.js';
import { testGuestRuntime, type LibvirtDesktopRuntime } from '../../src/virt/desktop-runtime.js';

/** How long a Debian guest gets to shut down cleanly before it is forced off. */
export const DEBIAN_SHUTDOWN_TIMEOUT_MS = 120_000;

/** A duration for the timings the Debian tests log: "12.3 s". */
export const seconds = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;

/**
 * The runtime the Debian e2e tests boot their guests with: the guest's own bootloader (BIOS or
 * UEFI) under TCG, 1 GiB, and timeouts for a guest that takes 30-80 s to boot on a loaded 2-core
 * machine.
 */
export function debianRuntime(logDir: string, firmware: 'bios' | 'uefi' = 'bios'): LibvirtDesktopRuntime {
  return testGuestRuntime({
    logDir,
    mode: 'firmware',
    firmware,
    accel: 'tcg',
    memoryMiB: 1024,
    bootTimeoutMs: 400_000,
    agentTimeoutMs: 300_000,
    shutdownTimeoutMs: DEBIAN_SHUTDOWN_TIMEOUT_MS,
  });
}

/**
 * One file of a test app's source folder: its bytes, or `content` with a `mode` (writeFile's, so
 * the umask applies as it does to the rest) and/or a `size` it is extended to with a sparse tail
 * of zeros (a large file that is quick to write and hash).
 */
export type AppSourceFile = string | Buffer | { content: string | Buffer; mode?: number; size?: number };

/**
 * Write an app's source folder at `source` (paths relative to it; folders made as needed, with
 * the default mode) and build it into the store as name@version (version 1 unless given), under
 * the store lock. Returns the app's manifest.
 */
export async function buildTestApp(
  store: Store,
  source: string,
  app: { name: string; version?: string; prefix?: string; files: Record<string, AppSourceFile> },
): Promise<AppManifest> {
  for (const [path, file] of Object.entries(app.files)) {
    const target = join(source, path);
    const { content, mode, size } = typeof file === 'string' || Buffer.isBuffer(file) ? { content: file } : file;
    await mkdir(dirname(target), { recursive: true });
    await writeFile(target, content, mode === undefined ? {} : { mode });
    if (size !== undefined) await truncate(target, size);
  }
  const { name, version = '1', prefix } = app;
  return store.withLock(() => buildApp(store, { name, sourceDir: source, version, ...(prefix ? { prefix } : {}) }));
}

/**
 * The files of the 'tools' app the Debian tests assign: bin/tool, a script that prints `says`,
 * padded with `padding` random bytes after its exit (so that it spans clusters); share/tool/data.bin,
 * `dataBytes` random bytes; and share/tool/README if `readme` is given.
 */
export function debianToolFiles(app: { says: string; padding: number; dataBytes: number; readme?: string }): Record<string, AppSourceFile> {
  return {
    'bin/tool': { content: Buffer.concat([Buffer.from(`#!/bin/sh\necho "${app.says}"\nexit 0\n`), randomBytes(app.padding)]), mode: 0o755 },
    'share/tool/data.bin': { content: randomBytes(app.dataBytes), mode: 0o644 },
    ...(app.readme === undefined ? {} : { 'share/tool/README': { content: app.readme, mode: 0o644 } }),
  };
}

/** This checkout's CLI (it runs dist/: npm run build first). */
export const QLAYER_CLI = join(process.cwd(), 'bin', 'qlayer.js');

/** Run the CLI on `store` until a step line starting with `step` appears on stderr, then SIGKILL it. */
export async function killCliAt(store: string, args: string[], step: string): Promise<{ killed: boolean; stderr: string }> {
  const child = spawn(process.execPath, [QLAYER_CLI, ...args, '--store', store], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  let killed = false;
  child.stderr.on('data', (d: Buffer) => {
    stderr += d.toString();
    if (!killed && stderr.split('\n').some((line) => line.replace(/^• /, '').startsWith(step))) killed = child.kill('SIGKILL');
  });
  await new Promise((done) => child.on('close', done));
  return { killed, stderr };
}

/**
 * The root partition of a Debian desktop's chain (top layer `top`) as a raw file at `out`, for
 * e2fsck and debugfs, which take no offset.
 */
export async function rootPartitionRaw(fixture: DebianFixture, top: string, out: string): Promise<string> {
  const offset = fixture.image.filesystemOffset;
  const { size } = (fixture.manifest as { image: { filesystem: { size: number } } }).image.filesystem;
  await qemuImg(['convert', '-O', 'raw', '--image-opts', `driver=raw,offset=${offset},size=${size},file.driver=qcow2,file.file.filename=${top}`, out]);
  return out;
}

/**
 * Write `text` to notes.txt in the Debian guest's ordinary user's home, as that user, and sync.
 * Returns the file, the text's sha256 and the file's owner as the guest's stat gives it (uid:name).
 */
export async function writeAsUser(shell: GuestShell, user: DebianFixture['user'], text: string): Promise<{ file: string; sha256: string; owner: string }> {
  const file = `${user.home}/notes.txt`;
  const owner = await runGuestScript(
    shell,
    `runuser -u ${user.name} -- sh -c ${shellQuote(`printf %s ${shellQuote(text)} > ${file}`)} && sync && stat -c %u:%U ${file}\n`,
    'user write',
  );
  return { file, sha256: createHash('sha256').update(text).digest('hex'), owner: owner.trim() };
}

export async function fileSha256(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/** Export the chain whose top is `image` as a raw file at `out` (for e2fsprogs). */
export async function rawExport(image: string, out: string): Promise<string> {
  await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', image, out]);
  return out;
}

/** dumpe2fs -h of a raw filesystem image: features, state, and whether the journal needs recovery. */
export async function superblock(raw: string): Promise<{ clean: boolean; needsRecovery: boolean; text: string }> {
  const result = await execa('dumpe2fs', ['-h', raw], { reject: false });
  const text = result.stdout;
  const features = /^Filesystem features:\s*(.*)$/m.exec(text)?.[1] ?? '';
  const state = /^Filesystem state:\s*(.*)$/m.exec(text)?.[1] ?? '';
  return { clean: state.trim() === 'clean', needsRecovery: /\bneeds_recovery\b/.test(features), text };
}

/** e2fsck -fn: exit 0 means no problem found (read-only, changes nothing). */
export async function fsckClean(raw: string): Promise<{ ok: boolean; output: string }> {
  const result = await execa('e2fsck', ['-fn', raw], { reject: false });
  return { ok: result.exitCode === 0, output: `${result.stdout}\n${result.stderr}` };
}

/** The content of a file in a raw ext4 image, read by debugfs (independent of the guest). */
export async function debugfsCat(raw: string, path: string): Promise<Buffer> {
  const result = await execa('debugfs', ['-R', `cat ${path}`, raw], { encoding: 'buffer', reject: false, stripFinalNewline: false });
  if (result.exitCode !== 0) throw new Error(`debugfs cat ${path}: ${Buffer.from(result.stderr).toString()}`);
  return Buffer.from(result.stdout);
}

/** The 4 KiB block numbers of a file's data, from debugfs `blocks`. */
export async function debugfsBlocks(raw: string, path: string): Promise<number[]> {
  const result = await execa('debugfs', ['-R', `blocks ${path}`, raw], { reject: false });
  if (result.exitCode !== 0 || /not found/i.test(result.stderr)) throw new Error(`debugfs blocks ${path}: ${result.stderr}`);
  return result.stdout.trim().split(/\s+/).filter(Boolean).map(Number);
}

export interface MapRange {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
}

/** qemu-img map --output=json: which layer of the chain (depth 0 = top) provides each range. */
export async function qemuMap(image: string): Promise<MapRange[]> {
  const result = await qemuImg(['map', '--output=json', '-f', 'qcow2', image]);
  return JSON.parse(result.stdout) as MapRange[];
}

/** The depth that provides the byte at `offset`, per the map. */
export function depthAt(map: MapRange[], offset: number): MapRange | undefined {
  return map.find((r) => offset >= r.start && offset < r.start + r.length);
}

/** Names of qlayer domains libvirt knows right now. */
export async function qlayerDomains(uri = 'qemu:///system'): Promise<string[]> {
  const connection = await LibvirtConnection.open(uri);
  try {
    return (await connection.listQlayerDomains()).map((d) => d.name);
  } finally {
    await connection.close();
  }
}

export function scratch(dir: string, name: string): string {
  return join(dir, name);
}

/**
 * Boot the test guest (TCG) on a fresh overlay made by our engine in `dir`, and return once its
 * agent answers. The caller stops it.
 */
export async function bootFixtureOverlay(fixture: Fixture, dir: string, name: string): Promise<{ guest: RunningGuest; overlay: string }> {
  const overlay = join(dir, 'user.qcow2');
  await createImage({ path: overlay, backing: { path: fixture.images.base.path, format: 'qcow2' } });
  const guest = await bootGuest({
    name,
    disk: overlay,
    kernel: fixture.kernel,
    initrd: fixture.initrd,
    cmdline: fixture.cmdline,
    accel: 'tcg',
    until: fixture.readyMarker,
    waitForAgent: true,
    serialLog: join(dir, 'serial.log'),
  });
  return { guest, overlay };
}
