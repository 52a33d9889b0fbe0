import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { AppManifest } from './app.js';
import { LayerError } from './errors.js';
import { guestHelperPath, helperManifest, parseAllocatedLine, parseHelperRecords, rollbackManifest, spaceNeeded, type AllocationCounts, type GuestPaths } from './guest-alloc.js';
import { GUEST_EXIT, checkGuestResult, runGuestScript, shellQuote, type GuestShell } from './guest-script.js';

const octal = (mode: number): string => (mode & 0o7777).toString(8).padStart(4, '0');

const MIB = 1 << 20;

/** Argument bytes per grouped chmod/chown/mkdir: far under Linux's 2 MiB total and 128 KiB per argument. */
const ARGS_BUDGET = 64 * 1024;

/**
 * Lines that create `quotedPath` holding exactly `size` zero bytes, written for real: whole MiBs
 * with dd (7x faster than head -c in a TCG guest: 0.9 s against 6.4 s for 100 MB), the rest
 * appended with head -c. Each adds the programs it runs to the script's `procs` count.
 */
function zeroFill(quotedPath: string, size: number): string[] {
  const whole = Math.floor(size / MIB);
  const rest = size % MIB;
  const lines: string[] = [];
  if (whole > 0) lines.push(`  dd if=/dev/zero of=${quotedPath} bs=${MIB} count=${whole} 2>/dev/null`);
  if (rest > 0) lines.push(`  head -c ${rest} /dev/zero ${whole > 0 ? '>>' : '>'} ${quotedPath}`);
  if (lines.length === 0) return [`  : > ${quotedPath}`, '  empty=$((empty+1))'];
  return [...lines, `  zeros=$((zeros+1)) procs=$((procs+${lines.length}))`];
}

/** `command -- fixed path...` lines, as few as fit the argument budget. */
function grouped(command: string, paths: string[]): string[] {
  const lines: string[] = [];
  let current: string[] = [];
  let bytes = 0;
  for (const path of paths) {
    const q = shellQuote(path);
    if (current.length > 0 && bytes + q.length + 1 > ARGS_BUDGET) {
      lines.push(`${command} ${current.join(' ')}`, 'procs=$((procs+1))');
      current = [];
      bytes = 0;
    }
    current.push(q);
    bytes += q.length + 1;
  }
  if (current.length > 0) lines.push(`${command} ${current.join(' ')}`, 'procs=$((procs+1))');
  return lines;
}

/** Paths grouped by a key, in first-seen order (Map keeps insertion order). */
function groupBy<T>(items: T[], key: (item: T) => string, path: (item: T) => string): Map<string, string[]> {
  const groups = new Map<string, string[]>();
  for (const item of items) {
    const k = key(item);
    const list = groups.get(k) ?? [];
    list.push(path(item));
    groups.set(k, list);
  }
  return groups;
}

/**
 * The fallback when the helper cannot run: a guest-side script that allocates the placeholders
 * with written zeros (dd and head -c from /dev/zero). Folders are checked, then made with grouped
 * mkdir -p; each file is refused if something else holds its path, kept if it is a regular file
 * of the right size (a placeholder left by an interrupted assign; locate re-checks it), else
 * zero-filled; then owners and modes are set with one chown per uid:gid and one chmod per mode
 * (chunked), owners first because chown clears set-user/group-ID bits; then sync. The script
 * counts the programs it starts and prints the helper's summary line. Only POSIX sh, dd, head,
 * mkdir, chmod, chown, wc and sync: busybox and full desktops alike.
 */
export function allocationScript(manifests: AppManifest[]): string {
  const lines = ['set -e', `refuse() { echo "$1" >&2; exit ${GUEST_EXIT.exists}; }`, 'files=0 zeros=0 empty=0 kept=0 procs=1'];
  const dirs = manifests.flatMap((m) => m.directories);
  const files = manifests.flatMap((m) => m.files);
  for (const dir of dirs) {
    const q = shellQuote(dir.path);
    lines.push(`if [ -L ${q} ] || { [ -e ${q} ] && [ ! -d ${q} ]; }; then refuse ${shellQuote(`${dir.path} (not a folder)`)}; fi`);
  }
  lines.push(...grouped('mkdir -p --', dirs.map((d) => d.path)));
  for (const file of files) {
    const q = shellQuote(file.path);
    lines.push(
      'files=$((files+1))',
      `if [ -e ${q} ] || [ -L ${q} ]; then`,
      `  if [ -f ${q} ] && [ ! -L ${q} ] && [ "$(wc -c < ${q})" -eq ${file.size} ]; then kept=$((kept+1)) procs=$((procs+1)); else refuse ${shellQuote(file.path)}; fi`,
      `else`,
      ...zeroFill(q, file.size),
      `fi`,
    );
  }
  const all = [...dirs, ...files];
  for (const [owner, paths] of groupBy(all, (e) => `${e.uid}:${e.gid}`, (e) => e.path)) lines.push(...grouped(`chown -- ${owner}`, paths));
  for (const [mode, paths] of groupBy(all, (e) => octal(e.mode), (e) => e.path)) lines.push(...grouped(`chmod -- ${mode}`, paths));
  lines.push('sync', `echo "allocated files=$files fallocate=0 zeros=$zeros empty=$empty kept=$kept dirs=${dirs.length} processes=$((procs+1))"`);
  return `${lines.join('\n')}\n`;
}

/** The guest-side script that deletes an app's files and its now-empty folders, then syncs. */
export function removalScript(manifests: AppManifest[]): string {
  const lines = ['set -e'];
  for (const manifest of manifests) {
    // A file the user deleted already is reported, not an error: the unassign still completes.
    for (const file of manifest.files) {
      const q = shellQuote(file.path);
      lines.push(`if [ -e ${q} ] || [ -L ${q} ]; then rm -f -- ${q}; else printf 'gone %s\\n' ${q}; fi`);
    }
    // Deepest folders first; a folder the user put files into stays.
    const dirs = [...manifest.directories].sort((a, b) => b.path.split('/').length - a.path.split('/').length);
    for (const dir of dirs) lines.push(`rmdir -- ${shellQuote(dir.path)} 2>/dev/null || true`);
    for (const file of manifest.files) {
      lines.push(`if [ -e ${shellQuote(file.path)} ]; then echo ${shellQuote(`${file.path} is still present`)} >&2; exit ${GUEST_EXIT.stillPresent}; fi`);
    }
  }
  lines.push('sync', 'echo removed');
  return `${lines.join('\n')}\n`;
}

export interface AllocateOptions {
  /** 'auto': fallocate where the guest filesystem can (unwritten extents); 'zeros': always written zeros. */
  placeholders?: 'auto' | 'zeros';
  timeoutMs?: number;
  /** The helper binary; default guestHelperPath(). null: use the script. */
  helper?: string | null;
}

export interface AllocationResult extends AllocationCounts {
  method: 'helper' | 'script';
  /** What the guest got from this run (the helper reports it; null from the script, which does not). */
  created: GuestPaths | null;
  /** Programs started in the guest (the helper's wrapper: sh, chmod, helper, rm). */
  processes: number;
  /** Why the helper did not run, when the script did the work. */
  helperSkipped?: string;
}

/**
 * Runs the uploaded helper ($1) and removes it whatever happens, in one guest-exec. The helper is
 * built for the host's machine ($2): a guest of another (uname -m) exits 127 without running
 * it, since a busybox sh would run a binary it cannot exec as a shell script. Otherwise the
 * exit code is the helper's, or the shell's 126/127 when it cannot run (a noexec mount).
 */
export const HELPER_WRAPPER = 'm=$(uname -m); if [ "$m" = "$2" ]; then chmod 700 "$1" && "$1"; rc=$?; else echo "guest machine $m, helper built for $2" >&2; rc=127; fi; rm -f "$1"; exit $rc';
/** sh, uname, chmod, the helper, rm. */
const HELPER_PROCESSES = 5;
/** The helper's machine as uname -m names it: the host's, since build-native compiles it here. */
const HELPER_MACHINE: string = ({ x64: 'x86_64', arm64: 'aarch64', ia32: 'i686', riscv64: 'riscv64', s390x: 's390x', ppc64: 'ppc64le' } as Record<string, string>)[process.arch] ?? process.arch;
const HELPER_TAG = 'qlayer-guest-alloc: ';

/**
 * Folders the helper is uploaded to and run from, in order. /run is a tmpfs on every system
 * (nothing reaches the guest's disk), but systemd mounts it noexec; Debian's /tmp is on the root
 * disk and allows exec; /var/tmp is a last resort. The wrapper deletes the upload either way.
 */
const HELPER_FOLDERS = ['/run', '/tmp', '/var/tmp'];

/**
 * Upload the helper and run it once with `input`, trying the next folder where the upload fails
 * or the folder does not allow running programs (exit 126). Returns the run's result, or why it
 * could not run anywhere.
 */
async function runHelper(guest: GuestShell, helper: string, input: Buffer, timeoutMs: number | undefined): Promise<{ exitCode: number; stdout: string; stderr: string } | { reason: string }> {
  const binary = await readFile(helper);
  const name = `.qlayer-guest-alloc-${randomBytes(8).toString('hex')}`;
  const reasons: string[] = [];
  for (const dir of HELPER_FOLDERS) {
    const path = `${dir}/${name}`;
    try {
      await guest.writeFile(path, binary);
    } catch (error) {
      reasons.push(`upload to ${path}: ${(error as Error).message}`);
      continue;
    }
    const result = await guest.exec('/bin/sh', ['-c', HELPER_WRAPPER, 'sh', path, HELPER_MACHINE], timeoutMs === undefined ? { input } : { input, timeoutMs });
    if (result.exitCode !== 126) return result;
    reasons.push(`${dir} does not allow running programs (${(result.stderr || result.stdout).trim().split('\n')[0]?.slice(0, 120) ?? 'exit 126'})`);
  }
  return { reason: reasons.join('; ') };
}

/**
 * Try the helper: the placeholders' counts, or the reason it could not run (then nothing of
 * its own is wrong and the script may take over). Its refusals and failures are thrown.
 */
async function allocateWithHelper(guest: GuestShell, manifests: AppManifest[], helper: string, options: AllocateOptions, what: string): Promise<AllocationResult | { reason: string }> {
  const result = await runHelper(guest, helper, helperManifest(manifests, options.placeholders ?? 'auto'), options.timeoutMs);
  if ('reason' in result) return { reason: `helper could not run in the guest: ${result.reason}` };
  // 126/127: not run there (another machine, every folder noexec). Any other failure without the
  // helper's own tag on stderr also means it never ran (say, the shell killed).
  if (result.exitCode !== 0 && (result.exitCode === 126 || result.exitCode === 127 || !result.stderr.includes(HELPER_TAG))) {
    const detail = (result.stderr || result.stdout).trim().split('\n')[0] ?? '';
    return { reason: `helper could not run in the guest (exit ${result.exitCode}${detail ? `: ${detail.slice(0, 200)}` : ''})` };
  }
  const created = createdPaths(result.stdout, manifests);
  let stdout: string;
  try {
    stdout = checkGuestResult({ ...result, stderr: result.stderr.split(HELPER_TAG).join('') }, what);
  } catch (error) {
    // The helper ran and failed half-way: say exactly what it made, so that it can be undone.
    throw Object.assign(error as Error, { created });
  }
  const counts = parseAllocatedLine(stdout);
  if (!counts) throw new LayerError('guest.script-failed', `${what}: the guest helper printed ${JSON.stringify(stdout.slice(-200))}`);
  return { ...counts, method: 'helper', processes: HELPER_PROCESSES, created };
}

/** The files and folders the helper reports it created, with the manifests' sizes. */
function createdPaths(stdout: string, manifests: AppManifest[]): GuestPaths {
  const sizes = new Map(manifests.flatMap((m) => m.files.map((f) => [f.path, f.size] as const)));
  const created = parseHelperRecords(stdout).get('created') ?? { files: [], dirs: [] };
  return { files: created.files.map((path) => ({ path, size: sizes.get(path) ?? 0 })), dirs: created.dirs };
}

/** What an allocation that failed part-way left in the guest, when the helper could tell. */
export function createdBeforeFailure(error: unknown): GuestPaths | null {
  const created = (error as { created?: GuestPaths } | null)?.created;
  return created && Array.isArray(created.files) ? created : null;
}

/**
 * Allocate placeholders for these apps in the running guest: with the helper (one guest
 * process, fallocate) when it is built, else or when it cannot run there, with the script
 * (written zeros, a few processes per file).
 */
export async function allocatePlaceholders(guest: GuestShell, manifests: AppManifest[], options: AllocateOptions = {}): Promise<AllocationResult> {
  const what = `allocating ${manifests.map((m) => `${m.name}@${m.version}`).join(', ')}`;
  const helper = options.helper === undefined ? guestHelperPath() : options.helper;
  let helperSkipped = helper === null ? 'helper not built (or QLAYER_NO_GUEST_HELPER=1)' : '';
  if (helper !== null) {
    const outcome = await allocateWithHelper(guest, manifests, helper, options, what);
    if (!('reason' in outcome)) return outcome;
    helperSkipped = outcome.reason;
  }
  const stdout = await runGuestScript(guest, allocationScript(manifests), what, options.timeoutMs);
  const counts = parseAllocatedLine(stdout);
  if (!counts) throw new LayerError('guest.script-failed', `${what}: the guest script printed ${JSON.stringify(stdout.slice(-200))}`);
  return { ...counts, method: 'script', processes: counts.processes ?? 0, helperSkipped, created: null };
}

/**
 * The guest's free space against what these apps need (spaceNeeded: their blocks, metadata and
 * a margin), read with df on the filesystem that will hold the first app's folder (its nearest
 * existing parent). Refuses with both numbers before anything is made in the guest.
 */
export interface GuestSpace {
  /** What the apps on this filesystem need, with the margin. */
  needed: number;
  free: number;
  /** The nearest existing folder of the first app prefix on this filesystem. */
  filesystem: string;
  /** The filesystem's mount point in the guest (df's "Mounted on"). */
  mountPoint: string;
  apps: string[];
}

/**
 * Each guest filesystem that will hold app files, against what the apps placed on it need. Apps
 * whose prefixes lie on different filesystems (/opt on the root, /srv on its own disk) are
 * counted where they go. Returns the tightest filesystem first, every one in `filesystems`.
 */
export async function checkGuestSpace(guest: GuestShell, manifests: AppManifest[], timeoutMs?: number): Promise<GuestSpace & { filesystems: GuestSpace[] }> {
  const prefixes = manifests.length ? manifests.map((m) => m.prefix) : ['/'];
  // One line per prefix: free KiB, mount point, nearest existing folder (tab-separated).
  const script =
    `for p in ${prefixes.map(shellQuote).join(' ')}; do d=$p; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; ` +
    `df -Pk "$d" | awk -v d="$d" 'NR==2 {m=$6; for (i = 7; i <= NF; i++) m = m " " $i; printf "%s\\t%s\\t%s\\n", $4, m, d}'; done\n`;
  const lines = (await runGuestScript(guest, script, 'checking the guest\'s free space', timeoutMs)).split('\n').filter((l) => l.includes('\t'));
  if (lines.length !== prefixes.length) {
    throw new LayerError('guest.script-failed', `checking the guest's free space: df printed ${lines.length} answers for ${prefixes.length} app folders: ${JSON.stringify(lines.join('\n'))}`);
  }
  const byMount = new Map<string, { free: number; filesystem: string; manifests: AppManifest[] }>();
  lines.forEach((line, i) => {
    const [freeK = '', mountPoint = '', folder = ''] = line.split('\t');
    const free = Number(freeK) * 1024;
    if (!Number.isFinite(free) || freeK === '') throw new LayerError('guest.script-failed', `checking the guest's free space: df printed ${JSON.stringify(freeK)}`);
    const entry = byMount.get(mountPoint) ?? { free, filesystem: folder, manifests: [] };
    if (manifests[i]) entry.manifests.push(manifests[i]!);
    byMount.set(mountPoint, entry);
  });
  const filesystems: GuestSpace[] = [...byMount].map(([mountPoint, e]) => ({
    needed: spaceNeeded(e.manifests),
    free: e.free,
    filesystem: e.filesystem,
    mountPoint,
    apps: e.manifests.map((m) => `${m.name}@${m.version}`),
  }));
  filesystems.sort((a, b) => a.free - a.needed - (b.free - b.needed));
  const mib = (n: number): string => `${(n / 1048576).toFixed(1)} MiB`;
  const short = filesystems.filter((f) => f.free < f.needed);
  if (short.length) {
    throw new LayerError(
      'allocate.not-enough-space',
      short
        .map((f) => `${f.apps.join(', ')} needs ${mib(f.needed)} on the guest filesystem holding ${f.filesystem} (its files, their metadata and a margin of 2 %, at least 16 MiB), which has ${mib(f.free)} free`)
        .join('; ') + '; nothing was made in the guest',
    );
  }
  return { ...filesystems[0]!, filesystems };
}

/** Delete these apps' files in the running guest; returns the paths that were already gone. */
export async function removeAppFiles(guest: GuestShell, manifests: AppManifest[], timeoutMs?: number): Promise<string[]> {
  const stdout = await runGuestScript(guest, removalScript(manifests), `removing ${manifests.map((m) => `${m.name}@${m.version}`).join(', ')}`, timeoutMs);
  return stdout.split('\n').filter((line) => line.startsWith('gone ')).map((line) => line.slice(5));
}

export interface RollbackResult {
  method: 'helper' | 'script';
  /** Placeholders deleted. */
  removed: number;
  /** Folders removed (only empty ones). */
  dirsRemoved: number;
  /** Paths left because they are no longer untouched placeholders: the user's now. */
  left: string[];
  /** Placeholders already gone. */
  missing: number;
}

/** The fallback rollback: the helper's checks with sh, head, cmp, wc and rm, a few processes per file. */
export function rollbackScript(paths: GuestPaths): string {
  const lines = [
    'removed=0 dirs=0 missing=0',
    'rb() { if [ ! -e "$1" ] && [ ! -L "$1" ]; then missing=$((missing+1)); return; fi',
    '  if [ -f "$1" ] && [ ! -L "$1" ] && [ "$(wc -c < "$1")" -eq "$2" ] && head -c "$2" /dev/zero | cmp -s - "$1" && rm -f -- "$1"; then removed=$((removed+1)); else printf "left %s\\n" "$1"; fi; }',
  ];
  for (const f of paths.files) lines.push(`rb ${shellQuote(f.path)} ${f.size}`);
  for (const d of [...paths.dirs].sort((a, b) => b.split('/').length - a.split('/').length)) lines.push(`rmdir -- ${shellQuote(d)} 2>/dev/null && dirs=$((dirs+1))`);
  lines.push('sync', 'echo "rolled back removed=$removed dirs=$dirs missing=$missing"');
  return `${lines.join('\n')}\n`;
}

/**
 * Undo what an assign made in the guest: delete each of these placeholders that is still
 * untouched (a regular file of its size reading as zeros), then the folders that are empty.
 * Anything else at those paths is the user's now and stays; it is reported.
 */
export async function removePlaceholders(guest: GuestShell, paths: GuestPaths, options: { timeoutMs?: number; helper?: string | null } = {}): Promise<RollbackResult> {
  const what = 'undoing the placeholders';
  const helper = options.helper === undefined ? guestHelperPath() : options.helper;
  if (helper !== null) {
    const result = await runHelper(guest, helper, rollbackManifest(paths), options.timeoutMs);
    if (!('reason' in result)) {
      if (result.exitCode === 0) {
        const records = parseHelperRecords(result.stdout);
        return {
          method: 'helper',
          removed: records.get('removed')?.files.length ?? 0,
          dirsRemoved: records.get('removed')?.dirs.length ?? 0,
          left: records.get('left')?.files ?? [],
          missing: records.get('missing')?.files.length ?? 0,
        };
      }
      // The helper ran and failed: that is an answer. Otherwise it never ran here; use the script.
      if (result.exitCode !== 126 && result.exitCode !== 127 && result.stderr.includes(HELPER_TAG)) checkGuestResult({ ...result, stderr: result.stderr.split(HELPER_TAG).join('') }, what);
    }
  }
  const stdout = await runGuestScript(guest, rollbackScript(paths), what, options.timeoutMs);
  const summary = /rolled back removed=(\d+) dirs=(\d+) missing=(\d+)/.exec(stdout);
  if (!summary) throw new LayerError('guest.script-failed', `${what}: the guest script printed ${JSON.stringify(stdout.slice(-200))}`);
  const left = stdout.split('\n').filter((l) => l.startsWith('left ')).map((l) => l.slice(5));
  return { method: 'script', removed: Number(summary[1]), dirsRemoved: Number(summary[2]), left, missing: Number(summary[3]) };
}
