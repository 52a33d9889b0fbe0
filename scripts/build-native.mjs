#!/usr/bin/env node
/**
 * Build the optional native helper (native/: lseek SEEK_DATA/SEEK_HOLE) with node-gyp.
 * Run by `npm ci` / `npm install` (the "install" script). It must never fail the install:
 * on any problem it prints one warning line and exits 0, and qlayer falls back to reading
 * holes (src/io/sparse.ts). Node headers come only from a local folder (npm's nodedir, or
 * the include/node folder next to this node); nothing is downloaded.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const nativeDir = join(root, 'native');

function warn(reason) {
  console.warn(`qlayer: optional native helper not built (${reason}); holes in raw files will be read instead of skipped`);
  process.exit(0);
}

if (process.env.QLAYER_NO_NATIVE === '1') warn('QLAYER_NO_NATIVE=1');
if (process.platform !== 'linux' && process.platform !== 'freebsd' && process.platform !== 'darwin') warn(`platform ${process.platform}`);
if (!existsSync(join(nativeDir, 'binding.gyp'))) warn('native/binding.gyp missing');

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

const nodeGyp = findNodeGyp();
if (!nodeGyp) warn('node-gyp not found');
const nodeDir = findNodeDir();
if (!nodeDir) warn('no local Node headers (set npm nodedir)');

const result = spawnSync(process.execPath, [nodeGyp, 'rebuild', `--nodedir=${nodeDir}`], {
  cwd: nativeDir,
  encoding: 'utf8',
  timeout: 180_000,
  env: { ...process.env, npm_config_nodedir: nodeDir },
});
if (result.error) warn(`node-gyp: ${result.error.message}`);
if (result.status !== 0) {
  const lines = `${result.stderr ?? ''}`.split('\n').filter((l) => /error/i.test(l));
  warn(`node-gyp exited ${result.status}${lines.length ? `: ${lines[0].trim()}` : ''}`);
}
const built = join(nativeDir, 'build', 'Release', 'qlayer_seek.node');
if (!existsSync(built)) warn('node-gyp produced no qlayer_seek.node');
try {
  createRequire(import.meta.url)(built);
} catch (error) {
  warn(`built module does not load: ${error.message}`);
}
