#!/usr/bin/env bash
# Everything a fresh clone needs before it can run: host packages and daemons, npm packages,
# the TypeScript build, and the cached test guest. Shared by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh --test-host
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
# The optional lseek(SEEK_DATA) helper: npm ci builds it; an older node_modules may predate it.
[ -f native/build/Release/qlayer_seek.node ] || node scripts/build-native.mjs
npm run --silent build
if [ -x vm-fixtures/build.sh ]; then
  bash vm-fixtures/build.sh >&2
fi
