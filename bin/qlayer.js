#!/usr/bin/env node
// Thin launcher: the CLI is compiled to dist/ by `npm run build`.
import { main } from '../dist/src/cli/main.js';

main(process.argv).then(
  (code) => process.exit(code ?? 0),
  (error) => {
    process.stderr.write(`qlayer: ${error?.stack ?? error}\n`);
    process.exit(1);
  },
);
