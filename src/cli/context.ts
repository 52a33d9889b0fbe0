import { join } from 'node:path';
import type { Command } from 'commander';
import { loadConfig, type QlayerConfig } from '../config/config.js';
import { Store } from '../layers/store.js';
import { LibvirtDesktopRuntime } from '../virt/desktop-runtime.js';
import { checkUriForStore } from '../virt/uri.js';
import type { CommonOptions } from './output.js';

/** Options of every command that works on the store. */
export interface StoreCommandOptions extends CommonOptions {
  store?: string;
  config?: string;
}

/** Add --store, --config and --json to a store command. */
export function storeOptions(command: Command): Command {
  return command
    .option('--store <dir>', 'store folder (default: $QLAYER_STORE, then the config file, then ./qlayer-store)')
    .option('--config <file>', 'config file (default: $QLAYER_CONFIG, ./qlayer.yaml, ~/.config/qlayer/config.yaml)')
    .option('--json', 'print the result as JSON');
}

export interface CommandContext {
  config: QlayerConfig;
  store: Store;
  runtime: LibvirtDesktopRuntime;
}

export function loadCommandConfig(options: StoreCommandOptions): QlayerConfig {
  return loadConfig({
    ...(options.config === undefined ? {} : { file: options.config }),
    ...(options.store === undefined ? {} : { store: options.store }),
  });
}

export function runtimeFor(config: QlayerConfig, store: Store): LibvirtDesktopRuntime {
  return new LibvirtDesktopRuntime({
    uri: config.libvirt.uri,
    accel: config.guest.accel,
    memoryMiB: config.guest.memoryMiB,
    vcpus: config.guest.vcpus,
    mode: config.boot.mode,
    kernel: config.boot.kernel,
    initrd: config.boot.initrd,
    cmdline: config.boot.cmdline,
    firmware: config.boot.firmware,
    bootTimeoutMs: config.timeouts.boot * 1000,
    agentTimeoutMs: config.timeouts.agent * 1000,
    shutdownTimeoutMs: config.timeouts.shutdown * 1000,
    logDir: join(store.root, 'logs'),
    // Every definition the runtime makes gets the config's hardware: desktop create, and a
    // desktop of an older store defined at its first start or after a recompose.
    network: config.desktop.network,
    graphics: config.desktop.graphics,
  });
}

export async function openContext(options: StoreCommandOptions): Promise<CommandContext> {
  const config = loadCommandConfig(options);
  const store = await Store.open(config.store);
  const given = options.store ?? process.env.QLAYER_STORE;
  checkUriForStore(config.libvirt.uri, { root: store.root, ...(given ? { given } : {}) });
  return { config, store, runtime: runtimeFor(config, store) };
}

/** Step messages go to stderr, so that --json stdout stays one clean document. */
export function stepLogger(options: CommonOptions): (message: string) => void {
  return (message) => process.stderr.write(`${options.json ? '' : '• '}${message}\n`);
}
