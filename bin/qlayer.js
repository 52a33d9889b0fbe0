#!/usr/bin/env node
// Thin launcher: `npm run build` compiles the CLI to dist/src/ (tsc) and bundles it into
// dist/src/cli-bundle/ (esbuild, scripts/bundle.mjs); the bundles start faster, so they run when present:
// - image.cjs, one CommonJS file with only the `image` commands, for `qlayer image ...` and a bare
//   `qlayer --version` (what scripts run in loops; see scripts/bundle.mjs for why CommonJS);
// - main.js and its chunks (ES modules, each command group loaded on demand) for everything else.
// This file imports nothing itself: an ES import of node:fs alone costs milliseconds (its ES
// facade evaluates every export), while process.getBuiltinModule (Node 20.16+) does not.
const builtin = process.getBuiltinModule;
const { existsSync } = builtin ? builtin('node:fs') : await import('node:fs');
const nodeModule = builtin ? builtin('node:module') : (await import('node:module')).default;

// Node 22.1+ caches compiled code on disk, which shortens every later start-up; Node 20 has no
// such cache and skips this.
nodeModule.enableCompileCache?.();

/**
 * The bundle to run: image.cjs when the command line needs the image group or no group (the same
 * choice as groupsFor in src/cli/commands/index.ts: the first word not starting with "-", or the
 * word after `help`, names the command; no word and a version flag without a help flag needs
 * none), else main.js.
 */
function imageBundleServes(args) {
  const words = args.filter((arg) => !arg.startsWith('-'));
  const name = words[0] === 'help' ? words[1] : words[0];
  if (name !== undefined) return name === 'image';
  return args.some((arg) => arg === '-V' || arg === '--version') && !args.some((arg) => arg === '-h' || arg === '--help');
}

/** Set when this run should store V8's code cache of the image bundle at exit (see below). */
let storeCodeCache = null;

/**
 * image.cjs is compiled with V8's code cache kept in ~/.cache/qlayer/ (XDG_CACHE_HOME), one file
 * per bundle build and Node version, written at the first run's exit so that it holds every
 * function that run compiled. Node 20 has no compile cache at all, and Node 22+'s caches only
 * what V8 compiles before the code runs (58 KiB of this bundle, against 190 KiB here), so this
 * saves the compile on both: 3-5 ms of `image info` on Node 24, more on 20. V8 rejects a cache
 * that does not match the source or the engine; the bundle is then compiled as usual and the
 * cache rewritten. NODE_DISABLE_COMPILE_CACHE=1 turns it off, as it does Node's own cache.
 */
function requireImageBundle(file) {
  const require = nodeModule.createRequire(import.meta.url);
  if (process.env.NODE_DISABLE_COMPILE_CACHE) return require(file).main;
  const fs = builtin('node:fs');
  const path = builtin('node:path');
  const vm = builtin('node:vm');
  const stat = fs.statSync(file);
  const cacheDir = path.join(process.env.XDG_CACHE_HOME || path.join(builtin('node:os').homedir(), '.cache'), 'qlayer');
  const cacheFile = path.join(cacheDir, `image.cjs-${stat.size}-${Math.floor(stat.mtimeMs)}-node${process.version}-${process.arch}.v8cache`);
  let cachedData;
  try {
    cachedData = fs.readFileSync(cacheFile);
  } catch {
    cachedData = undefined;
  }
  // The wrapper Node's CommonJS loader puts around a module.
  const source = `(function (exports, require, module, __filename, __dirname) { ${fs.readFileSync(file, 'utf8')}\n})`;
  const script = new vm.Script(source, { filename: file, cachedData, importModuleDynamically: vm.constants?.USE_MAIN_CONTEXT_DEFAULT_LOADER });
  if (cachedData === undefined || script.cachedDataRejected) {
    storeCodeCache = () => {
      try {
        fs.mkdirSync(cacheDir, { recursive: true, mode: 0o700 });
        const temporary = `${cacheFile}.${process.pid}`;
        fs.writeFileSync(temporary, script.createCachedData(), { mode: 0o600 });
        fs.renameSync(temporary, cacheFile);
        // Caches of earlier builds of the bundle for this Node are dead weight.
        const suffix = `-node${process.version}-${process.arch}.v8cache`;
        for (const name of fs.readdirSync(cacheDir)) {
          if (name.startsWith('image.cjs-') && name.endsWith(suffix) && name !== path.basename(cacheFile)) fs.rmSync(path.join(cacheDir, name), { force: true });
        }
      } catch {
        // A cache that cannot be written only costs the next start-up its compile.
      }
    };
  }
  const module = { exports: {} };
  script.runInThisContext()(module.exports, nodeModule.createRequire(file), module, file, path.dirname(file));
  return module.exports.main;
}

async function loadMain() {
  const imageBundle = new URL('../dist/src/cli-bundle/image.cjs', import.meta.url);
  if (builtin && imageBundleServes(process.argv.slice(2)) && existsSync(imageBundle)) {
    return requireImageBundle(builtin('node:url').fileURLToPath(imageBundle));
  }
  const bundled = new URL('../dist/src/cli-bundle/main.js', import.meta.url);
  return (await import(existsSync(bundled) ? bundled.href : '../dist/src/cli/main.js')).main;
}

const main = await loadMain();
// Exit only once stdout and stderr have been handed to the OS: a pipe is written asynchronously,
// and process.exit() would cut off a large output (`image map --json | jq` got 64 KiB).
// A reader that went away (`| head`) ends the command as it ends a C tool (SIGPIPE: 128 + 13).
// Node creates each stream on first use, and creating one on a pipe costs milliseconds (the
// net and stream code): a command that prints nothing on stderr should not pay for it. So the
// handler is attached, and the flush awaited, for the streams something used.
const used = [];
const watch = (stream) => {
  if (!used.includes(stream)) {
    used.push(stream);
    stream.on('error', (error) => process.exit(error?.code === 'EPIPE' ? 141 : 1));
  }
  return stream;
};
for (const name of ['stdout', 'stderr']) {
  const descriptor = Object.getOwnPropertyDescriptor(process, name);
  if (descriptor?.get && descriptor.configurable) {
    Object.defineProperty(process, name, { configurable: true, enumerable: descriptor.enumerable, get: () => watch(descriptor.get.call(process)) });
  } else {
    watch(process[name]);
  }
}
const flushed = (stream) => new Promise((resolve) => stream.write('', () => resolve()));
const exit = (code) => {
  storeCodeCache?.();
  return Promise.all(used.map(flushed)).then(() => process.exit(code));
};
main(process.argv).then(
  (code) => exit(code ?? 0),
  (error) => {
    process.stderr.write(`qlayer: ${error?.stack ?? error}\n`);
    return exit(1);
  },
);
