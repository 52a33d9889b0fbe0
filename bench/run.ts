/**
 * `npm run bench` (after `npm run build`): every registered section, qlayer against qemu-img on
 * the same work, best of N, outputs verified. Sections register themselves on import; to add
 * one (ext4 lookups, recompose...), write bench/<name>.ts calling registerBenchSection() and
 * import it below.
 *
 *   node dist/bench/run.js [--runs N] [--filter TEXT] [--json] [--assign-sizes 10,100,1024,4096] [--no-fleet]
 *
 * The assign section boots real guests (libvirt, TCG), runs once per size, then measures host
 * bytes per desktop and ten desktops; it is selected like the others with --filter assign.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { formatTable, runBench } from './harness.js';
import './qcow2-ops.js';
import './fs-lookups.js';
import './testing.js';
import './whole-process.js';
import { formatAssignBench, runAssignBench, type AssignBench } from './recompose.js';

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
  let assign: AssignBench | null = null;
  if (!filter || 'assign'.includes(filter) || filter.startsWith('assign') || filter.startsWith('recompose')) {
    const sizes = (argValue('--assign-sizes') ?? argValue('--recompose-sizes') ?? '10,100,1024,4096').split(',').map((mib) => Number(mib) * 1024 * 1024);
    const workDir = await mkdtemp(join(tmpdir(), 'qlayer-bench-assign-'));
    try {
      assign = await runAssignBench({ sizes, workDir, fleet: !process.argv.includes('--no-fleet'), ...(log ? { log } : {}) });
    } finally {
      await rm(workDir, { recursive: true, force: true });
    }
  }
  if (json) process.stdout.write(`${JSON.stringify({ operations: rows, assign }, null, 2)}\n`);
  else {
    process.stdout.write(`\nbest of ${runs} (rows marked [median of N]: the median of N runs); ratio < 1 means qlayer is faster\n${formatTable(rows)}\n`);
    if (assign) process.stdout.write(`\n${formatAssignBench(assign)}\n`);
  }
  const assignFailed = assign !== null && (assign.rows.some((r) => !r.verified) || assign.fleet?.verified === false);
  return rows.some((r) => r.error) || assignFailed ? 1 : 0;
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
