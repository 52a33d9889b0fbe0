import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, parseConfig } from '../../src/config/config.js';

describe('config', () => {
  it('config.example.yaml parses and equals the built-in defaults', () => {
    const example = parseConfig(readFileSync('config.example.yaml', 'utf8'), 'config.example.yaml', '/somewhere');
    const defaults = parseConfig('', null, '/somewhere');
    expect({ ...example, source: null }).toEqual(defaults);
    expect(defaults.store).toBe('/somewhere/qlayer-store');
    expect(defaults.guest.accel).toBe('auto');
  });

  it('names the key in every error', () => {
    expect(() => parseConfig('guest:\n  memoryMiB: lots\n', 'x.yaml', '/')).toThrow(/guest\.memoryMiB/);
    expect(() => parseConfig('guest:\n  accel: fast\n', 'x.yaml', '/')).toThrow(/guest\.accel.*auto, kvm, tcg/);
    expect(() => parseConfig('gust:\n  vcpus: 2\n', 'x.yaml', '/')).toThrow(/unknown config key 'gust'/);
    expect(() => parseConfig('timeouts:\n  boot: -1\n', 'x.yaml', '/')).toThrow(ConfigError);
    expect(() => parseConfig('store: [1, 2\n', 'x.yaml', '/')).toThrow(/not valid YAML/);
  });

  it('store precedence: --store, then QLAYER_STORE, then the file, then the default', () => {
    const dir = mkdtempSync(join(tmpdir(), 'qlayer-config-'));
    const file = join(dir, 'c.yaml');
    writeFileSync(file, 'store: from-file\nboot:\n  kernel: k/vmlinuz\n');
    expect(loadConfig({ file, env: {}, cwd: dir }).store).toBe(join(dir, 'from-file'));
    expect(loadConfig({ file, env: {}, cwd: dir }).boot.kernel).toBe(join(dir, 'k/vmlinuz'));
    expect(loadConfig({ file, env: { QLAYER_STORE: '/env/store' }, cwd: dir }).store).toBe('/env/store');
    expect(loadConfig({ file, store: 'flag', env: { QLAYER_STORE: '/env/store' }, cwd: dir }).store).toBe(join(dir, 'flag'));
    expect(loadConfig({ env: {}, cwd: dir }).store).toBe(join(dir, 'qlayer-store'));
    expect(() => loadConfig({ file: join(dir, 'missing.yaml'), env: {}, cwd: dir })).toThrow(/does not exist/);
  });
});
