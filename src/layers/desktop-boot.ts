/**
 * Getting a desktop's guest running and reachable for the steps that need it: started if it is
 * not (saying so when it was powered off hard), its agent checked when it already runs.
 */
import { openChain } from '../chain/chain.js';
import { openGuestFilesystem } from '../fs/index.js';
import { LayerError } from './errors.js';
import { runGuestScript } from './guest-script.js';
import type { Log } from './log.js';
import type { DesktopHandle, DesktopRuntime } from './runtime.js';
import type { Store } from './store.js';

/**
 * A running guest whose agent does not answer (stopped, crashed, never installed) can get no
 * placeholders, and no undo could reach it either. Found before anything is recorded, so the
 * refusal changes nothing. (A guest qlayer starts is waited for until its agent answers.)
 */
export async function assertAgentAnswers(runtime: DesktopRuntime, handle: DesktopHandle, name: string): Promise<void> {
  try {
    await runGuestScript(runtime.shell(handle), 'true\n', 'checking the guest agent');
  } catch (error) {
    throw new LayerError(
      'guest.agent-unavailable',
      `desktop ${name} is running, but its guest agent does not answer (${error instanceof Error ? error.message : String(error)}): qlayer allocates through qemu-guest-agent; start it in the guest (systemctl start qemu-guest-agent) or shut the desktop down, and try again; nothing was changed`,
    );
  }
}

/**
 * Was the desktop's guest filesystem left dirty (powered off hard, virsh destroy)? Read offline
 * from the stopped chain; null when it cannot be told (no ext4 root found, a chain being written).
 */
async function uncleanShutdown(store: Store, handle: DesktopHandle): Promise<boolean | null> {
  try {
    const chain = await openChain(handle.userPath, { allowedDirectories: [store.root] });
    try {
      const filesystem = await openGuestFilesystem(chain, { allowNeedsRecovery: true });
      return filesystem.needsRecovery;
    } finally {
      await chain.close();
    }
  } catch {
    return null;
  }
}

/**
 * Start the desktop's guest unless it already runs. A guest that was powered off hard is started
 * all the same, and says so: its kernel replays the journal when it mounts the filesystem, before
 * anything is allocated, and the recompose later checks the filesystem is clean.
 */
export async function ensureRunning(runtime: DesktopRuntime, handle: DesktopHandle, name: string, log: Log, store?: Store): Promise<void> {
  if (await runtime.isRunning(handle)) return;
  if (store !== undefined && (await uncleanShutdown(store, handle)) === true) {
    log(`${name} was not shut down cleanly (its filesystem journal needs recovery): the guest replays it as it boots, before anything is allocated`);
  }
  log(`starting ${name}`);
  await runtime.start(handle);
}
