#!/usr/bin/env bash
# The test command (README): installs what it needs, then runs every test, e2e included, on the
# machine's Node 20, then the engine and layers tests again on Node 24 (from the npm package
# node@24). Ends with one plain "N passed, N failed" line over both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
mkdir -p .cache
reports=(.cache/vitest-node20.json)
status=0
npx vitest run --reporter=default --reporter=json --outputFile=.cache/vitest-node20.json "$@" || status=$?
if [ $# -eq 0 ]; then
  reports+=(.cache/vitest-node24.json)
  bash scripts/test-node24.sh --reporter=default --reporter=json --outputFile=.cache/vitest-node24.json \
    test/qcow2 test/chain test/layers test/config test/cli || status=$?
  rm -f .cache/vitest-example.json; reports+=(.cache/vitest-example.json); bash examples/vm-test/run.sh --reporter=default --reporter=json --outputFile="$PWD/.cache/vitest-example.json" || status=$?  # the example project (qlayer/testing through the packed tarball); test/package/pack.test.ts runs in the main suite
fi
node -e '
  let passed = 0, failed = 0;
  for (const file of process.argv.slice(1)) {
    try { const r = require(require("path").resolve(file)); passed += r.numPassedTests; failed += r.numFailedTests + (r.numRuntimeErrorTestSuites ?? 0); }
    catch { failed += 1; console.error(`no test report in ${file}`); }
  }
  console.log(`Tests: ${passed} passed, ${failed} failed`);
' "${reports[@]}"
exit "$status"
