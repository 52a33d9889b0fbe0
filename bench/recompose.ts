/**
 * Recompose benchmark: assigning an app of 10 MiB, 100 MiB and 1 GiB to a running desktop with
 * qlayer (allocate placeholders in the guest, shut down, locate offline, recompose), against what
 * a user does without qlayer: copy the same files into the desktop inside the guest, from a
 * second disk. Both run on the same base under libvirt, and both are verified by hashing every
 * file in the booted guest. Prints time and the bytes each way adds to the desktop's files.
 */
import { randomFillSync } from 'node:crypto';
import { mkdir, open, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { execa } from 'execa';
import { buildApp, type AppManifest } from '../src/layers/app.js';
import { assignApps, createDesktop, desktopHandle, importBase, verifyDesktop } from '../src/layers/desktops.js';
import { DelegatingRuntime, type DesktopHandle } from '../src/layers/runtime.js';
import { Store } from '../src/layers/store.js';
import { bootGuest } from '../src/virt/boot.js';
import { testGuestRuntime } from '../src/virt/desktop-runtime.js';
import { ensureFixture } from '../src/virt/fixture.js';

const MIB = 1 << 20;

export interface RecomposeBenchRow {
  appBytes: number;
  qlayerTotalMs: number;
  allocateMs: number;
  shutdownMs: number;
  offlineMs: number;
  qlayerBytesAdded: number;
  copyMs: number;
  copyBytesAdded: number;
  verified: boolean;
}

/** Bytes the files of a folder occupy on the host (allocated blocks, not apparent size). */
async function allocatedBytes(dir: string): Promise<number> {
  let total = 0;
  for (const name of await readdir(dir)) {
    if (!name.endsWith('.qcow2')) continue;
    total += (await stat(join(dir, name))).blocks * 512;
  }
  return total;
}

/** A runtime that times each phase of an assign. */
class TimedRuntime extends DelegatingRuntime {
  marks: Record<string, number> = {};
  override async stop(d: DesktopHandle) {
    this.marks.stopStart = performance.now();
    await this.inner.stop(d);
    this.marks.stopEnd = performance.now();
  }
}

/** An app of about `bytes`: one large file and a few small ones, random content. */
async function makeAppSource(dir: string, bytes: number): Promise<void> {
  await mkdir(join(dir, 'lib'), { recursive: true });
  const small = [4_000, 70_000, 300_001];
  const large = bytes - small.reduce((a, b) => a + b, 0);
  const file = await open(join(dir, 'lib', 'data.bin'), 'w');
  const chunk = Buffer.alloc(8 * MIB);
  for (let done = 0; done < large; done += chunk.length) {
    randomFillSync(chunk);
    await file.write(chunk, 0, Math.min(chunk.length, large - done));
  }
  await file.close();
  for (const [i, size] of small.entries()) await writeFile(join(dir, `part${i}.bin`), randomFillSync(Buffer.alloc(size)));
}

/** The test guest's filesystem grown to `bytes`, so a 1 GiB app fits. */
async function grownBase(fixtureBase: string, dir: string, bytes: number): Promise<string> {
  const raw = join(dir, 'base.raw');
  await execa('qemu-img', ['convert', '-O', 'raw', fixtureBase, raw]);
  await execa('truncate', ['-s', String(bytes), raw]);
  await execa('e2fsck', ['-fy', raw], { reject: false });
  await execa('resize2fs', [raw]);
  return raw;
}

export async function runRecomposeBench(options: { sizes?: number[]; log?: (line: string) => void; workDir: string }): Promise<RecomposeBenchRow[]> {
  const sizes = options.sizes ?? [10 * MIB, 100 * MIB, 1024 * MIB];
  const log = options.log ?? (() => {});
  const fixture = await ensureFixture();
  const store = await Store.open(join(options.workDir, 'store'));
  const baseSize = Math.max(...sizes) * 2 + 512 * MIB;
  log(`recompose: preparing a ${Math.round(baseSize / MIB)} MiB base from the test guest`);
  await importBase(store, 'bench', await grownBase(fixture.images.base.path, options.workDir, baseSize), { format: 'raw' });
  const runtime = testGuestRuntime({
    accel: (process.env.QLAYER_BENCH_ACCEL as 'kvm' | 'tcg' | 'auto' | undefined) ?? 'tcg',
    memoryMiB: 512,
    bootTimeoutMs: 120_000,
    agentTimeoutMs: 1_800_000,
    shutdownTimeoutMs: 120_000,
    logDir: join(options.workDir, 'logs'),
  });

  const rows: RecomposeBenchRow[] = [];
  for (const size of sizes) {
    const label = `${Math.round(size / MIB)} MiB`;
    const source = join(options.workDir, `app-${size}`);
    await makeAppSource(source, size);
    const manifest: AppManifest = await buildApp(store, { name: `app${Math.round(size / MIB)}m`, sourceDir: source, version: '1' });

    // qlayer: assign to a running desktop.
    const qName = `q${Math.round(size / MIB)}`;
    await createDesktop(store, qName, 'bench');
    const timed = new TimedRuntime(runtime);
    const qHandle = desktopHandle(store, await store.readState(), qName);
    await timed.start(qHandle);
    const qBefore = await allocatedBytes(join(store.root, 'desktops', qName));
    log(`recompose ${label}: qlayer assign`);
    const t0 = performance.now();
    await assignApps(store, timed, qName, [`${manifest.name}@1`]);
    const t1 = performance.now();
    const qAfter = await allocatedBytes(join(store.root, 'desktops', qName));
    const verified = await verifyDesktop(store, runtime, qName);
    const qlayerOk = verified.files.length === manifest.files.length && verified.files.every((f) => f.ok);

    // Without qlayer: copy the files in from a second disk inside the running guest.
    const cName = `c${Math.round(size / MIB)}`;
    await createDesktop(store, cName, 'bench');
    const cHandle = desktopHandle(store, await store.readState(), cName);
    const carrier = join(options.workDir, `carrier-${size}.raw`);
    await execa('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-d', source, carrier, `${Math.ceil((size * 1.2) / MIB) + 32}M`]);
    const [top, ...below] = cHandle.chain;
    const guest = await bootGuest({
      name: `bench-copy-${cName}`,
      disk: { path: top!.path, format: 'qcow2', backingChain: below.map((l) => ({ path: l.path, format: l.format })) },
      extraDisks: [{ path: carrier, format: 'raw', readOnly: true }],
      kernel: fixture.kernel,
      initrd: fixture.initrd,
      cmdline: fixture.images.base.cmdline,
      memoryMiB: 512,
      accel: 'tcg',
      waitForAgent: true,
      timeoutMs: 120_000,
    });
    let copyMs = 0;
    let copyOk = false;
    try {
      const cBefore = await allocatedBytes(join(store.root, 'desktops', cName));
      log(`recompose ${label}: copy in the guest`);
      const c0 = performance.now();
      const copy = await guest.agent.exec('/bin/sh', ['-c', `mkdir -p /mnt/src ${manifest.prefix} && mount -o ro /dev/vdb /mnt/src && cp -a /mnt/src/. ${manifest.prefix}/ && sync`], { timeoutMs: 1_800_000 });
      copyMs = performance.now() - c0;
      if (copy.exitCode !== 0) throw new Error(`copy failed in the guest: ${copy.stderr}`);
      const hashes = await guest.agent.exec('/bin/sh', ['-c', `cd ${manifest.prefix} && find . -type f -exec sha256sum {} +`], { timeoutMs: 1_800_000 });
      const got = new Map(hashes.stdout.trim().split('\n').map((l) => { const [h, p] = l.split(/\s+/); return [`${manifest.prefix}/${p!.replace(/^\.\//, '')}`, h!]; }));
      copyOk = manifest.files.every((f) => got.get(f.path) === f.sha256);
      await guest.agent.exec('/bin/sh', ['-c', 'umount /mnt/src; sync']);
      await guest.shutdown({ timeoutMs: 120_000 });
      const cAfter = await allocatedBytes(join(store.root, 'desktops', cName));
      rows.push({
        appBytes: manifest.files.reduce((n, f) => n + f.size, 0),
        qlayerTotalMs: t1 - t0,
        allocateMs: (timed.marks.stopStart ?? t1) - t0,
        shutdownMs: (timed.marks.stopEnd ?? t1) - (timed.marks.stopStart ?? t1),
        offlineMs: t1 - (timed.marks.stopEnd ?? t1),
        qlayerBytesAdded: qAfter - qBefore,
        copyMs,
        copyBytesAdded: cAfter - cBefore,
        verified: qlayerOk && copyOk,
      });
      log(formatRecomposeRow(rows[rows.length - 1]!));
    } finally {
      await guest.destroy().catch(() => undefined);
      await rm(carrier, { force: true });
      await rm(source, { recursive: true, force: true });
    }
  }
  return rows;
}

const s = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;
const mb = (bytes: number): string => `${(bytes / MIB).toFixed(1)} MiB`;

function formatRecomposeRow(r: RecomposeBenchRow): string {
  return `recompose ${mb(r.appBytes)}: qlayer ${s(r.qlayerTotalMs)} (allocate ${s(r.allocateMs)}, shutdown ${s(r.shutdownMs)}, locate+recompose ${s(r.offlineMs)}), +${mb(r.qlayerBytesAdded)}; copy in guest ${s(r.copyMs)}, +${mb(r.copyBytesAdded)}; ${r.verified ? 'verified' : 'NOT VERIFIED'}`;
}

export function formatRecomposeTable(rows: readonly RecomposeBenchRow[]): string {
  const header = ['app', 'qlayer assign', 'allocate', 'shutdown', 'locate+recompose', 'copy in guest', 'qlayer/copy', 'bytes added (qlayer)', 'bytes added (copy)', 'verified'];
  const body = rows.map((r) => [
    mb(r.appBytes),
    s(r.qlayerTotalMs),
    s(r.allocateMs),
    s(r.shutdownMs),
    s(r.offlineMs),
    s(r.copyMs),
    (r.qlayerTotalMs / r.copyMs).toFixed(2),
    mb(r.qlayerBytesAdded),
    mb(r.copyBytesAdded),
    r.verified ? 'yes' : 'NO',
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((row) => row[i]!.length)));
  const line = (cells: string[]): string => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...body.map(line)].join('\n');
}
