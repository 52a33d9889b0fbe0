#!/usr/bin/env node
/**
 * `npm run build` step 2 (after tsc): bundle the CLI into dist/src/cli-bundle/ with esbuild, so that a
 * command starts by reading one file (plus the chunk of its command group) instead of resolving
 * and compiling ~50 ES modules and commander's CommonJS files one by one. bin/qlayer.js runs
 * dist/src/cli-bundle/main.js when it exists, else the tsc output dist/src/cli/main.js (the
 * library, `exports`, stays the tsc output). It sits under dist/src/ so that the package's
 * `files` (dist/src/) ship it.
 *
 * Splitting keeps each command group's lazy import() (src/cli/commands/index.ts) as its own
 * chunk, so `qlayer image info` does not evaluate the layers or libvirt code. The bundle sits
 * three levels under the package root like dist/src/<dir>/, so the native helpers
 * (native/build/...) and vm-fixtures/ are found from import.meta.url as from the tsc output.
 *
 * Bundled: qlayer's own code, commander and fzstd. Left as imports, resolved from node_modules at
 * run time: execa and yaml (loaded only by the commands that need them), and the optional native
 * binding @unraid/libvirt.
 *
 * Without esbuild (it comes with the dev dependencies) this step says so and exits 0: the CLI
 * then runs from dist/src, only slower to start.
 */
import { rm } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const outdir = join(root, 'dist', 'src', 'cli-bundle');

let esbuild;
try {
  esbuild = await import('esbuild');
} catch (error) {
  process.stderr.write(`bundle: esbuild is not installed (${error.code ?? error.message}); the CLI runs unbundled from dist/src\n`);
  await rm(outdir, { recursive: true, force: true });
  process.exit(0);
}

await rm(outdir, { recursive: true, force: true });
const result = await esbuild.build({
  absWorkingDir: root,
  entryPoints: { main: 'src/cli/main.ts' },
  outdir,
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20.11',
  chunkNames: '[name]-[hash]',
  external: ['execa', 'yaml', '@unraid/libvirt'],
  // commander is CommonJS and require()s Node's built-ins; an ES module has no `require`.
  banner: { js: "import { createRequire as __qlayerCreateRequire } from 'node:module'; const require = __qlayerCreateRequire(import.meta.url);" },
  sourcemap: 'linked',
  legalComments: 'none',
  metafile: true,
  logLevel: 'warning',
});
const bytes = Object.entries(result.metafile.outputs)
  .filter(([name]) => name.endsWith('.js'))
  .reduce((sum, [, output]) => sum + output.bytes, 0);
process.stderr.write(`bundle: dist/src/cli-bundle/main.js and ${Object.keys(result.metafile.outputs).filter((n) => n.endsWith('.js') && !n.endsWith('/main.js')).length} chunks, ${(bytes / 1024).toFixed(0)} KiB\n`);
