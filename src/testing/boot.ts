/**
 * boot(): a VM on a throwaway overlay over an image, running, its guest agent answering.
 *
 *   await using vm = await boot({ image: 'base.qcow2', boot: { mode: 'firmware' } });
 *   expect(await vm.succeed('uname -s')).toBe('Linux\n');
 */
import { join } from 'node:path';
import { rmSync } from 'node:fs';
import { composeApps } from './apps.js';
import { TestingError } from './errors.js';
import { createOverlay, imageChain } from './disk.js';
import { makeVmDir, newVmName } from './owner.js';
import { resolveOptions, type VmOptions } from './options.js';
import { reap } from './reap.js';
import { startGuest } from './start.js';
import { Vm, type SnapshotMode } from './vm.js';

export interface BootOptions extends VmOptions {
  /** How snapshot()/restore() work (see SnapshotMode); default 'memory', the faster restore. */
  snapshots?: SnapshotMode;
}

export async function boot(options: BootOptions): Promise<Vm> {
  const resolved = resolveOptions(options);
  // Bad input first: a missing image should not wait for libvirt.
  const below = await imageChain(resolved.image);
  const snapshots = options.snapshots ?? 'memory';
  if (snapshots !== 'memory' && snapshots !== 'disk') throw new TestingError('testing.bad-option', `boot: snapshots must be 'memory' or 'disk', not ${JSON.stringify(snapshots)}`);
  // What killed test processes left behind goes first: their guests would eat the CPU this one needs.
  await reap(resolved.uri === undefined ? {} : { uri: resolved.uri });

  const name = newVmName();
  const dir = makeVmDir(name);
  try {
    const composeLog: string[] = [];
    let chain;
    if (resolved.apps.length > 0) {
      chain = await composeApps(name, dir, resolved.image, resolved, (line) => composeLog.push(line));
    } else {
      const overlay = join(dir, 'overlay.qcow2');
      await createOverlay(overlay, below);
      chain = [{ path: overlay, format: 'qcow2' as const }, ...below];
    }
    const serialFile = join(dir, 'serial.log');
    const guest = await startGuest({ name, chain, serialLog: serialFile, options: resolved });
    return new Vm(name, dir, resolved.image, chain, serialFile, resolved, guest, snapshots, composeLog);
  } catch (error) {
    rmSync(dir, { recursive: true, force: true });
    throw error;
  }
}
