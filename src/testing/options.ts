/**
 * boot()'s options, as users write them, and their checked form. The boot keys mirror the
 * config file's (boot.mode, boot.kernel, ...), so a desktop's config reads across.
 */
import { statSync } from 'node:fs';
import { basename, resolve } from 'node:path';
import type { Accel } from '../virt/accel.js';
import { TestingError } from './errors.js';

export type BootMode =
  | { mode: 'firmware'; firmware?: 'bios' | 'uefi' }
  | { mode: 'kernel'; kernel: string; initrd?: string; cmdline?: string };

/** An app folder, composed in as /opt/NAME (or `prefix`) before the first boot. */
export type AppSource = string | { dir: string; name?: string; prefix?: string };

export interface VmOptions {
  /** A qcow2 or raw disk. Never written: the VM runs on a throwaway overlay over it. */
  image: string;
  /** Folders composed in as an apps layer before the first boot (each becomes /opt/<folder name>). */
  apps?: AppSource[];
  /** Default: firmware (the disk's bootloader). */
  boot?: BootMode;
  /** Default 1024. */
  memoryMiB?: number;
  /** Default 1. */
  vcpus?: number;
  /** Seconds until the guest agent must answer (each boot, and each apps step). Default 300. */
  timeoutSec?: number;
  /** 'auto' (default): KVM where it really runs guests, TCG elsewhere (see src/virt/accel.ts). */
  accel?: Accel;
  /** libvirt connection, default qemu:///system. */
  uri?: string;
  /** Default timeout of exec/succeed, in seconds (default 120). */
  execTimeoutSec?: number;
}

export interface ResolvedApp {
  dir: string;
  name: string;
  prefix?: string;
}

export interface ResolvedOptions {
  image: string;
  apps: ResolvedApp[];
  boot: { kind: 'kernel'; kernel: string; initrd?: string; cmdline?: string } | { kind: 'firmware'; firmware: 'bios' | 'efi' };
  memoryMiB: number;
  vcpus: number;
  timeoutMs: number;
  accel: Accel;
  uri?: string;
  execTimeoutMs: number;
}

const bad = (message: string): never => {
  throw new TestingError('testing.bad-option', `boot: ${message}`);
};

function positiveInteger(name: string, value: number | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  if (!Number.isInteger(value) || value < 1) bad(`${name} must be a positive integer, not ${String(value)}`);
  return value;
}

function positiveNumber(name: string, value: number | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !(value > 0) || !Number.isFinite(value)) bad(`${name} must be a positive number of seconds, not ${String(value)}`);
  return value;
}

function existingFile(what: string, path: string): string {
  const full = resolve(path);
  const info = statSync(full, { throwIfNoEntry: false });
  if (info === undefined) bad(`${what} ${full} does not exist`);
  else if (!info.isFile()) bad(`${what} ${full} is not a regular file`);
  return full;
}

/** An app name from its folder: lower-case, only the characters a store name allows. */
export function appNameOf(dir: string): string {
  const name = basename(dir)
    .toLowerCase()
    .replace(/[^a-z0-9._-]+/g, '-')
    .replace(/^[^a-z0-9]+/, '')
    .slice(0, 63);
  return name === '' ? 'app' : name;
}

function resolveApp(source: AppSource): ResolvedApp {
  const spec = typeof source === 'string' ? { dir: source } : source;
  if (typeof spec?.dir !== 'string') bad(`each apps entry is a folder path or { dir, name?, prefix? }, not ${JSON.stringify(source)}`);
  const dir = resolve(spec.dir);
  const info = statSync(dir, { throwIfNoEntry: false });
  if (info === undefined) throw new TestingError('testing.app-missing', `boot: the app folder ${dir} does not exist`);
  if (!info.isDirectory()) throw new TestingError('testing.app-missing', `boot: the app ${dir} is not a folder`);
  return { dir, name: spec.name ?? appNameOf(dir), ...(spec.prefix === undefined ? {} : { prefix: spec.prefix }) };
}

export function resolveOptions(options: VmOptions): ResolvedOptions {
  if (typeof options !== 'object' || options === null) bad('pass an options object: boot({ image, ... })');
  if (typeof options.image !== 'string' || options.image === '') bad('image is required (a qcow2 or raw disk file)');
  const boot = options.boot ?? { mode: 'firmware' };
  let resolvedBoot: ResolvedOptions['boot'];
  if (boot.mode === 'kernel') {
    if (typeof boot.kernel !== 'string') bad("boot.mode 'kernel' needs boot.kernel");
    resolvedBoot = {
      kind: 'kernel',
      kernel: existingFile('boot.kernel', boot.kernel),
      ...(boot.initrd === undefined ? {} : { initrd: existingFile('boot.initrd', boot.initrd) }),
      ...(boot.cmdline === undefined ? {} : { cmdline: boot.cmdline }),
    };
  } else if (boot.mode === 'firmware') {
    // 'uefi': OVMF on q35 (the ovmf package), the NVRAM file in the VM's own folder.
    if (boot.firmware !== undefined && boot.firmware !== 'bios' && boot.firmware !== 'uefi') bad(`boot.firmware must be 'bios' or 'uefi', not ${JSON.stringify(boot.firmware)}`);
    resolvedBoot = { kind: 'firmware', firmware: boot.firmware === 'uefi' ? 'efi' : 'bios' };
  } else {
    return bad(`boot.mode must be 'firmware' or 'kernel', not ${JSON.stringify((boot as { mode?: unknown }).mode)}`);
  }
  const apps = (options.apps ?? []).map(resolveApp);
  const names = new Set<string>();
  for (const app of apps) {
    if (names.has(app.name)) bad(`two apps are named ${app.name}; give one a name: { dir, name }`);
    names.add(app.name);
  }
  return {
    image: resolve(options.image),
    apps,
    boot: resolvedBoot,
    memoryMiB: positiveInteger('memoryMiB', options.memoryMiB, 1024),
    vcpus: positiveInteger('vcpus', options.vcpus, 1),
    timeoutMs: positiveNumber('timeoutSec', options.timeoutSec, 300) * 1000,
    accel: options.accel ?? 'auto',
    ...(options.uri === undefined ? {} : { uri: options.uri }),
    execTimeoutMs: positiveNumber('execTimeoutSec', options.execTimeoutSec, 120) * 1000,
  };
}
