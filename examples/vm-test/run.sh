#!/usr/bin/env bash
# Run the example as a user of the published package would: pack qlayer, install the tarball
# here (its dependencies come from the npm registry or npm's cache), type-check, run the tests.
# Arguments go to vitest (scripts/test.sh passes its reporters). The test guest is the one the
# repository already built (.cache/vm-fixtures), unless QLAYER_FIXTURES_CACHE names another.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
mkdir -p "$repo/.cache"
tarball=$(cd "$repo" && npm pack --pack-destination .cache --silent | tail -n 1)
mv -f "$repo/.cache/$tarball" "$repo/.cache/qlayer.tgz"
cd "$here"
# A fresh install each time: the tarball's bytes change with every build.
rm -rf node_modules/qlayer package-lock.json
npm install --no-audit --no-fund --prefer-offline --loglevel=error >/dev/null
# @types/node for the type-check comes from the repository (the example has no other use for it).
"$repo/node_modules/.bin/tsc" -p tsconfig.json --typeRoots "$repo/node_modules/@types"
export QLAYER_FIXTURES_CACHE="${QLAYER_FIXTURES_CACHE:-$repo/.cache/vm-fixtures}"
exec npx vitest run "$@"
