/**
 * The bench frame: sections registered from outside run with best-of-N timing, and a case
 * whose output fails verification is reported as a failure with no ratio, never as a win.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { formatTable, registerBenchSection, registeredBenchSections, runBench } from '../../bench/harness.js';

describe('bench harness', () => {
  it('runs registered sections, verifies outputs and reports wrong results as failures', async () => {
    let qlayerRuns = 0;
    let referenceRuns = 0;
    registerBenchSection({
      name: 'harness-test',
      cases: [
        {
          name: 'right',
          async setup(ctx) {
            await writeFile(join(ctx.dir, 'in.txt'), 'hello');
          },
          async reference(ctx) {
            referenceRuns += 1;
            await writeFile(join(ctx.dir, 'ref.txt'), (await readFile(join(ctx.dir, 'in.txt'), 'utf8')).toUpperCase());
          },
          async qlayer(ctx) {
            qlayerRuns += 1;
            await writeFile(join(ctx.dir, 'ours.txt'), (await readFile(join(ctx.dir, 'in.txt'), 'utf8')).toUpperCase());
          },
          async verify(ctx) {
            if ((await readFile(join(ctx.dir, 'ours.txt'), 'utf8')) !== (await readFile(join(ctx.dir, 'ref.txt'), 'utf8'))) throw new Error('differs');
          },
        },
        {
          name: 'wrong but fast',
          async reference() {
            await new Promise((resolve) => setTimeout(resolve, 20));
          },
          async qlayer() {},
          async verify() {
            throw new Error('output differs from qemu-img');
          },
        },
      ],
    });
    expect(registeredBenchSections().some((s) => s.name === 'harness-test')).toBe(true);
    const rows = await runBench({ runs: 2, filter: 'harness-test' });
    expect(rows).toHaveLength(2);
    expect(qlayerRuns).toBe(2);
    expect(referenceRuns).toBe(2);
    const [right, wrong] = rows;
    expect(right!.verified).toBe(true);
    expect(right!.ratio).not.toBeNull();
    expect(wrong!.verified).toBe(false);
    expect(wrong!.error).toMatch(/differs/);
    expect(wrong!.ratio).toBeNull();
    const table = formatTable(rows);
    expect(table).toMatch(/FAILED: output differs/);
    expect(table.split('\n')).toHaveLength(4);
  });
});
