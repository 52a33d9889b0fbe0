/**
 * Assign benchmark (issue "apps that cost metadata, not bytes"): assigning an app to a running
 * desktop with qlayer, against what a user does without it: copy the same files in inside the
 * guest from a second disk (`cp -a`, then sync). Same base, same guest (TCG), both verified by
 * hashing every file in the booted guest.
 *
 * - Apps of 10 MiB, 100 MiB, 1 GiB and 4 GiB; from 100 MiB up they have the same 300 files
 *   (290 small ones and 10 large ones), so only their bytes differ.
 * - qlayer's assign runs as the real CLI in a child process: wall time from the command to a
 *   recomposed desktop, its peak RSS (VmHWM), and the phases from its step lines. "+ boot" adds
 *   the next boot, until the guest agent answers: the desktop runs with the app.
 * - The store sits on an XFS made in a file and loop-mounted (reflink), as a host that wants
 *   shared app bytes would set it up; without root or mkfs.xfs it falls back to the work folder
 *   and says so.
 * - Host bytes per desktop for the 1 GiB app: the file system's used space before and after
 *   (du counts a shared extent in every file, so it cannot show sharing), on the XFS store and
 *   on an ext4 store.
 * - Ten desktops: the 1 GiB app assigned to ten desktops in one command, against ten copies in
 *   ten guests, two at a time.
 */
import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { mkdir, open, readdir, readFile, rm, stat, statfs, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { execa } from 'execa';
import { buildApp, type AppManifest } from '../src/layers/app.js';
import { importBase } from '../src/layers/bases.js';
import { assignApps } from '../src/layers/desktop-assign.js';
import { desktopHandle } from '../src/layers/desktop-handle.js';
import { createDesktop } from '../src/layers/desktop-lifecycle.js';
import { verifyDesktop } from '../src/layers/desktop-verify.js';
import { assignToDesktops } from '../src/layers/fleet.js';
import { Store } from '../src/layers/store.js';
import { bootGuest } from '../src/virt/boot.js';
import { testGuestRuntime, type LibvirtDesktopRuntime } from '../src/virt/desktop-runtime.js';
import { ensureFixture, type Fixture } from '../src/virt/fixture.js';

const MIB = 1 << 20;
const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');

export interface AssignBenchRow {
  appBytes: number;
  files: number;
  /** The CLI's whole process: command to recomposed desktop. */
  assignMs: number;
  /** The same plus the boot that follows, until the agent answers. */
  assignAndBootMs: number;
  allocateMs: number;
  shutdownMs: number;
  offlineMs: number;
  peakRssBytes: number;
  bytesShared: number;
  copyMs: number;
  /** Copy plus the boot before it (the copying user's desktop has to run too). */
  copyAndBootMs: number;
  verified: boolean;
}

export interface HostBytesRow {
  store: string;
  appBytes: number;
  /** Growth of the file system's used space for each further desktop. */
  perDesktop: number[];
}

export interface FleetBenchRow {
  desktops: number;
  appBytes: number;
  qlayerMs: number;
  qlayerHostBytes: number;
  copyMs: number;
  copyHostBytes: number;
  verified: boolean;
}

export interface AssignBench {
  storeFs: string;
  rows: AssignBenchRow[];
  hostBytes: HostBytesRow[];
  fleet: FleetBenchRow | null;
}

/** An app of about `bytes` in `count` files: count - 10 small ones (1-32 KiB), 10 large ones. */
async function makeAppSource(dir: string, bytes: number, count: number): Promise<void> {
  await mkdir(join(dir, 'share'), { recursive: true });
  await mkdir(join(dir, 'lib'), { recursive: true });
  let small = 0;
  const smallCount = count - 10;
  for (let i = 0; i < smallCount; i++) {
    const size = 1024 + ((i * 7919) % 31) * 1024 + (i % 13);
    await writeFile(join(dir, 'share', `f${i}.dat`), randomFillSync(Buffer.alloc(size)));
    small += size;
  }
  const chunk = Buffer.alloc(8 * MIB);
  const each = Math.floor((bytes - small) / 10);
  for (let i = 0; i < 10; i++) {
    const file = await open(join(dir, 'lib', `big${i}.bin`), 'w');
    const size = each + i * 4099;
    for (let done = 0; done < size; done += chunk.length) {
      randomFillSync(chunk);
      await file.write(chunk, 0, Math.min(chunk.length, size - done));
    }
    await file.close();
  }
}

/** The test guest's filesystem grown to `bytes`. */
async function grownBase(fixtureBase: string, dir: string, bytes: number): Promise<string> {
  const raw = join(dir, 'base.raw');
  await execa('qemu-img', ['convert', '-O', 'raw', fixtureBase, raw]);
  await execa('truncate', ['-s', String(bytes), raw]);
  await execa('e2fsck', ['-fy', raw], { reject: false });
  await execa('resize2fs', [raw]);
  return raw;
}

/** Used bytes of the file system holding `dir`, once what was written has reached it. */
async function usedBytes(dir: string): Promise<number> {
  await execa('sync', ['-f', dir]);
  const s = await statfs(dir);
  return (s.blocks - s.bfree) * s.bsize;
}

/** Allocated bytes of the files under `dir` (no sharing on ext4, so this is exact there). */
async function allocatedBytes(dir: string): Promise<number> {
  let total = 0;
  for (const name of await readdir(dir)) total += (await stat(join(dir, name))).blocks * 512;
  return total;
}

/** An XFS with reflink in a sparse file, mounted at `mountPoint`; null when this host cannot. */
async function mountXfs(image: string, mountPoint: string, bytes: number): Promise<string | null> {
  try {
    await mkdir(mountPoint, { recursive: true });
    await execa('truncate', ['-s', String(bytes), image]);
    await execa('mkfs.xfs', ['-q', '-f', '-m', 'reflink=1', image]);
    await execa('mount', ['-o', 'loop', image, mountPoint]);
    return null;
  } catch (error) {
    return (error as Error).message.split('\n')[0] ?? 'mount failed';
  }
}

interface CliRun {
  ms: number;
  peakRss: number;
  /** Milliseconds from the start at which each step line appeared. */
  steps: Array<{ at: number; line: string }>;
  stdout: string;
}

/** Run the qlayer CLI as a user would, timing the whole process and sampling its peak RSS. */
async function runCli(args: string[]): Promise<CliRun> {
  const started = performance.now();
  const child = spawn(process.execPath, [join(repoRoot, 'bin', 'qlayer.js'), ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  const steps: Array<{ at: number; line: string }> = [];
  let stdout = '';
  let stderr = '';
  let peakRss = 0;
  const sample = async (): Promise<void> => {
    const status = await readFile(`/proc/${child.pid}/status`, 'utf8').catch(() => '');
    const hwm = /VmHWM:\s+(\d+) kB/.exec(status);
    if (hwm) peakRss = Math.max(peakRss, Number(hwm[1]) * 1024);
  };
  const sampler = setInterval(() => void sample(), 50);
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => {
    stderr += d.toString();
    for (const line of d.toString().split('\n').filter(Boolean)) steps.push({ at: performance.now() - started, line });
  });
  const code = await new Promise<number>((resolve) => child.on('close', (c) => resolve(c ?? 1)));
  clearInterval(sampler);
  if (code !== 0) throw new Error(`qlayer ${args.join(' ')} exited ${code}: ${stderr.trim().split('\n').slice(-3).join(' | ')}`);
  return { ms: performance.now() - started, peakRss, steps, stdout };
}

const stepAt = (run: CliRun, prefix: string): number | undefined => run.steps.find((s) => s.line.replace(/^• /, '').startsWith(prefix))?.at;

/** Boot a throwaway domain on a desktop's chain with a second disk holding the app, and copy it in. */
async function copyInGuest(fixture: Fixture, store: Store, name: string, carrier: string, manifest: AppManifest): Promise<{ copyMs: number; bootMs: number; ok: boolean }> {
  const [top, ...below] = desktopHandle(store, await store.readState(), name).chain;
  const b0 = performance.now();
  const guest = await bootGuest({
    name: `bench-copy-${name}`,
    disk: { path: top!.path, format: 'qcow2', backingChain: below.map((l) => ({ path: l.path, format: l.format })) },
    extraDisks: [{ path: carrier, format: 'raw', readOnly: true }],
    kernel: fixture.kernel,
    initrd: fixture.initrd,
    cmdline: fixture.images.base.cmdline,
    memoryMiB: 512,
    accel: 'tcg',
    waitForAgent: true,
    timeoutMs: 180_000,
  });
  const bootMs = performance.now() - b0;
  try {
    const c0 = performance.now();
    const copy = await guest.agent.exec('/bin/sh', ['-c', `mkdir -p /mnt/src ${manifest.prefix} && mount -o ro /dev/vdb /mnt/src && cp -a /mnt/src/. ${manifest.prefix}/ && sync`], { timeoutMs: 3_600_000 });
    const copyMs = performance.now() - c0;
    if (copy.exitCode !== 0) throw new Error(`copy failed in the guest: ${copy.stderr}`);
    const hashes = await guest.agent.exec('/bin/sh', ['-c', `cd ${manifest.prefix} && find . -type f -exec sha256sum {} +`], { timeoutMs: 3_600_000 });
    const got = new Map(
      hashes.stdout
        .trim()
        .split('\n')
        .map((l) => {
          const [h, p] = l.split(/\s+/);
          return [`${manifest.prefix}/${p!.replace(/^\.\//, '')}` as string, h!] as const;
        }),
    );
    await guest.agent.exec('/bin/sh', ['-c', 'umount /mnt/src; sync']);
    await guest.shutdown({ timeoutMs: 180_000 });
    return { copyMs, bootMs, ok: manifest.files.every((f) => got.get(f.path) === f.sha256) };
  } finally {
    await guest.destroy().catch(() => undefined);
  }
}

/** A second disk holding the app's files, as the copying user would attach one. */
async function carrierFor(source: string, path: string, bytes: number): Promise<void> {
  await execa('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-d', source, path, `${Math.ceil((bytes * 1.15) / MIB) + 64}M`]);
}

export async function runAssignBench(options: { sizes?: number[]; fleet?: boolean; log?: (line: string) => void; workDir: string }): Promise<AssignBench> {
  const sizes = options.sizes ?? [10 * MIB, 100 * MIB, 1024 * MIB, 4096 * MIB];
  const log = options.log ?? (() => {});
  const fixture = await ensureFixture();
  const largest = Math.max(...sizes, 1024 * MIB);

  // The store on XFS (reflink), sized for every payload, two copy desktops and ten desktops.
  const mountPoint = join(options.workDir, 'xfs');
  const xfsProblem = await mountXfs(join(options.workDir, 'store.xfs'), mountPoint, largest * 4 + 24 * 1024 * MIB);
  const storeDir = xfsProblem ? join(options.workDir, 'store') : join(mountPoint, 'store');
  const storeFs = xfsProblem ? `work folder (no XFS: ${xfsProblem})` : 'XFS with reflink (loop-mounted file)';
  log(`assign bench: store on ${storeFs}`);
  const store = await Store.open(storeDir);
  const configPath = join(options.workDir, 'qlayer.yaml');
  await writeFile(
    configPath,
    `store: ${storeDir}\nguest:\n  accel: tcg\n  memoryMiB: 512\n  vcpus: 1\nboot:\n  mode: test-guest\ntimeouts:\n  boot: 180\n  agent: 3600\n  shutdown: 180\n`,
  );
  const runtime: LibvirtDesktopRuntime = testGuestRuntime({
    accel: 'tcg',
    memoryMiB: 512,
    bootTimeoutMs: 180_000,
    agentTimeoutMs: 3_600_000,
    shutdownTimeoutMs: 180_000,
    logDir: join(storeDir, 'logs'),
  });
  log(`assign bench: base with room for ${Math.round(largest / MIB)} MiB apps`);
  const baseRaw = await grownBase(fixture.images.base.path, options.workDir, largest + 1024 * MIB);
  await importBase(store, 'bench', baseRaw, { format: 'raw' });
  await rm(baseRaw, { force: true });

  const result: AssignBench = { storeFs, rows: [], hostBytes: [], fleet: null };
  const manifests = new Map<number, { manifest: AppManifest; source: string }>();
  try {
    for (const size of sizes) {
      const label = `${Math.round(size / MIB)} MiB`;
      const source = join(options.workDir, `app-${size}`);
      await makeAppSource(source, size, size >= 100 * MIB ? 300 : 60);
      const manifest = await buildApp(store, { name: `app${Math.round(size / MIB)}m`, sourceDir: source, version: '1' });
      manifests.set(size, { manifest, source });

      // qlayer: the CLI assigns to a running desktop.
      const qName = `q${Math.round(size / MIB)}`;
      await createDesktop(store, qName, 'bench');
      const handle = desktopHandle(store, await store.readState(), qName);
      await runtime.start(handle);
      log(`assign ${label}: qlayer desktop assign (CLI)`);
      const run = await runCli(['desktop', 'assign', qName, `${manifest.name}@1`, '--config', configPath, '--json']);
      const report = JSON.parse(run.stdout) as { report: { bytesSharedWithPayloads: number } };
      if (process.env.QLAYER_BENCH_DEBUG) log(JSON.stringify(run.steps));
      const composed = desktopHandle(store, await store.readState(), qName); // the new apps generation
      const b0 = performance.now();
      await runtime.start(composed);
      const bootMs = performance.now() - b0;
      const verified = await verifyDesktop(store, runtime, qName);
      await runtime.stop(composed);
      const qOk = verified.files.length === manifest.files.length && verified.files.every((f) => f.ok);

      // Without qlayer: copy the files in from a second disk inside the running guest.
      const cName = `c${Math.round(size / MIB)}`;
      await createDesktop(store, cName, 'bench');
      const carrier = join(options.workDir, `carrier-${size}.raw`);
      await carrierFor(source, carrier, size);
      log(`assign ${label}: cp -a in the guest`);
      const copied = await copyInGuest(fixture, store, cName, carrier, manifest);
      await rm(carrier, { force: true });

      const allocateAt = stepAt(run, 'allocating ') ?? 0;
      const shutdownAt = stepAt(run, 'shutting ') ?? run.ms;
      const locateAt = stepAt(run, 'locating placeholders') ?? run.ms;
      const row: AssignBenchRow = {
        appBytes: manifest.files.reduce((n, f) => n + f.size, 0),
        files: manifest.files.length,
        assignMs: run.ms,
        assignAndBootMs: run.ms + bootMs,
        allocateMs: shutdownAt - allocateAt,
        shutdownMs: locateAt - shutdownAt,
        offlineMs: run.ms - locateAt,
        peakRssBytes: run.peakRss,
        bytesShared: report.report.bytesSharedWithPayloads,
        copyMs: copied.copyMs,
        copyAndBootMs: copied.copyMs + copied.bootMs,
        verified: qOk && copied.ok,
      };
      result.rows.push(row);
      log(formatAssignRow(row));
      if (size !== 1024 * MIB) await rm(source, { recursive: true, force: true });
    }

    // Host bytes per further desktop, 1 GiB app: this store, then an ext4 store.
    const gib = manifests.get(1024 * MIB);
    if (gib) {
      const perDesktop: number[] = [];
      for (const name of ['h1', 'h2']) {
        await createDesktop(store, name, 'bench');
        const before = await usedBytes(storeDir);
        await assignApps(store, runtime, name, [`${gib.manifest.name}@1`]);
        perDesktop.push((await usedBytes(storeDir)) - before);
      }
      result.hostBytes.push({ store: storeFs, appBytes: gib.manifest.files.reduce((n, f) => n + f.size, 0), perDesktop });
      log(`host bytes per desktop on ${storeFs}: ${perDesktop.join(', ')}`);

      const ext4Store = await Store.open(join(options.workDir, 'ext4-store'));
      await importBase(ext4Store, 'bench', store.path('bases', 'bench.qcow2'), { format: 'qcow2' });
      await buildApp(ext4Store, { name: gib.manifest.name, sourceDir: gib.source, version: '1' });
      const ext4Runtime = testGuestRuntime({ accel: 'tcg', memoryMiB: 512, bootTimeoutMs: 180_000, agentTimeoutMs: 3_600_000, shutdownTimeoutMs: 180_000, logDir: join(options.workDir, 'ext4-logs') });
      const ext4PerDesktop: number[] = [];
      for (const name of ['e1', 'e2']) {
        await createDesktop(ext4Store, name, 'bench');
        const dir = ext4Store.path('desktops', name);
        const before = await allocatedBytes(dir);
        await assignApps(ext4Store, ext4Runtime, name, [`${gib.manifest.name}@1`]);
        ext4PerDesktop.push((await allocatedBytes(dir)) - before);
      }
      result.hostBytes.push({ store: 'ext4 (no reflink; allocated blocks of the desktop folder)', appBytes: gib.manifest.files.reduce((n, f) => n + f.size, 0), perDesktop: ext4PerDesktop });
      await rm(join(options.workDir, 'ext4-store'), { recursive: true, force: true });

      if (options.fleet !== false) result.fleet = await fleetBench(fixture, store, runtime, storeDir, gib, options.workDir, log);
    }
  } finally {
    if (!xfsProblem) await execa('umount', [mountPoint], { reject: false });
  }
  return result;
}

/** The 1 GiB app to ten desktops in one command, against ten copies in ten guests (two at a time). */
async function fleetBench(
  fixture: Fixture,
  store: Store,
  runtime: LibvirtDesktopRuntime,
  storeDir: string,
  app: { manifest: AppManifest; source: string },
  workDir: string,
  log: (line: string) => void,
): Promise<FleetBenchRow> {
  const names = Array.from({ length: 10 }, (_, i) => `f${i}`);
  for (const name of names) await createDesktop(store, name, 'bench');
  const before = await usedBytes(storeDir);
  log('ten desktops: qlayer desktop assign --desktops f0..f9');
  const t0 = performance.now();
  const outcomes = await assignToDesktops(store, runtime, names, [`${app.manifest.name}@1`], { parallel: 2 });
  const qlayerMs = performance.now() - t0;
  const qlayerHostBytes = (await usedBytes(storeDir)) - before;
  let verified = outcomes.every((o) => o.status === 'assigned');
  const check = await verifyDesktop(store, runtime, names[0]!);
  verified &&= check.files.every((f) => f.ok);

  const copyNames = Array.from({ length: 10 }, (_, i) => `g${i}`);
  for (const name of copyNames) await createDesktop(store, name, 'bench');
  const carrier = join(workDir, 'carrier-fleet.raw');
  await carrierFor(app.source, carrier, 1024 * MIB);
  const copyBefore = await usedBytes(storeDir);
  log('ten desktops: cp -a in ten guests, two at a time');
  const c0 = performance.now();
  for (let i = 0; i < copyNames.length; i += 2) {
    const pair = await Promise.all(copyNames.slice(i, i + 2).map((name) => copyInGuest(fixture, store, name, carrier, app.manifest)));
    verified &&= pair.every((p) => p.ok);
  }
  const copyMs = performance.now() - c0;
  const copyHostBytes = (await usedBytes(storeDir)) - copyBefore;
  await rm(carrier, { force: true });
  return { desktops: 10, appBytes: app.manifest.files.reduce((n, f) => n + f.size, 0), qlayerMs, qlayerHostBytes, copyMs, copyHostBytes, verified };
}

const s = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;
const mb = (bytes: number): string => (bytes >= 1024 * MIB ? `${(bytes / 1024 / MIB).toFixed(2)} GiB` : `${(bytes / MIB).toFixed(1)} MiB`);

function formatAssignRow(r: AssignBenchRow): string {
  return `assign ${mb(r.appBytes)} (${r.files} files): qlayer ${s(r.assignMs)} (+ boot ${s(r.assignAndBootMs)}; allocate ${s(r.allocateMs)}, shutdown ${s(r.shutdownMs)}, locate+recompose ${s(r.offlineMs)}; peak RSS ${mb(r.peakRssBytes)}); cp -a ${s(r.copyMs)} (+ boot ${s(r.copyAndBootMs)}); ${r.verified ? 'verified' : 'NOT VERIFIED'}`;
}

function table(header: string[], body: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i]!.length)));
  const line = (cells: string[]): string => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...body.map(line)].join('\n');
}

export function formatAssignBench(bench: AssignBench): string {
  const parts: string[] = [];
  if (bench.rows.length) {
    parts.push(
      `assigning an app to a running desktop (store on ${bench.storeFs}), against cp -a from a second disk in the guest (TCG)`,
      table(
        ['app', 'files', 'assign', 'assign+boot', 'allocate', 'shutdown', 'locate+recompose', 'peak RSS', 'cp -a', 'cp -a+boot', 'copy/assign+boot', 'verified'],
        bench.rows.map((r) => [
          mb(r.appBytes),
          String(r.files),
          s(r.assignMs),
          s(r.assignAndBootMs),
          s(r.allocateMs),
          s(r.shutdownMs),
          s(r.offlineMs),
          mb(r.peakRssBytes),
          s(r.copyMs),
          s(r.copyAndBootMs),
          (r.copyAndBootMs / r.assignAndBootMs).toFixed(2),
          r.verified ? 'yes' : 'NO',
        ]),
      ),
    );
    const first = bench.rows.find((r) => r.files === 300);
    const last = [...bench.rows].reverse().find((r) => r.files === 300);
    if (first && last && first !== last) parts.push(`assign growth ${mb(first.appBytes)} -> ${mb(last.appBytes)}: ${(last.assignMs / first.assignMs).toFixed(2)}x`);
  }
  if (bench.hostBytes.length) {
    parts.push(
      '',
      'host bytes each further desktop adds for the 1 GiB app',
      table(
        ['store', 'per desktop', 'of the app'],
        bench.hostBytes.map((h) => [h.store, h.perDesktop.map(mb).join(', '), h.perDesktop.map((b) => `${((b / h.appBytes) * 100).toFixed(2)} %`).join(', ')]),
      ),
    );
  }
  if (bench.fleet) {
    const f = bench.fleet;
    parts.push(
      '',
      `the 1 GiB app to ${f.desktops} desktops`,
      table(
        ['way', 'wall time', 'host bytes added', 'verified'],
        [
          ['qlayer desktop assign --desktops (2 at a time)', s(f.qlayerMs), mb(f.qlayerHostBytes), f.verified ? 'yes' : 'NO'],
          ['cp -a in each guest (2 at a time)', s(f.copyMs), mb(f.copyHostBytes), f.verified ? 'yes' : 'NO'],
        ],
      ),
    );
  }
  return parts.join('\n');
}
