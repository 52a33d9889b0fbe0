/**
 * `npm run bench` (after `npm run build`): every registered section, qlayer against qemu-img on
 * the same work, best of N, outputs verified. Sections register themselves on import; to add
 * one (ext4 lookups, recompose...), write bench/<name>.ts calling registerBenchSection() and
 * import it below.
 *
 *   node dist/bench/run.js [--runs N] [--filter TEXT] [--json] [--recompose-sizes 10,100,1024]
 *
 * The recompose section boots real guests (libvirt, TCG) and runs once per size; it is selected
 * like the others with --filter recompose.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { formatTable, runBench } from './harness.js';
import './qcow2-ops.js';
import './fs-lookups.js';
import { formatRecomposeTable, runRecomposeBench, type RecomposeBenchRow } from './recompose.js';

export { registerBenchSection, runBench, formatTable, type BenchSection, type BenchCase, type BenchRow } from './harness.js';

function argValue(name: string): string | undefined {
  const at = process.argv.indexOf(name);
  return at >= 0 ? process.argv[at + 1] : undefined;
}

async function main(): Promise<number> {
  const runs = Number(argValue('--runs') ?? 3);
  const filter = argValue('--filter');
  const json = process.argv.includes('--json');
  const log = json ? undefined : (line: string): void => void process.stderr.write(`${line}\n`);
  const rows = await runBench({ runs, filter, ...(log ? { log } : {}) });
  let recompose: RecomposeBenchRow[] = [];
  if (!filter || 'recompose'.includes(filter) || filter.startsWith('recompose')) {
    const sizes = (argValue('--recompose-sizes') ?? '10,100,1024').split(',').map((mib) => Number(mib) * 1024 * 1024);
    const workDir = await mkdtemp(join(tmpdir(), 'qlayer-bench-recompose-'));
    try {
      recompose = await runRecomposeBench({ sizes, workDir, ...(log ? { log } : {}) });
    } finally {
      await rm(workDir, { recursive: true, force: true });
    }
  }
  if (json) process.stdout.write(`${JSON.stringify({ operations: rows, recompose }, null, 2)}\n`);
  else {
    process.stdout.write(`\nbest of ${runs}; ratio < 1 means qlayer is faster\n${formatTable(rows)}\n`);
    if (recompose.length) process.stdout.write(`\nassigning an app to a running desktop, against copying its files in inside the guest (TCG)\n${formatRecomposeTable(recompose)}\n`);
  }
  return rows.some((r) => r.error) || recompose.some((r) => !r.verified) ? 1 : 0;
}

// Run only as the entry point, so other code can import the registry.
if (import.meta.url === `file://${process.argv[1]}`) {
  main().then(
    (code) => process.exit(code),
    (error: unknown) => {
      process.stderr.write(`bench: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`);
      process.exit(1);
    },
  );
}
