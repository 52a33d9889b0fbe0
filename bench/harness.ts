/**
 * The benchmark frame: sections register cases; each case runs the same work once with qlayer and
 * once with the reference tool (qemu-img), best of N, and verifies the outputs so that a fast but
 * wrong result is reported as a failure, never as a win. Other subsystems (ext4 lookups,
 * recompose) add their own sections with registerBenchSection().
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';

/** One measured operation: the same job done by qlayer and by the reference. */
export interface BenchCase {
  name: string;
  /** Build inputs once (in ctx.dir); not timed. */
  setup?(ctx: BenchContext): Promise<void>;
  /** Timed: qlayer doing the job. Called once per repetition; must overwrite its own outputs. */
  qlayer(ctx: BenchContext): Promise<void>;
  /** Timed: qemu-img (or another reference) doing the same job. Omit when there is none. */
  reference?(ctx: BenchContext): Promise<void>;
  /**
   * Not timed: called before every timed run of either tool (e.g. remove the previous outputs,
   * so that unlinking 512 MiB of page cache is not counted as part of a convert).
   */
  reset?(ctx: BenchContext): Promise<void>;
  /** Not timed: throw if qlayer's output is wrong (e.g. `qemu-img compare` against the reference). */
  verify?(ctx: BenchContext): Promise<void>;
  /** At least this many runs of each tool, whatever --runs says (for short, noisy timings). */
  minRuns?: number;
  /** Which run to report: the best (default) or the median (whole processes on a shared machine). */
  statistic?: 'best' | 'median';
}

export interface BenchSection {
  name: string;
  cases: BenchCase[];
}

export interface BenchContext {
  /** A temporary folder for this section, deleted afterwards. */
  dir: string;
  /** Scratch values a case shares between setup, runs and verify. */
  state: Map<string, unknown>;
}

export interface BenchRow {
  section: string;
  case: string;
  qlayerMs: number | null;
  referenceMs: number | null;
  /** qlayer / reference: below 1 means qlayer is faster. */
  ratio: number | null;
  verified: boolean | null;
  /** How the times were taken from the runs (see BenchCase.statistic). */
  statistic?: string;
  error?: string;
}

const sections: BenchSection[] = [];

/** Add a section to the benchmark (call at module load; `npm run bench` runs them in order). */
export function registerBenchSection(section: BenchSection): void {
  sections.push(section);
}

export function registeredBenchSections(): readonly BenchSection[] {
  return sections;
}

/**
 * Flush dirty pages before each timed run (untimed), so that one run does not pay for the
 * writeback of the previous run's output.
 */
async function settle(): Promise<void> {
  await new Promise<void>((resolve) => execFile('sync', () => resolve()));
}

async function timed(job: () => Promise<void>, reset?: () => Promise<void>): Promise<number> {
  await reset?.();
  await settle();
  const start = performance.now();
  await job();
  return performance.now() - start;
}

export interface RunOptions {
  runs?: number;
  /** Only sections/cases whose "section/case" name contains this string. */
  filter?: string;
  log?: (line: string) => void;
}

/** Run every registered section (or those matching the filter) and return one row per case. */
export async function runBench(options: RunOptions = {}): Promise<BenchRow[]> {
  const runs = options.runs ?? 3;
  const log = options.log ?? (() => {});
  const rows: BenchRow[] = [];
  for (const section of sections) {
    const cases = section.cases.filter((c) => !options.filter || `${section.name}/${c.name}`.includes(options.filter));
    if (cases.length === 0) continue;
    const dir = await mkdtemp(join(tmpdir(), `qlayer-bench-${section.name.replace(/\W+/g, '-')}-`));
    try {
      for (const benchCase of cases) {
        const ctx: BenchContext = { dir, state: new Map() };
        const row: BenchRow = { section: section.name, case: benchCase.name, qlayerMs: null, referenceMs: null, ratio: null, verified: null };
        try {
          log(`${section.name}/${benchCase.name}: setup`);
          await benchCase.setup?.(ctx);
          // Runs alternate (reference first each round), so both tools see the same cache and
          // machine state; the best (or the median) of each is kept.
          const referenceTimes: number[] = [];
          const qlayerTimes: number[] = [];
          const count = Math.max(runs, benchCase.minRuns ?? 0);
          for (let i = 0; i < count; i += 1) {
            const reset = benchCase.reset && (() => benchCase.reset!(ctx));
            if (benchCase.reference) referenceTimes.push(await timed(() => benchCase.reference!(ctx), reset));
            qlayerTimes.push(await timed(() => benchCase.qlayer(ctx), reset));
          }
          const pick = benchCase.statistic === 'median' ? median : (times: number[]) => Math.min(...times);
          if (benchCase.statistic === 'median') row.statistic = `median of ${count}`;
          if (benchCase.reference) row.referenceMs = pick(referenceTimes);
          row.qlayerMs = pick(qlayerTimes);
          if (benchCase.verify) {
            await benchCase.verify(ctx);
            row.verified = true;
          }
          if (row.referenceMs !== null && row.referenceMs > 0) row.ratio = row.qlayerMs / row.referenceMs;
        } catch (error) {
          row.verified = false;
          row.error = error instanceof Error ? error.message : String(error);
        }
        rows.push(row);
        log(formatRow(row));
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }
  return rows;
}

function median(times: number[]): number {
  const sorted = [...times].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? sorted[middle]! : (sorted[middle - 1]! + sorted[middle]!) / 2;
}

function ms(value: number | null): string {
  return value === null ? '-' : `${value.toFixed(1)} ms`;
}

function formatRow(row: BenchRow): string {
  const verdict = row.error ? `FAILED: ${row.error}` : row.verified === null ? 'not verified' : 'verified';
  return `${row.section}/${row.case}: qlayer ${ms(row.qlayerMs)}, qemu-img ${ms(row.referenceMs)}, ratio ${row.ratio === null ? '-' : row.ratio.toFixed(2)} (${verdict})`;
}

/** A plain-text table of the results. */
export function formatTable(rows: readonly BenchRow[]): string {
  const header = ['section', 'case', 'qlayer', 'qemu-img', 'qlayer/qemu-img', 'output'];
  const body = rows.map((row) => [
    row.section,
    row.statistic ? `${row.case} [${row.statistic}]` : row.case,
    ms(row.qlayerMs),
    ms(row.referenceMs),
    row.ratio === null ? '-' : row.ratio.toFixed(2),
    row.error ? `FAILED: ${row.error}` : row.verified === null ? '-' : 'ok',
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join('  ').trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...body.map(line)].join('\n');
}
