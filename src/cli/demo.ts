/**
 * `qlayer demo`: the README's main job on the test guest. From nothing: import the test guest's
 * disk as a base, build two apps, create a desktop, write a user file in the guest, assign both
 * apps, boot again and prove the files are there (hashes in the guest) and the user file intact;
 * then unassign one app and prove it again. The desktop stays in the store afterwards.
 */
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { buildApp, type AppManifest } from '../layers/app.js';
import { importBase } from '../layers/bases.js';
import { assignApps } from '../layers/desktop-assign.js';
import { desktopHandle } from '../layers/desktop-handle.js';
import { createDesktop, destroyDesktop, stopDesktop } from '../layers/desktop-lifecycle.js';
import { unassignApps } from '../layers/desktop-unassign.js';
import { verifyDesktop, type VerifyResult } from '../layers/desktop-verify.js';
import { runGuestScript, shellQuote } from '../layers/guest-script.js';
import { LibvirtDesktopRuntime } from '../virt/desktop-runtime.js';
import { ensureDebianFixture, ensureFixture } from '../virt/fixture.js';
import { QlayerError } from '../errors.js';
import type { CommandContext } from './context.js';

const USER_FILE = '/home/user/notes.txt';

/** Which guest the demo runs on: the tiny busybox test guest, or the Debian 12 guest (grub, systemd) by BIOS or UEFI. */
export type DemoGuest = 'tiny' | 'debian' | 'debian-uefi';

interface DemoTarget {
  desktop: string;
  base: string;
  /** Runs the user's write: as root on the tiny guest, as the ordinary user on Debian. */
  asUser: (script: string) => string;
}

export interface DemoStep {
  step: string;
  detail: string;
  ok: boolean;
}

/** Deterministic pseudo-random bytes, so the demo's apps have the same versions on every run. */
function seededBytes(seed: string, length: number): Buffer {
  const out = Buffer.alloc(length);
  let block = createHash('sha256').update(seed).digest();
  for (let at = 0; at < length; at += block.length) {
    block.copy(out, at, 0, Math.min(block.length, length - at));
    block = createHash('sha256').update(block).digest();
  }
  return out;
}

async function makeDemoApps(dir: string): Promise<{ hello: string; atlas: string }> {
  const hello = join(dir, 'hello');
  await mkdir(join(hello, 'bin'), { recursive: true });
  await mkdir(join(hello, 'share'), { recursive: true });
  await writeFile(join(hello, 'bin', 'hello'), '#!/bin/sh\necho "hello from the apps layer: $(cat /opt/hello/share/greeting.txt)"\n');
  await chmod(join(hello, 'bin', 'hello'), 0o755);
  await writeFile(join(hello, 'share', 'greeting.txt'), 'composed offline by qlayer\n');
  const atlas = join(dir, 'atlas');
  await mkdir(join(atlas, 'maps'), { recursive: true });
  await writeFile(join(atlas, 'maps', 'world.bin'), seededBytes('atlas-world', 6 << 20));
  await writeFile(join(atlas, 'maps', 'coast.bin'), seededBytes('atlas-coast', 700_000));
  await writeFile(join(atlas, 'index.txt'), 'world.bin coast.bin\n');
  return { hello, atlas };
}

export async function runDemo(context: CommandContext, say: (line: string) => void, options: { guest?: DemoGuest } = {}): Promise<DemoStep[]> {
  const steps: DemoStep[] = [];
  const record = (step: string, detail: string, ok = true): void => {
    steps.push({ step, detail, ok });
    say(`${ok ? '✓' : '✗'} ${step}: ${detail}`);
  };

  let baseImage: string;
  let target: DemoTarget;
  if (options.guest === 'debian' || options.guest === 'debian-uefi') {
    const uefi = options.guest === 'debian-uefi';
    const fixture = await ensureDebianFixture({ firmware: uefi ? 'uefi' : 'bios' });
    baseImage = fixture.image.path;
    const loader = uefi ? 'OVMF on q35, grub-efi' : 'grub-pc';
    record('test guest', `Debian 12 (${loader}, systemd, qemu-guest-agent ${fixture.agentVersion}), kernel ${fixture.kernelRelease}, base disk ${baseImage} (${(fixture.image.allocated / 1048576).toFixed(0)} MiB of ${(fixture.image.virtualSize / 1048576).toFixed(0)} MiB)`);
    const user = fixture.user.name;
    target = { desktop: `demo-${options.guest}`, base: `demo-${options.guest}-base`, asUser: (script) => `runuser -u ${user} -- sh -c ${shellQuote(script)}` };
    // The Debian guest boots through its own bootloader, and needs more memory and time than the tiny one.
    context = {
      ...context,
      runtime: new LibvirtDesktopRuntime({
        uri: context.config.libvirt.uri,
        accel: context.config.guest.accel,
        memoryMiB: Math.max(1024, context.config.guest.memoryMiB),
        vcpus: context.config.guest.vcpus,
        mode: 'firmware',
        kernel: null,
        initrd: null,
        cmdline: null,
        firmware: uefi ? 'uefi' : 'bios',
        bootTimeoutMs: Math.max(300_000, context.config.timeouts.boot * 1000),
        agentTimeoutMs: Math.max(300_000, context.config.timeouts.agent * 1000),
        shutdownTimeoutMs: Math.max(120_000, context.config.timeouts.shutdown * 1000),
        logDir: join(context.store.root, 'logs'),
      }),
    };
  } else {
    const fixture = await ensureFixture();
    baseImage = fixture.images.base.path;
    record('test guest', `kernel ${fixture.kernelRelease}, base disk ${baseImage}`);
    target = { desktop: 'demo', base: 'demo-base', asUser: (script) => script };
  }
  const { store, runtime } = context;
  const DESKTOP = target.desktop;
  const BASE = target.base;

  const state = await store.readState();
  if (!state.bases[BASE]) await importBase(store, BASE, baseImage, { format: 'qcow2' });
  const basePath = store.path((await store.readState()).bases[BASE]!.file);
  const baseHash = await fileSha256(basePath);
  record('base', `${BASE} at ${basePath} (read-only), sha256 ${baseHash.slice(0, 16)}…`);

  const scratch = await mkdtemp(join(tmpdir(), 'qlayer-demo-'));
  let manifests: { hello: AppManifest; atlas: AppManifest };
  try {
    const sources = await makeDemoApps(scratch);
    manifests = {
      hello: await store.withLock(() => buildApp(store, { name: 'hello', sourceDir: sources.hello, version: '1.0' })),
      atlas: await store.withLock(() => buildApp(store, { name: 'atlas', sourceDir: sources.atlas, version: '2.3' })),
    };
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
  for (const m of Object.values(manifests)) {
    record('app', `${m.name}@${m.version}: ${m.files.length} files, ${(m.files.reduce((n, f) => n + f.size, 0) / 1048576).toFixed(1)} MiB under ${m.prefix}`);
  }

  if ((await store.readState()).desktops[DESKTOP]) {
    await stopDesktop(store, runtime, DESKTOP);
    await destroyDesktop(store, runtime, DESKTOP);
    record('reset', `removed the previous run's desktop ${DESKTOP}`);
  }
  await createDesktop(store, DESKTOP, BASE);
  const handle = desktopHandle(store, await store.readState(), DESKTOP);
  record('desktop', `${DESKTOP}: ${handle.chain.map((l) => l.path).join(' <- ')}`);

  await runtime.start(handle);
  const userText = `written by the user at ${new Date().toISOString()}, before any app arrived\n`;
  const userHash = createHash('sha256').update(userText).digest('hex');
  await runGuestScript(runtime.shell(handle), `${target.asUser(`mkdir -p /home/user && printf %s ${shellQuote(userText)} > ${USER_FILE}`)} && sync\n`, 'writing the user file');
  record('user write', `${USER_FILE} written in the running guest (sha256 ${userHash.slice(0, 16)}…)`);

  const assigned = await assignApps(store, runtime, DESKTOP, ['hello@1.0', 'atlas@2.3'], (m) => say(`    ${m}`));
  record(
    'assign',
    `${assigned.apps.join(', ')}: ${assigned.located} files located offline; ${(assigned.report.appBytesWritten / 1048576).toFixed(1)} MiB into apps.${assigned.report.generation}.qcow2, ${assigned.report.clustersDropped} user clusters now read from it`,
  );

  await bootAndProve(context, DESKTOP, [manifests.hello, manifests.atlas], [], userHash, record, 'after assign');

  const unassigned = await unassignApps(store, runtime, DESKTOP, ['atlas'], (m) => say(`    ${m}`));
  record('unassign', `atlas removed; apps layer rebuilt as apps.${unassigned.generation}.qcow2`);
  await bootAndProve(context, DESKTOP, [manifests.hello], manifests.atlas.files.map((f) => f.path), userHash, record, 'after unassign');

  const baseAfter = await fileSha256(basePath);
  record('base untouched', `sha256 ${baseAfter.slice(0, 16)}…`, baseAfter === baseHash);
  record('left in the store', `qlayer desktop show ${DESKTOP} --store ${store.root}`);
  return steps;
}

/** Boot, run the hello app, hash every file in the guest, stop. */
async function bootAndProve(
  context: CommandContext,
  DESKTOP: string,
  present: AppManifest[],
  absent: string[],
  userHash: string,
  record: (step: string, detail: string, ok?: boolean) => void,
  when: string,
): Promise<void> {
  const { store, runtime } = context;
  // The chain changes with every recompose (apps.N): read it afresh.
  const handle = desktopHandle(store, await store.readState(), DESKTOP);
  await runtime.start(handle);
  try {
    const output = await runGuestScript(runtime.shell(handle), '/opt/hello/bin/hello\n', 'running hello');
    record(`run ${when}`, `/opt/hello/bin/hello printed "${output.trim()}"`, output.includes('composed offline by qlayer'));
    const verified: VerifyResult = await verifyDesktop(store, runtime, DESKTOP, [USER_FILE, ...absent]);
    const good = verified.files.filter((f) => f.ok).length;
    record(`hashes ${when}`, `${good}/${verified.files.length} app files match their manifests in the guest (${present.map((m) => `${m.name}@${m.version}`).join(', ')})`, good === verified.files.length && verified.files.length === present.reduce((n, m) => n + m.files.length, 0));
    record(`user file ${when}`, `${USER_FILE} sha256 ${String(verified.extra[USER_FILE]).slice(0, 16)}…`, verified.extra[USER_FILE] === userHash);
    if (absent.length) {
      const gone = absent.filter((p) => verified.extra[p] === null).length;
      record(`removed ${when}`, `${gone}/${absent.length} files of the unassigned app are gone`, gone === absent.length);
    }
  } finally {
    await runtime.stop(handle);
  }
}

async function fileSha256(path: string): Promise<string> {
  const { createReadStream } = await import('node:fs');
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export class DemoFailed extends QlayerError {
  constructor(failed: DemoStep[]) {
    super('demo.failed', `the demo's proof failed at: ${failed.map((s) => s.step).join(', ')}`, { exitCode: 2 });
  }
}
