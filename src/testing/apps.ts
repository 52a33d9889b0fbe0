/**
 * `apps`: put folders into the guest filesystem before the first boot, the way qlayer gives a
 * desktop its apps. Each VM gets a private throwaway store: the image imported as its base,
 * each folder built as an app, a desktop created and the apps assigned (a boot allocates the
 * placeholders, a clean shutdown, then the offline recompose). The VM then boots the desktop's
 * own chain, user <- apps <- base, all inside the VM's folder: the image stays untouched and
 * what the test sees is exactly what qlayer's assign produces.
 *
 * Cost: the import copies the image (flattened) once per VM, and the allocation is one more
 * boot. Tests that need no apps skip all of it.
 */
import { join } from 'node:path';
import { buildApp } from '../layers/app.js';
import { importBase } from '../layers/bases.js';
import { assignApps } from '../layers/desktop-assign.js';
import { desktopHandle } from '../layers/desktop-handle.js';
import { createDesktop } from '../layers/desktop-lifecycle.js';
import type { DesktopHandle, DesktopRuntime } from '../layers/runtime.js';
import type { GuestShell } from '../layers/guest-script.js';
import { Store } from '../layers/store.js';
import type { RunningGuest } from '../virt/boot.js';
import type { DiskLayer } from '../virt/domain-xml.js';
import type { ResolvedOptions } from './options.js';
import { startGuest } from './start.js';

/**
 * The layers' runtime for the one assign boot: a harness domain (owner recorded, so a killed
 * test's leftover is reaped like any other) rather than a detached desktop domain.
 */
class ComposeRuntime implements DesktopRuntime {
  private guest: RunningGuest | undefined;

  constructor(
    private readonly name: string,
    private readonly serialLog: string,
    private readonly options: ResolvedOptions,
  ) {}

  async isRunning(): Promise<boolean> {
    if (this.guest === undefined) return false;
    const state = await this.guest.state();
    return state !== 'absent' && state !== 'shutoff';
  }

  async start(desktop: DesktopHandle): Promise<void> {
    this.guest = await startGuest({ name: this.name, chain: desktop.chain, serialLog: this.serialLog, options: this.options });
  }

  async stop(): Promise<void> {
    const guest = this.guest;
    this.guest = undefined;
    await guest?.shutdown({ timeoutMs: Math.min(this.options.timeoutMs, 60_000) });
  }

  shell(): GuestShell {
    const guest = this.guest;
    if (guest === undefined) throw new Error('ComposeRuntime.shell: the guest is not running');
    return {
      exec: (path, args, options) => guest.agent.exec(path, args, { timeoutMs: this.options.timeoutMs, ...options }),
      writeFile: (path, data) => guest.agent.writeFile(path, data),
    };
  }

  /** Whatever happens, no domain stays behind. */
  async destroy(): Promise<void> {
    await this.guest?.destroy().catch(() => undefined);
    this.guest = undefined;
  }
}

/** Compose the apps; returns the chain to boot, top first. `log` receives qlayer's step lines. */
export async function composeApps(vmName: string, dir: string, image: string, options: ResolvedOptions, log: (line: string) => void): Promise<DiskLayer[]> {
  const store = await Store.open(join(dir, 'store'));
  log(`importing ${image} as the base of a private store`);
  await importBase(store, 'base', image);
  const refs: string[] = [];
  for (const app of options.apps) {
    const manifest = await buildApp(store, { name: app.name, sourceDir: app.dir, version: '1', ...(app.prefix === undefined ? {} : { prefix: app.prefix }) });
    log(`built app ${app.name} from ${app.dir}: ${manifest.files.length} files under ${manifest.prefix}`);
    refs.push(`${app.name}@1`);
  }
  await createDesktop(store, 'vm', 'base');
  const runtime = new ComposeRuntime(`${vmName}-apps`, join(dir, 'apps-boot.serial.log'), options);
  try {
    await assignApps(store, runtime, 'vm', refs, log);
  } finally {
    await runtime.destroy();
  }
  const handle = desktopHandle(store, await store.readState(), 'vm');
  return handle.chain.map((layer) => ({ path: layer.path, format: layer.format }));
}
