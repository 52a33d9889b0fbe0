#!/usr/bin/env bash
# The test command (README): installs what it needs, then runs every test, e2e included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
npx vitest run "$@"
