#!/usr/bin/env bash
# The main job (README): installs what it needs, then composes a desktop from base + apps + user,
# boots it and shows the apps are there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
node bin/qlayer.js demo "$@"
