import { existsSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { createRequire } from 'node:module';
import { QlayerError } from '../errors.js';

export type Accel = 'auto' | 'kvm' | 'tcg';

/** The validated configuration; every path in it is absolute. */
export interface QlayerConfig {
  store: string;
  libvirt: { uri: string };
  guest: { accel: Accel; memoryMiB: number; vcpus: number };
  boot: { mode: 'test-guest' | 'kernel' | 'firmware'; kernel: string | null; initrd: string | null; cmdline: string | null; firmware: 'bios' | 'uefi' };
  timeouts: { boot: number; agent: number; shutdown: number };
  /**
   * The hardware of a desktop defined with qlayer's defaults (not --like/--xml): a libvirt
   * network for one virtio NIC (null: none) and a display. Once defined, the domain is the
   * administrator's to change (virsh edit, virt-manager); these apply at definition only.
   */
  desktop: { network: string | null; graphics: 'spice' | 'vnc' | 'none' };
  /**
   * Folders whose files any image may name as backing or data file, besides the image's own
   * folder tree (like --allow on every command). Absolute.
   */
  allow: string[];
  /** The file the config came from, or null for built-in defaults. */
  source: string | null;
}

export class ConfigError extends QlayerError {
  constructor(message: string) {
    super('config.invalid', message, { exitCode: 2 });
  }
}

type Shape = { [key: string]: Validator | Shape };
type Validator = (value: unknown, key: string) => unknown;

const text: Validator = (value, key) => {
  if (typeof value !== 'string' || value.length === 0) throw new ConfigError(`config key '${key}' must be a non-empty string`);
  return value;
};
const textList: Validator = (value, key) => {
  if (!Array.isArray(value)) throw new ConfigError(`config key '${key}' must be a list of folders, not ${JSON.stringify(value)}`);
  return value.map((item, i) => text(item, `${key}[${i}]`));
};
const optionalText: Validator = (value, key) => (value === null ? null : text(value, key));
const positiveInteger =
  (max: number): Validator =>
  (value, key) => {
    if (typeof value !== 'number' || !Number.isInteger(value) || value <= 0 || value > max) {
      throw new ConfigError(`config key '${key}' must be a whole number from 1 to ${max}, not ${JSON.stringify(value)}`);
    }
    return value;
  };
const oneOf =
  (...choices: string[]): Validator =>
  (value, key) => {
    if (typeof value !== 'string' || !choices.includes(value)) {
      throw new ConfigError(`config key '${key}' must be one of ${choices.join(', ')}, not ${JSON.stringify(value)}`);
    }
    return value;
  };

const shape: Shape = {
  store: text,
  libvirt: { uri: text },
  guest: { accel: oneOf('auto', 'kvm', 'tcg'), memoryMiB: positiveInteger(1 << 20), vcpus: positiveInteger(256) },
  boot: { mode: oneOf('test-guest', 'kernel', 'firmware'), kernel: optionalText, initrd: optionalText, cmdline: optionalText, firmware: oneOf('bios', 'uefi') },
  timeouts: { boot: positiveInteger(86_400), agent: positiveInteger(86_400), shutdown: positiveInteger(86_400) },
  desktop: { network: optionalText, graphics: oneOf('spice', 'vnc', 'none') },
  allow: textList,
};

export const defaultConfigValues = {
  store: './qlayer-store',
  libvirt: { uri: 'qemu:///system' },
  guest: { accel: 'auto', memoryMiB: 512, vcpus: 1 },
  boot: { mode: 'test-guest', kernel: null, initrd: null, cmdline: null, firmware: 'bios' },
  timeouts: { boot: 120, agent: 60, shutdown: 60 },
  // No NIC and no display by default: the test guest needs neither, and each costs start-up time under TCG.
  desktop: { network: null, graphics: 'none' },
  allow: [],
} as const;

/** Merge `given` over `defaults` following `shape`, validating every key and naming it in errors. */
function validate(given: unknown, defaults: Record<string, unknown>, schema: Shape, prefix: string): Record<string, unknown> {
  if (given === undefined || given === null) given = {};
  if (typeof given !== 'object' || Array.isArray(given)) {
    throw new ConfigError(`config key '${prefix || '(top level)'}' must be a mapping`);
  }
  const record = given as Record<string, unknown>;
  for (const key of Object.keys(record)) {
    if (!(key in schema)) {
      const where = prefix ? `${prefix}.${key}` : key;
      throw new ConfigError(`unknown config key '${where}' (known: ${Object.keys(schema).map((k) => (prefix ? `${prefix}.${k}` : k)).join(', ')})`);
    }
  }
  const result: Record<string, unknown> = {};
  for (const [key, rule] of Object.entries(schema)) {
    const path = prefix ? `${prefix}.${key}` : key;
    const value = key in record ? record[key] : defaults[key];
    result[key] = typeof rule === 'function' ? rule(value, path) : validate(value, defaults[key] as Record<string, unknown>, rule, path);
  }
  return result;
}

/** Where a config file is looked for when none is named. */
export function defaultConfigCandidates(cwd = process.cwd()): string[] {
  const xdg = process.env.XDG_CONFIG_HOME ?? join(homedir(), '.config');
  return [join(cwd, 'qlayer.yaml'), join(xdg, 'qlayer', 'config.yaml')];
}

export interface LoadConfigOptions {
  /** --config FILE; falls back to $QLAYER_CONFIG, then the default candidates. */
  file?: string;
  /** --store DIR: beats $QLAYER_STORE and the file. */
  store?: string;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/**
 * The YAML parser, loaded when a config file is actually read: importing it costs ~35 ms, which
 * every command without a config file would pay at start-up. (`yaml` ships a CommonJS build, so
 * it loads synchronously here and loadConfig stays synchronous.)
 */
function parseYaml(text: string): unknown {
  // No config file (or an empty one) is parsed as empty text: null, as yaml.parse('') returns.
  if (text.trim() === '') return null;
  const yaml = createRequire(import.meta.url)('yaml') as typeof import('yaml');
  return yaml.parse(text);
}

/** Parse and validate a config document; `baseDir` anchors relative paths. */
export function parseConfig(yamlText: string, source: string | null, baseDir: string): QlayerConfig {
  let document: unknown;
  try {
    document = parseYaml(yamlText);
  } catch (error) {
    // The parser's message goes on with a code frame over several lines: keep its first line
    // (it names the line and column), so the error stays one line.
    throw new ConfigError(`${source ?? 'config'}: not valid YAML: ${(error as Error).message.split('\n')[0]!.replace(/:$/, '')}`);
  }
  const merged = validate(document, defaultConfigValues as unknown as Record<string, unknown>, shape, '') as unknown as QlayerConfig;
  const absolute = (path: string | null): string | null => (path === null ? null : isAbsolute(path) ? path : resolve(baseDir, path));
  if (merged.boot.mode === 'kernel' && merged.boot.kernel === null) {
    throw new ConfigError(`${source ?? 'config'}: config key 'boot.kernel' is required when boot.mode is kernel`);
  }
  return {
    ...merged,
    store: absolute(merged.store)!,
    allow: merged.allow.map((dir) => absolute(dir)!),
    boot: { ...merged.boot, kernel: absolute(merged.boot.kernel), initrd: absolute(merged.boot.initrd) },
    source,
  };
}

/** Load the config with the documented precedence. */
export function loadConfig(options: LoadConfigOptions = {}): QlayerConfig {
  const env = options.env ?? process.env;
  const cwd = options.cwd ?? process.cwd();
  const named = options.file ?? env.QLAYER_CONFIG;
  let config: QlayerConfig;
  if (named !== undefined) {
    const path = resolve(cwd, named);
    if (!existsSync(path)) throw new ConfigError(`config file ${path} does not exist`);
    config = parseConfig(readFileSync(path, 'utf8'), path, dirname(path));
  } else {
    const found = defaultConfigCandidates(cwd).find((candidate) => existsSync(candidate));
    config = found ? parseConfig(readFileSync(found, 'utf8'), found, dirname(found)) : parseConfig('', null, cwd);
  }
  const storeOverride = options.store ?? env.QLAYER_STORE;
  if (storeOverride !== undefined && storeOverride !== '') config.store = resolve(cwd, storeOverride);
  return config;
}
