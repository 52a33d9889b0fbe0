#!/usr/bin/env node
// Thin launcher: the CLI is compiled to dist/ by `npm run build`.
import module from 'node:module';

// Node 22.1+ can cache compiled modules on disk, which shortens every later start-up; Node 20
// has no such cache and skips this.
module.enableCompileCache?.();

const { main } = await import('../dist/src/cli/main.js');
main(process.argv).then(
  (code) => process.exit(code ?? 0),
  (error) => {
    process.stderr.write(`qlayer: ${error?.stack ?? error}\n`);
    process.exit(1);
  },
);
