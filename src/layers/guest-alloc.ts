/**
 * The guest allocation helper (native/guest-alloc.c, built to native/build/qlayer-guest-alloc):
 * where it is, the manifest it reads, and the one line it prints. It makes every placeholder of
 * an assign in one guest process, with fallocate(2); allocate.ts decides when to use it.
 */
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { AppManifest } from './app.js';
import { LayerError } from './errors.js';

/** The first field of every manifest; the helper refuses any other (exit GUEST_EXIT.badInput). */
export const HELPER_FORMAT = 'qlayer-guest-alloc/1';

/** What the helper (or the fallback script, which prints the same line) reports. */
export interface AllocationCounts {
  files: number;
  /** New files given their size by fallocate: unwritten extents, no data written. */
  fallocated: number;
  /** New files filled with written zeros. */
  zeroFilled: number;
  /** New empty files (neither method applies). */
  empty: number;
  /** Files already there at the right size (an interrupted assign's), left as they were. */
  kept: number;
  dirs: number;
  /** Programs the fallback script ran (it counts them); the helper's line has none. */
  processes?: number;
}

/**
 * The helper binary, or null when it was not built or QLAYER_NO_GUEST_HELPER=1. Found from
 * src/layers (tests, tsx) or dist/src/layers (the build): native/ sits at the package root.
 */
export function guestHelperPath(): string | null {
  if (process.env.QLAYER_NO_GUEST_HELPER === '1') return null;
  const here = dirname(fileURLToPath(import.meta.url));
  for (const up of [join(here, '..', '..'), join(here, '..', '..', '..')]) {
    const path = join(up, 'native', 'build', 'qlayer-guest-alloc');
    if (existsSync(path)) return path;
  }
  return null;
}

/** Fields as the helper reads them: each NUL-ended. */
function encodeFields(fields: string[]): Buffer {
  for (const field of fields) {
    // A NUL would shift every later field; app paths come from a host folder walk, which has none.
    if (field.includes('\0')) throw new LayerError('allocate.bad-path', `guest path ${JSON.stringify(field)} holds a NUL byte`);
  }
  return Buffer.from(`${fields.join('\0')}\0`, 'utf8');
}

const BLOCK = 4096;

/**
 * Bytes the guest filesystem must have free before an assign starts: every file's blocks, a
 * block per file and folder for inodes, directories and extent blocks, and a margin of 2 % (at
 * least 16 MiB) so that the guest is not left full.
 */
export function spaceNeeded(manifests: AppManifest[]): number {
  let need = 0;
  for (const manifest of manifests) {
    for (const file of manifest.files) need += Math.ceil(file.size / BLOCK) * BLOCK + BLOCK;
    need += manifest.directories.length * BLOCK;
  }
  return need + Math.max(16 << 20, Math.ceil(need / 50));
}

/**
 * The helper's stdin: NUL-ended fields, so a path may hold any byte but NUL (the format is
 * described in native/guest-alloc.c). Folders before files, app by app, as the script does.
 */
export function helperManifest(manifests: AppManifest[], placeholders: 'auto' | 'zeros'): Buffer {
  const fields: string[] = [HELPER_FORMAT];
  if (placeholders === 'zeros') fields.push('Z');
  const mode = (m: number): string => (m & 0o7777).toString(8);
  for (const manifest of manifests) {
    for (const d of manifest.directories) fields.push('d', d.path, mode(d.mode), String(d.uid), String(d.gid));
    for (const f of manifest.files) fields.push('f', f.path, String(f.size), mode(f.mode), String(f.uid), String(f.gid));
  }
  return encodeFields(fields);
}

/** Paths the guest got (or lost) in one run of the helper. */
export interface GuestPaths {
  files: Array<{ path: string; size: number }>;
  dirs: string[];
}

/**
 * The helper's stdin for a rollback: files first (only untouched placeholders are deleted),
 * then folders deepest first (only empty ones are removed).
 */
export function rollbackManifest(paths: GuestPaths): Buffer {
  const fields: string[] = [HELPER_FORMAT];
  for (const f of paths.files) fields.push('r', f.path, String(f.size));
  for (const d of [...paths.dirs].sort((a, b) => b.split('/').length - a.split('/').length)) fields.push('R', d);
  return encodeFields(fields);
}

/** The helper's NUL-ended records ("created"|"removed"|"left"|"missing", "d"|"f", PATH) by verb. */
export function parseHelperRecords(stdout: string): Map<string, { files: string[]; dirs: string[] }> {
  const records = new Map<string, { files: string[]; dirs: string[] }>();
  const fields = stdout.split('\0');
  // Every record is three fields; the summary line follows the last one.
  for (let i = 0; i + 2 < fields.length; i += 3) {
    const [verb, kind, path] = [fields[i]!, fields[i + 1]!, fields[i + 2]!];
    if (!/^(created|removed|left|missing)$/.test(verb) || (kind !== 'd' && kind !== 'f')) break;
    const entry = records.get(verb) ?? { files: [], dirs: [] };
    (kind === 'f' ? entry.files : entry.dirs).push(path);
    records.set(verb, entry);
  }
  return records;
}

/** The counts in the last `allocated files=N ...` line of this output, or null if there is none. */
export function parseAllocatedLine(stdout: string): AllocationCounts | null {
  const match = /allocated files=(\d+) fallocate=(\d+) zeros=(\d+) empty=(\d+) kept=(\d+) dirs=(\d+)(?: processes=(\d+))?\s*$/.exec(stdout);
  if (!match) return null;
  const [files, fallocated, zeroFilled, empty, kept, dirs] = match.slice(1, 7).map(Number) as [number, number, number, number, number, number];
  const counts: AllocationCounts = { files, fallocated, zeroFilled, empty, kept, dirs };
  if (match[7] !== undefined) counts.processes = Number(match[7]);
  return counts;
}
