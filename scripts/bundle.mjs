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

/**
 * In the image bundle, the other command groups (imported by src/cli/commands/index.ts) are a
 * module that throws: bin/qlayer.js runs this bundle only for command lines whose groups are
 * image or none (see groupsFor), so it is never evaluated.
 */
const onlyImageGroup = {
  name: 'only-image-group',
  setup(build) {
    build.onResolve({ filter: /^\.\/(fs|layers|demo|vm|host)\.js$/ }, (args) =>
      args.importer.endsWith(join('commands', 'index.ts')) ? { path: args.path, namespace: 'not-in-image-bundle' } : undefined,
    );
    build.onLoad({ filter: /.*/, namespace: 'not-in-image-bundle' }, (args) => ({
      contents: `throw new Error(${JSON.stringify(`internal: command group ${args.path} is not in the image bundle (bin/qlayer.js chose the wrong bundle)`)});`,
      loader: 'js',
    }));
  },
};

/**
 * Built-ins that `image info` never calls, loaded on first use instead of at start: commander
 * require()s child_process for external subcommands (qlayer has none) and the qcow2 code imports
 * zlib for compressed clusters; compiling them costs 1-3 ms at every start. The stand-in is an
 * ES module with the built-in's export names (read here, at build time): functions that load the
 * real module at their first call and forward to it (constructors too), and objects
 * (zlib.constants) as proxies that load it at their first property read.
 */
function lazyBuiltins(names) {
  const filter = new RegExp(`^(node:)?(${names.join('|')})$`);
  return {
    name: 'lazy-builtins',
    setup(build) {
      // (The stand-in's own require() of the built-in is left to esbuild: external.)
      build.onResolve({ filter }, (args) => (args.namespace === 'lazy-builtin' ? undefined : { path: args.path.replace(/^node:/, ''), namespace: 'lazy-builtin' }));
      build.onLoad({ filter: /.*/, namespace: 'lazy-builtin' }, async (args) => {
        const real = await import(`node:${args.path}`);
        const lines = [`let real;`, `const load = () => (real ??= require(${JSON.stringify(`node:${args.path}`)}));`];
        for (const key of Object.keys(real.default)) {
          if (!/^[A-Za-z_$][\w$]*$/.test(key)) continue;
          const value = real.default[key];
          if (typeof value === 'function') {
            lines.push(`export const ${key} = function (...args) { return new.target ? Reflect.construct(load().${key}, args, new.target) : load().${key}.apply(this, args); };`);
          } else if (value !== null && typeof value === 'object') {
            lines.push(`export const ${key} = new Proxy({}, { get: (_, k) => load().${key}[k], has: (_, k) => k in load().${key}, ownKeys: () => Reflect.ownKeys(load().${key}), getOwnPropertyDescriptor: (_, k) => ({ ...Reflect.getOwnPropertyDescriptor(load().${key}, k), configurable: true }) });`);
          }
        }
        lines.push(`export default new Proxy({}, { get: (_, k) => load()[k] });`);
        return { contents: lines.join('\n'), loader: 'js' };
      });
    },
  };
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

// The image bundle: one CommonJS file with the root program and only the `image` group, for the
// commands scripts run in loops (image info/map/check..., --version). Loading CommonJS skips the
// ES module loader's per-file resolution and linking and the ES facades of Node's built-ins
// (importing node:fs as an ES module evaluates every export, streams and readline included),
// which is most of the start-up left once the code is bundled: about 6 ms of CPU on Node 20 and
// on 24. Each process loads one bundle only, so the classes both bundles contain (QlayerError,
// commander's) never meet. bin/qlayer.js chooses the bundle from the command line.
const imageBundle = await esbuild.build({
  absWorkingDir: root,
  entryPoints: ['src/cli/main.ts'],
  outfile: join(outdir, 'image.cjs'),
  bundle: true,
  format: 'cjs',
  platform: 'node',
  target: 'node20.11',
  external: ['execa', 'yaml', '@unraid/libvirt'],
  // ES-only code the engine uses: import.meta.url finds native/build/ from the bundle's place.
  define: { 'import.meta.url': '__qlayerImportMetaUrl' },
  banner: { js: "const __qlayerImportMetaUrl = require('node:url').pathToFileURL(__filename).href;" },
  plugins: [onlyImageGroup, lazyBuiltins(['child_process', 'zlib'])],
  sourcemap: 'linked',
  legalComments: 'none',
  metafile: true,
  logLevel: 'warning',
});

const jsOutputs = (metafile) => Object.entries(metafile.outputs).filter(([name]) => name.endsWith('.js') || name.endsWith('.cjs'));
const kib = (metafile) => (jsOutputs(metafile).reduce((sum, [, output]) => sum + output.bytes, 0) / 1024).toFixed(0);
process.stderr.write(
  `bundle: dist/src/cli-bundle/main.js and ${jsOutputs(result.metafile).length - 1} chunks, ${kib(result.metafile)} KiB; image.cjs, ${kib(imageBundle.metafile)} KiB\n`,
);
