#!/usr/bin/env node
// Thin launcher: `npm run build` compiles the CLI to dist/src/ (tsc) and bundles it into
// dist/src/cli-bundle/ (esbuild, scripts/bundle.mjs); the bundle starts faster, so it runs when present.
import module from 'node:module';
import { existsSync } from 'node:fs';

// Node 22.1+ can cache compiled modules on disk, which shortens every later start-up; Node 20
// has no such cache and skips this.
module.enableCompileCache?.();

const bundled = new URL('../dist/src/cli-bundle/main.js', import.meta.url);
const { main } = await import(existsSync(bundled) ? bundled.href : '../dist/src/cli/main.js');
// Exit only once stdout and stderr have been handed to the OS: a pipe is written asynchronously,
// and process.exit() would cut off a large output (`image map --json | jq` got 64 KiB).
// A reader that went away (`| head`) ends the command as it ends a C tool (SIGPIPE: 128 + 13).
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (error) => process.exit(error?.code === 'EPIPE' ? 141 : 1));
}
const flushed = (stream) => new Promise((resolve) => stream.write('', () => resolve()));
const exit = (code) => Promise.all([flushed(process.stdout), flushed(process.stderr)]).then(() => process.exit(code));
main(process.argv).then(
  (code) => exit(code ?? 0),
  (error) => {
    process.stderr.write(`qlayer: ${error?.stack ?? error}\n`);
    return exit(1);
  },
);
