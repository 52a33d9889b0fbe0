#!/usr/bin/env bash
# Prove qlayer runs on a current LTS too: install the Node 24 binary that the npm package
# `node@24` ships (from the npm registry, cached in .cache/node24), then run the engine and
# layers unit tests and a CLI round trip under it. The main suite runs on the machine's Node 20.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=.cache/node24
if [ ! -x "$prefix/node_modules/node/bin/node" ]; then
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --no-save --no-audit --no-fund --loglevel=error node@24 >/dev/null
fi
node24="$PWD/$prefix/node_modules/node/bin/node"
version=$("$node24" --version)
case "$version" in v24.*) ;; *) echo "test-node24: expected Node 24, got $version" >&2; exit 1 ;; esac
echo "test-node24: running under Node $version" >&2

# A CLI round trip: create an overlay, write through it, check it with qemu-img.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
qemu-img create -q -f qcow2 "$work/base.qcow2" 64M
"$node24" bin/qlayer.js image create -f qcow2 -b base.qcow2 -F qcow2 "$work/top.qcow2" >/dev/null
"$node24" bin/qlayer.js image info --json "$work/top.qcow2" | grep -q '"backing-filename": "base.qcow2"'
qemu-img check -q "$work/top.qcow2"

# The unit tests (everything but the guest boots) under Node 24.
PATH="$(dirname "$node24"):$PATH" "$node24" node_modules/vitest/vitest.mjs run --exclude 'test/e2e/**' "$@"
