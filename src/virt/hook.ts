/**
 * libvirt's QEMU hook for qlayer: /etc/libvirt/hooks/qemu, which libvirtd runs as
 * `qemu DOMAIN OPERATION SUB-OPERATION EXTRA` with the domain's XML on stdin. At `prepare begin`
 * (in qemuProcessInit, before the disk chain is set up, security labels applied or QEMU
 * started) it applies a desktop's change recorded `--at-next-boot` (src/layers/pending-boot-apply.ts).
 *
 * The rules it lives by:
 * - it never calls libvirt (libvirtd waits for it while holding the domain: a call back deadlocks);
 * - it never stops a start: the script exits 0 whatever happens, and so does `host run-hook`;
 * - it is fast when there is nothing to do: the script passes every other operation without
 *   starting node, and run-hook reads one state file for a desktop with nothing pending;
 * - it ignores domains that are not qlayer desktops (no qlayer desktop element in <metadata>).
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { chmod, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { applyPendingAtStart, type ApplyResult } from '../layers/pending-boot-apply.js';
import { diskSources, parseDesktopMetadata } from './domain-xml.js';
import { VirtError } from './errors.js';

export const DEFAULT_HOOK_PATH = '/etc/libvirt/hooks/qemu';
/** The line that marks a hook file as qlayer's own (install replaces it, remove deletes it). */
const MARKER = '# qlayer-hook: 1';

const shellQuote = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

/**
 * The hook script: passes everything but `prepare begin` at once (reading its stdin, as a hook
 * should), and otherwise runs this qlayer's `host run-hook` under a time limit. Never exec:
 * the shell must stay to exit 0 whatever node does.
 */
export function hookScript(node: string, bin: string): string {
  return [
    '#!/bin/sh',
    "# libvirt's QEMU hook, installed by `qlayer host install-hook`: applies qlayer desktops' changes",
    '# recorded with --at-next-boot when the domain starts. It never stops a start (always exits 0).',
    MARKER,
    `[ "$2 $3" = "prepare begin" ] || { cat >/dev/null 2>&1; exit 0; }`,
    `[ -x ${shellQuote(node)} ] && [ -f ${shellQuote(bin)} ] || { cat >/dev/null 2>&1; exit 0; }`,
    `timeout 900 ${shellQuote(node)} ${shellQuote(bin)} host run-hook "$@" >/dev/null 2>&1 || true`,
    'exit 0',
    '',
  ].join('\n');
}

function isOurs(text: string): boolean {
  return text.split('\n').includes(MARKER);
}

/** When the running libvirtd (or virtqemud) started, in ms since the epoch; null when none runs here. */
export function daemonStartedAt(): { name: string; pid: number; startedAt: number } | null {
  let uptimeAtBoot: number;
  try {
    const btime = /^btime (\d+)$/m.exec(readFileSync('/proc/stat', 'utf8'))?.[1];
    if (btime === undefined) return null;
    uptimeAtBoot = Number(btime) * 1000;
  } catch {
    return null;
  }
  const ticks = 100; // USER_HZ on Linux
  for (const entry of safeReaddir('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let comm: string;
    let stat: string;
    try {
      comm = readFileSync(`/proc/${entry}/comm`, 'utf8').trim();
      if (comm !== 'libvirtd' && comm !== 'virtqemud') continue;
      stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
    } catch {
      continue;
    }
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const start = Number(fields[19]); // field 22 of /proc/PID/stat
    return { name: comm, pid: Number(entry), startedAt: uptimeAtBoot + (start / ticks) * 1000 };
  }
  return null;
}

function safeReaddir(path: string): string[] {
  try {
    return readdirSync(path);
  } catch {
    return [];
  }
}

/**
 * Written when qlayer makes the daemon reload (install-hook --reload-daemon): which daemon, so
 * that a later install of the same hook knows that daemon has seen it (a reload leaves no trace
 * qlayer could read otherwise). Under /run: gone with a reboot, as is the daemon.
 */
const RELOAD_STAMP = '/run/libvirt/qlayer-hook-reloaded';

/**
 * Whether this very daemon was made to reload by qlayer. Once a daemon has found a hook file it
 * runs whatever is at that path at each call, so a later rewrite needs no further reload.
 */
function reloadedByQlayer(stampFile: string, daemon: { pid: number; startedAt: number }): boolean {
  try {
    const [pid, startedAt] = readFileSync(stampFile, 'utf8').trim().split(' ').map(Number);
    return pid === daemon.pid && startedAt === daemon.startedAt;
  } catch {
    return false;
  }
}

export interface HookInstallResult {
  path: string;
  /** What was at the path before: nothing, another qlayer hook (replaced), or this very script (left as it was). */
  replaced: 'nothing' | 'qlayer-hook' | 'unchanged';
  /** The command the hook runs. */
  runs: string;
  /** libvirtd looks for hook files when it starts (and on SIGHUP): does it still have to? */
  daemonMustReload: boolean;
  /** Why, in words, with what to do. */
  daemonNote: string;
}

/**
 * Install the hook at `path` (default /etc/libvirt/hooks/qemu). A file there that is not
 * qlayer's is never overwritten: libvirt 6.5 and later also run every executable in
 * /etc/libvirt/hooks/qemu.d/, so the other hook and qlayer's can live side by side.
 */
export async function installHook(options: { node: string; bin: string; path?: string; reloadDaemon?: boolean; stampFile?: string }): Promise<HookInstallResult> {
  const stampFile = options.stampFile ?? RELOAD_STAMP;
  const path = options.path ?? DEFAULT_HOOK_PATH;
  let replaced: HookInstallResult['replaced'] = 'nothing';
  let existedSince: number | null = null;
  const script = hookScript(options.node, options.bin);
  let text: string | null = null;
  if (existsSync(path)) {
    text = await readFile(path, 'utf8').catch(() => '');
    if (!isOurs(text)) {
      throw new VirtError(
        'virt.hook-foreign',
        `${path} exists and is not qlayer's hook; qlayer does not overwrite it. libvirt also runs every executable in ${path}.d/ (libvirt 6.5 and later): install qlayer's there with --path ${path}.d/qlayer`,
      );
    }
    replaced = text === script ? 'unchanged' : 'qlayer-hook';
    existedSince = statSync(path).mtimeMs;
  }
  if (!existsSync(dirname(path))) throw new VirtError('virt.hook-no-dir', `${dirname(path)} does not exist: is libvirt installed on this host?`);
  // The same script again is left as it is: its age tells whether the daemon has seen it.
  if (replaced !== 'unchanged') {
    const temporary = `${path}.qlayer-${process.pid}.tmp`;
    await writeFile(temporary, script);
    await chmod(temporary, 0o755);
    await rename(temporary, path);
  }
  const daemon = daemonStartedAt();
  let daemonMustReload: boolean;
  let daemonNote: string;
  if (daemon === null) {
    daemonMustReload = false;
    daemonNote = 'libvirtd is not running here: it finds the hook when it starts';
  } else if (existedSince !== null && existedSince < daemon.startedAt) {
    daemonMustReload = false;
    daemonNote = `${daemon.name} (pid ${daemon.pid}) started after the hook file existed: it sees the hook, and runs the current script at each start without a restart`;
  } else if (existedSince !== null && reloadedByQlayer(stampFile, daemon)) {
    daemonMustReload = false;
    daemonNote = `${daemon.name} (pid ${daemon.pid}) reloaded (qlayer sent it SIGHUP) after the hook file existed: it sees the hook`;
  } else if (options.reloadDaemon) {
    // libvirt looks for hook files again on SIGHUP (virHookInitialize at the daemon's reload).
    process.kill(daemon.pid, 'SIGHUP');
    await writeFile(stampFile, `${daemon.pid} ${daemon.startedAt}\n`).catch(() => undefined);
    daemonMustReload = false;
    daemonNote = `${daemon.name} (pid ${daemon.pid}) was sent SIGHUP to reload and find the hook (running guests are not touched)`;
  } else {
    daemonMustReload = true;
    daemonNote =
      `${daemon.name} (pid ${daemon.pid}) looks for hook files only when it starts or reloads, and qlayer cannot tell whether it has reloaded since the hook file appeared: ` +
      `restart it, make it reload with kill -HUP ${daemon.pid}, or run this again with --reload-daemon (running guests survive each)`;
  }
  return { path, replaced, runs: `${options.node} ${options.bin} host run-hook`, daemonMustReload, daemonNote };
}

/** Remove qlayer's hook; a hook that is not qlayer's is refused, a missing one is not an error. */
export async function removeHook(options: { path?: string } = {}): Promise<{ path: string; removed: boolean }> {
  const path = options.path ?? DEFAULT_HOOK_PATH;
  if (!existsSync(path)) return { path, removed: false };
  if (!isOurs(await readFile(path, 'utf8').catch(() => ''))) {
    throw new VirtError('virt.hook-foreign', `${path} is not qlayer's hook; qlayer leaves it alone`);
  }
  await rm(path);
  return { path, removed: true };
}

export interface HookRun {
  /** What the hook did: nothing (not a start, not a desktop, nothing pending), or an attempt. */
  outcome: 'ignored' | 'nothing-pending' | 'applied' | 'left-pending' | 'failed';
  desktop?: string;
  detail?: string;
  result?: ApplyResult | null;
}

/**
 * The hook's work for one call: argv is what libvirt passed (DOMAIN OP SUBOP EXTRA), xml the
 * domain's XML from stdin. Never throws.
 */
export async function runHook(argv: string[], xml: string): Promise<HookRun> {
  try {
    const [, op, subop] = argv;
    if (op !== 'prepare' || subop !== 'begin') return { outcome: 'ignored', detail: `operation ${op ?? '?'} ${subop ?? '?'}` };
    const meta = parseDesktopMetadata(xml);
    if (meta === undefined) return { outcome: 'ignored', detail: 'not a qlayer desktop' };
    if (!existsSync(join(meta.store, 'state.json'))) return { outcome: 'ignored', desktop: meta.name, detail: `no store at ${meta.store}` };
    // The chain must name the stable link (docs/design.md); an older definition names a generation.
    const namesAppsLink = /\/apps\.qcow2['"]/.test(xml) && !/\/apps\.\d+\.qcow2['"]/.test(xml);
    const result = await applyPendingAtStart(meta.store, meta.storeId, meta.name, diskSources(xml)[0], { namesAppsLink });
    if (result === null || (result.pending === null && result.reason === null)) return { outcome: 'nothing-pending', desktop: meta.name, result };
    if (result.applied) return { outcome: 'applied', desktop: meta.name, result };
    return { outcome: 'left-pending', desktop: meta.name, detail: result.reason?.message ?? '', result };
  } catch (error) {
    return { outcome: 'failed', detail: (error as Error)?.message ?? String(error) };
  }
}
