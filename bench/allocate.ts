/**
 * Placeholder allocation in a running test guest (TCG): the guest helper (fallocate, and its
 * written-zeros mode) against the shell-script fallback and the per-file script this replaced.
 * Two workloads: 3,000 small files (1-8 KiB) in 30 folders, and one 100 MiB file. Each variant
 * writes under its own prefix on one guest; every run ends with the guest's sync.
 *
 *   npm run build && node dist/bench/allocate.js [--skip-old]
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { execa } from 'execa';
import { allocatePlaceholders, type AllocateOptions } from '../src/layers/allocate.js';
import type { AppManifest } from '../src/layers/app.js';
import { runGuestScript, shellQuote, type GuestShell } from '../src/layers/guest-script.js';
import { bootGuest } from '../src/virt/boot.js';
import { ensureFixture } from '../src/virt/fixture.js';

const MIB = 1 << 20;

function manifest(prefix: string, sizes: number[]): AppManifest {
  const folders = Math.ceil(sizes.length / 100);
  return {
    format: 'qlayer-app/1',
    name: prefix.slice(1).replace(/\//g, '-'),
    version: '1',
    prefix,
    directories: [{ path: prefix, mode: 0o755, uid: 0, gid: 0 }, ...Array.from({ length: folders }, (_, i) => ({ path: `${prefix}/d${i}`, mode: 0o755, uid: 0, gid: 0 }))],
    files: sizes.map((size, i) => ({ path: `${prefix}/d${Math.floor(i / 100)}/file-${i}.bin`, size, mode: i % 7 ? 0o644 : 0o755, uid: 0, gid: 0, sha256: '', payloadOffset: 0 })),
    payloadSize: 0,
    createdAt: '',
  };
}

/** The allocation script before the guest helper (commit 5ccca9e), kept here only to compare. */
function perFileScript(manifests: AppManifest[]): string {
  const octal = (mode: number): string => (mode & 0o7777).toString(8).padStart(4, '0');
  const lines = ['set -e', 'refuse() { echo "$1" >&2; exit 3; }'];
  for (const m of manifests) {
    for (const dir of m.directories) {
      const q = shellQuote(dir.path);
      lines.push(`if [ -e ${q} ] && [ ! -d ${q} ]; then refuse ${q}; fi`, `mkdir -p ${q} && chmod ${octal(dir.mode)} ${q} && chown ${dir.uid}:${dir.gid} ${q}`);
    }
    for (const f of m.files) {
      const q = shellQuote(f.path);
      const whole = Math.floor(f.size / MIB);
      const rest = f.size % MIB;
      lines.push(`if [ -e ${q} ] || [ -L ${q} ]; then`, `  if [ -f ${q} ] && [ ! -L ${q} ] && [ "$(wc -c < ${q})" -eq ${f.size} ]; then :; else refuse ${q}; fi`, 'else');
      lines.push(whole > 0 ? `  dd if=/dev/zero of=${q} bs=${MIB} count=${whole} 2>/dev/null` : `  : > ${q}`);
      if (rest > 0) lines.push(`  head -c ${rest} /dev/zero >> ${q}`);
      lines.push('fi', `chmod ${octal(f.mode)} ${q} && chown ${f.uid}:${f.gid} ${q}`);
    }
  }
  lines.push('sync', 'echo allocated');
  return `${lines.join('\n')}\n`;
}

async function main(): Promise<void> {
  const skipOld = process.argv.includes('--skip-old');
  const fixture = await ensureFixture();
  const work = await mkdtemp(join(tmpdir(), 'qlayer-bench-allocate-'));
  const disk = join(work, 'disk.raw');
  await execa('qemu-img', ['convert', '-O', 'raw', fixture.images.base.path, disk]);
  await execa('truncate', ['-s', '2G', disk]);
  await execa('e2fsck', ['-fy', disk], { reject: false });
  await execa('resize2fs', [disk]);
  const guest = await bootGuest({ name: 'bench-allocate', disk: { path: disk, format: 'raw' }, kernel: fixture.kernel, initrd: fixture.initrd, cmdline: fixture.images.base.cmdline, memoryMiB: 512, accel: 'tcg', waitForAgent: true, timeoutMs: 120_000 });
  const shell: GuestShell = {
    exec: (path, args, options) => guest.agent.exec(path, args, { timeoutMs: 1_800_000, ...options }),
    writeFile: (path, data) => guest.agent.writeFile(path, data),
  };
  try {
    let seed = 1;
    const small = Array.from({ length: 3000 }, () => 1024 + ((seed = (seed * 1103515245 + 12345) % 2 ** 31) % (7 * 1024 + 1)));
    const workloads: Array<[string, number[]]> = [['3000 files of 1-8 KiB', small], ['one 100 MiB file', [100 * MIB]]];
    const variants: Array<[string, ((m: AppManifest) => Promise<string>) | null]> = [
      ['per-file script (before)', skipOld ? null : async (m) => (await runGuestScript(shell, perFileScript([m]), 'old script'), 'processes: about 4-5 per file')],
      ['grouped script (fallback)', async (m) => describe(await allocatePlaceholders(shell, [m], { helper: null }))],
      ['helper, written zeros', async (m) => describe(await allocatePlaceholders(shell, [m], { placeholders: 'zeros' } satisfies AllocateOptions))],
      ['helper, fallocate', async (m) => describe(await allocatePlaceholders(shell, [m]))],
    ];
    for (const [wIndex, [workload, sizes]] of workloads.entries()) {
      for (const [vIndex, [variant, run]] of variants.entries()) {
        if (!run) continue;
        const m = manifest(`/opt/bench${wIndex}-${vIndex}`, sizes);
        const t0 = performance.now();
        const detail = await run(m);
        const seconds = ((performance.now() - t0) / 1000).toFixed(2);
        const df = (await guest.agent.exec('/bin/sh', ['-c', `du -sk ${m.prefix}`])).stdout.trim().split(/\s+/)[0];
        process.stdout.write(`${workload.padEnd(22)} ${variant.padEnd(26)} ${seconds.padStart(7)} s  (${detail}; ${df} KiB allocated)\n`);
      }
    }
  } finally {
    await guest.destroy().catch(() => undefined);
    await rm(work, { recursive: true, force: true });
  }
}

function describe(r: Awaited<ReturnType<typeof allocatePlaceholders>>): string {
  return `${r.method}: fallocate ${r.fallocated}, zeros ${r.zeroFilled}, ${r.processes} guest processes`;
}

main().catch((error: unknown) => {
  process.stderr.write(`bench allocate: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
  process.exit(1);
});
