/**
 * The test harness (qlayer/testing) on the tiny test guest, under whatever accel 'auto' picks
 * (TCG on the project's machines). Each row compares the harness with what a test would do
 * without it, or one way of doing a step with the other:
 * - boot() until the first exec answers, against the CLI's `vm boot` until the guest's ready
 *   line (agent started), as a child process like a user would run it;
 * - one exec round trip, against GuestAgent.exec (the layer the harness wraps);
 * - restore() of a memory snapshot, and of a disk snapshot, against a fresh boot() (all until
 *   the first exec answers): which restore is the default is decided by these rows;
 * - four VMs booted in parallel against four in sequence.
 * Run: `npm run bench -- --filter testing --runs 2`.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { boot, testGuest, type TestGuest, type Vm, type VmSnapshot } from '../src/testing/index.js';
import { createImage } from '../src/qcow2/create.js';
import { GuestAgent } from '../src/virt/agent.js';
import { withConnection } from '../src/virt/libvirt.js';
import { registerBenchSection, type BenchContext, type BenchSection } from './harness.js';

const run = promisify(execFile);
/** The repository root: bench runs compiled, from dist/bench/. */
const repo = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const MEMORY = 256;

let guestPromise: Promise<TestGuest> | undefined;
const guest = (): Promise<TestGuest> => (guestPromise ??= testGuest());

/** VMs a case started: closed (untimed) before the next run and at the end. */
function vms(ctx: BenchContext): Vm[] {
  let list = ctx.state.get('vms') as Vm[] | undefined;
  if (list === undefined) ctx.state.set('vms', (list = []));
  return list;
}

async function closeAll(ctx: BenchContext): Promise<void> {
  const list = vms(ctx);
  await Promise.all(list.splice(0).map((vm) => vm.close()));
}

async function bootReady(ctx: BenchContext, snapshots: 'memory' | 'disk' = 'memory'): Promise<Vm> {
  const vm = await boot({ ...(await guest()), memoryMiB: MEMORY, snapshots });
  vms(ctx).push(vm);
  await vm.exec('true');
  return vm;
}

async function destroyDomain(name: string): Promise<void> {
  await withConnection(undefined, (c) => c.remove(name));
}

export function testingBenchSection(): BenchSection {
  return {
    name: 'testing',
    cases: [
      {
        name: 'boot() to first exec vs CLI vm boot to ready',
        async reset(ctx) {
          await closeAll(ctx);
          const cli = ctx.state.get('cli') as string | undefined;
          if (cli !== undefined) await destroyDomain(`qlayer-${cli}`);
          // The CLI boots an overlay of its own each time, like boot() does.
          const overlay = join(ctx.dir, 'cli-overlay.qcow2');
          await run('rm', ['-f', overlay]);
          await createImage({ path: overlay, backing: { path: (await guest()).image, format: 'qcow2' } });
          ctx.state.set('cli', `bench-cli-${randomBytes(3).toString('hex')}`);
        },
        async qlayer(ctx) {
          await bootReady(ctx);
        },
        async reference(ctx) {
          const g = await guest();
          await run(process.execPath, [join(repo, 'bin', 'qlayer.js'), 'vm', 'boot', join(ctx.dir, 'cli-overlay.qcow2'), '--until', g.readyMarker, '--keep', '--memory', String(MEMORY), '--name', ctx.state.get('cli') as string, '--timeout', '300']);
        },
        async verify(ctx) {
          await closeAll(ctx);
          await destroyDomain(`qlayer-${ctx.state.get('cli') as string}`);
        },
      },
      {
        name: 'one exec round trip vs GuestAgent.exec',
        async setup(ctx) {
          ctx.state.set('vm', await bootReady(ctx));
        },
        async qlayer(ctx) {
          const r = await (ctx.state.get('vm') as Vm).exec('true');
          if (r.exitCode !== 0) throw new Error('exec true failed');
        },
        async reference(ctx) {
          const r = await new GuestAgent((ctx.state.get('vm') as Vm).name).exec('/bin/sh', ['-c', 'true']);
          if (r.exitCode !== 0) throw new Error('agent exec true failed');
        },
        verify: closeAll,
      },
      ...(['memory', 'disk'] as const).map((mode) => ({
        name: `restore() of a ${mode} snapshot vs a fresh boot()`,
        async setup(ctx: BenchContext) {
          const vm = await bootReady(ctx, mode);
          ctx.state.set('vm', vm);
          ctx.state.set('snap', await vm.snapshot());
        },
        async reset(ctx: BenchContext) {
          const fresh = ctx.state.get('fresh') as Vm | undefined;
          if (fresh !== undefined) await fresh.close();
          ctx.state.delete('fresh');
        },
        async qlayer(ctx: BenchContext) {
          const vm = ctx.state.get('vm') as Vm;
          await vm.restore(ctx.state.get('snap') as VmSnapshot);
          await vm.exec('true');
        },
        async reference(ctx: BenchContext) {
          const vm = await boot({ ...(await guest()), memoryMiB: MEMORY });
          ctx.state.set('fresh', vm);
          await vm.exec('true');
        },
        async verify(ctx: BenchContext) {
          const vm = ctx.state.get('vm') as Vm;
          if (!vm.serialLog().includes('QLAYER: ready')) throw new Error('restored VM lost its console');
          await (ctx.state.get('fresh') as Vm | undefined)?.close();
          await closeAll(ctx);
        },
      })),
      {
        name: 'four VMs in parallel vs in sequence (boot to first exec)',
        reset: closeAll,
        async qlayer(ctx) {
          await Promise.all([0, 1, 2, 3].map(() => bootReady(ctx)));
        },
        async reference(ctx) {
          for (let i = 0; i < 4; i++) await bootReady(ctx);
        },
        async verify(ctx) {
          const names = new Set(vms(ctx).map((vm) => vm.name));
          if (names.size !== 4) throw new Error(`expected 4 distinct VMs, found ${names.size}`);
          await closeAll(ctx);
        },
      },
    ],
  };
}

registerBenchSection(testingBenchSection());
