#!/usr/bin/env bash
# Everything a fresh clone needs before it can run: host packages and daemons, npm packages,
# the TypeScript build, and the cached test guest. Shared by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh --test-host
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
# The optional native helpers (lseek(SEEK_DATA) module, guest allocation program): npm ci builds
# them; an older node_modules may predate them, or musl-tools may have arrived since.
if [ ! -f native/build/Release/qlayer_seek.node ] || [ ! -x native/build/qlayer-guest-alloc ]; then
  node scripts/build-native.mjs
fi
npm run --silent build
if [ -x vm-fixtures/build.sh ]; then
  bash vm-fixtures/build.sh >&2
fi
# The Debian guests (test/e2e/debian.test.ts and debian-uefi.test.ts, qlayer demo --guest
# debian|debian-uefi): about a minute each the first time, seconds when cached.
# QLAYER_SKIP_DEBIAN_GUEST=1 skips them (their tests then build them themselves).
if [ -x vm-fixtures/build-debian.sh ] && [ "${QLAYER_SKIP_DEBIAN_GUEST:-0}" != 1 ]; then
  bash vm-fixtures/build-debian.sh >&2
  bash vm-fixtures/build-debian.sh --firmware uefi >&2
fi
