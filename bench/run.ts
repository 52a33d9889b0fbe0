/**
 * `npm run bench` (after `npm run build`): every registered section, qlayer against qemu-img on
 * the same work, best of N, outputs verified. Sections register themselves on import; to add
 * one (ext4 lookups, recompose...), write bench/<name>.ts calling registerBenchSection() and
 * import it below.
 *
 *   node dist/bench/run.js [--runs N] [--filter TEXT] [--json]
 */
import { formatTable, runBench } from './harness.js';
import './qcow2-ops.js';

export { registerBenchSection, runBench, formatTable, type BenchSection, type BenchCase, type BenchRow } from './harness.js';

function argValue(name: string): string | undefined {
  const at = process.argv.indexOf(name);
  return at >= 0 ? process.argv[at + 1] : undefined;
}

async function main(): Promise<number> {
  const runs = Number(argValue('--runs') ?? 3);
  const filter = argValue('--filter');
  const json = process.argv.includes('--json');
  const rows = await runBench({ runs, filter, log: json ? undefined : (line) => process.stderr.write(`${line}\n`) });
  if (json) process.stdout.write(`${JSON.stringify(rows, null, 2)}\n`);
  else process.stdout.write(`\nbest of ${runs}; ratio < 1 means qlayer is faster\n${formatTable(rows)}\n`);
  return rows.some((r) => r.error) ? 1 : 0;
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
