#!/usr/bin/env node
/**
 * Build the optional native helpers. Run by `npm ci` / `npm install` (the "install" script).
 * It must never fail the install: each helper that cannot be built costs one warning line, and
 * the script exits 0 whatever happens.
 * - native/build/Release/qlayer_seek.node (node-gyp; lseek SEEK_DATA/SEEK_HOLE). Without it
 *   qlayer reads holes instead of skipping them (src/io/sparse.ts). Node headers come only
 *   from a local folder (npm's nodedir, or the include/node folder next to this node); nothing
 *   is downloaded.
 * - native/build/qlayer-guest-alloc (a static Linux program run inside guests; makes
 *   placeholders with fallocate in one process). Without it qlayer allocates placeholders with
 *   a shell script that writes zeros (src/layers/allocate.ts). Built after node-gyp, whose
 *   `rebuild` empties native/build.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, renameSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const nativeDir = join(root, 'native');

function warn(reason) {
  console.warn(`qlayer: optional native helper not built (${reason}); holes in raw files will be read instead of skipped`);
}

/** node-gyp: the one npm hands its scripts, then npm's bundled one, then a local one. */
function findNodeGyp() {
  const candidates = [];
  if (process.env.npm_config_node_gyp) candidates.push(process.env.npm_config_node_gyp);
  const npmCli = process.env.npm_execpath;
  if (npmCli) candidates.push(join(dirname(npmCli), '..', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  candidates.push(join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'node_modules', 'node-gyp', 'bin', 'node-gyp.js'));
  try {
    candidates.push(createRequire(join(root, 'package.json')).resolve('node-gyp/bin/node-gyp.js'));
  } catch {
    // not installed locally
  }
  return candidates.find((c) => existsSync(c)) ?? null;
}

/** A folder with this node's headers (common.gypi + node_api.h), so node-gyp never downloads them. */
function findNodeDir() {
  const candidates = [];
  if (process.env.npm_config_nodedir) candidates.push(process.env.npm_config_nodedir);
  candidates.push(resolve(dirname(process.execPath), '..'));
  for (const dir of candidates) {
    if (existsSync(join(dir, 'include', 'node', 'node_api.h')) && existsSync(join(dir, 'include', 'node', 'common.gypi'))) return dir;
    if (existsSync(join(dir, 'src', 'node_api.h')) && existsSync(join(dir, 'common.gypi'))) return dir;
  }
  return null;
}

/** qlayer_seek.node through node-gyp; returns after one warning line on any problem. */
function buildSeekModule() {
  if (process.env.QLAYER_NO_NATIVE === '1') return warn('QLAYER_NO_NATIVE=1');
  if (process.platform !== 'linux' && process.platform !== 'freebsd' && process.platform !== 'darwin') return warn(`platform ${process.platform}`);
  if (!existsSync(join(nativeDir, 'binding.gyp'))) return warn('native/binding.gyp missing');
  const nodeGyp = findNodeGyp();
  if (!nodeGyp) return warn('node-gyp not found');
  const nodeDir = findNodeDir();
  if (!nodeDir) return warn('no local Node headers (set npm nodedir)');

  const result = spawnSync(process.execPath, [nodeGyp, 'rebuild', `--nodedir=${nodeDir}`], {
    cwd: nativeDir,
    encoding: 'utf8',
    timeout: 180_000,
    env: { ...process.env, npm_config_nodedir: nodeDir },
  });
  if (result.error) return warn(`node-gyp: ${result.error.message}`);
  if (result.status !== 0) {
    const lines = `${result.stderr ?? ''}`.split('\n').filter((l) => /error/i.test(l));
    return warn(`node-gyp exited ${result.status}${lines.length ? `: ${lines[0].trim()}` : ''}`);
  }
  const built = join(nativeDir, 'build', 'Release', 'qlayer_seek.node');
  if (!existsSync(built)) return warn('node-gyp produced no qlayer_seek.node');
  try {
    createRequire(import.meta.url)(built);
  } catch (error) {
    return warn(`built module does not load: ${error.message}`);
  }
}

function warnGuest(reason) {
  console.warn(`qlayer: guest allocation helper not built (${reason}); placeholders will be written as zeros by a shell script`);
}

/**
 * native/build/qlayer-guest-alloc: a static binary, since it runs in guests whose libc we do not
 * know. musl first (about 50 KB, uploaded to every guest on each assign), then a static glibc
 * build (about 700 KB), else skip. It must match the guests' CPU architecture, which is the host's.
 */
function buildGuestHelper() {
  if (process.env.QLAYER_NO_NATIVE === '1') return warnGuest('QLAYER_NO_NATIVE=1');
  if (process.platform !== 'linux') return warnGuest(`platform ${process.platform}`);
  const source = join(nativeDir, 'guest-alloc.c');
  if (!existsSync(source)) return warnGuest('native/guest-alloc.c missing');
  const output = join(nativeDir, 'build', 'qlayer-guest-alloc');
  // A scratch name, renamed into place only once the build runs: never a half-written helper.
  const scratch = `${output}.tmp-${process.pid}`;
  mkdirSync(dirname(output), { recursive: true });
  const failures = [];
  for (const compiler of ['musl-gcc', 'cc']) {
    const result = spawnSync(compiler, ['-static', '-Os', '-s', '-Wall', '-o', scratch, source], { encoding: 'utf8', timeout: 120_000 });
    if (result.error || result.status !== 0) {
      failures.push(`${compiler}: ${result.error ? result.error.code ?? result.error.message : `exit ${result.status}`}`);
      continue;
    }
    // Empty input must be refused as bad input (exit 6): proof that the binary runs here.
    const probe = spawnSync(scratch, [], { input: '', encoding: 'utf8', timeout: 10_000 });
    if (probe.status !== 6) {
      failures.push(`${compiler}: built binary does not run (${probe.error ? probe.error.message : `exit ${probe.status}`})`);
      continue;
    }
    renameSync(scratch, output);
    return;
  }
  rmSync(scratch, { force: true });
  warnGuest(failures.join('; '));
}

buildSeekModule();
buildGuestHelper();
