/**
 * qlayer/testing/vitest: a failing test's report carries its VMs' serial logs and last agent
 * commands. A nested vitest runs a small failing test file (it boots the test guest, runs a
 * command, fails an assertion) and its JSON report is checked.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';

const run = promisify(execFile);
const repo = resolve(import.meta.dirname, '../..');
// Inside the repository, so the nested test resolves vitest from its node_modules.
const dir = join(repo, '.cache', `testing-diagnostics-${process.pid}`);

afterAll(() => rmSync(dir, { recursive: true, force: true }));

const failing = `
import { expect, test } from 'vitest';
import { boot, testGuest } from '${join(repo, 'src/testing/index.js')}';
import { useVmDiagnostics } from '${join(repo, 'src/testing/vitest.js')}';

useVmDiagnostics();

test('passes without a VM', () => {
  expect(1).toBe(1);
});

test('fails with a VM', async () => {
  await using vm = await boot({ ...(await testGuest()), memoryMiB: 256 });
  await vm.exec('echo diagnostic-marker > /dev/ttyS0; echo to-stderr >&2; exit 5');
  expect(await vm.succeed('echo actual')).toBe('expected\\n');
});
`;

describe('useVmDiagnostics', () => {
  it("attaches the failed test's VM console and agent commands to its failure, and nothing to a passing test", async () => {
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, 'failing.test.ts'), failing);
    writeFileSync(join(dir, 'vitest.config.ts'), `export default { test: { include: ['failing.test.ts'], testTimeout: 240000 } };\n`);
    const report = join(dir, 'report.json');
    const result = await run(join(repo, 'node_modules/.bin/vitest'), ['run', '--root', dir, '--reporter=json', `--outputFile=${report}`], { cwd: dir, timeout: 300_000 }).then(
      () => ({ failed: false }),
      () => ({ failed: true }),
    );
    expect(result.failed).toBe(true);
    const json = JSON.parse(readFileSync(report, 'utf8')) as { testResults: Array<{ assertionResults: Array<{ title: string; status: string; failureMessages: string[] }> }> };
    const tests = json.testResults[0]!.assertionResults;
    expect(tests.find((t) => t.title === 'passes without a VM')).toMatchObject({ status: 'passed', failureMessages: [] });
    const failed = tests.find((t) => t.title === 'fails with a VM')!;
    expect(failed.status).toBe('failed');
    const messages = failed.failureMessages.join('\n');
    expect(messages).toMatch(/expected 'actual\\n' to be 'expected\\n'/);
    expect(messages).toMatch(/=== qlayer VM qlayer-test-[0-9a-f]{12} ===/);
    expect(messages).toMatch(/--- serial console \(last 50 lines\) ---[\s\S]*QLAYER: ready[\s\S]*diagnostic-marker/);
    expect(messages).toMatch(/--- last agent commands \(2\) ---\n.*exec echo diagnostic-marker > \/dev\/ttyS0; echo to-stderr >&2; exit 5 -> exit 5; stderr: to-stderr .*\n.*exec echo actual -> exit 0/);
  }, 360_000);
});
