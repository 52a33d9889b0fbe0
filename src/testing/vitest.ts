/**
 * qlayer/testing/vitest: when a test fails, put its VMs' serial consoles and last agent
 * commands into the failure. Call once per test file (or in a setupFiles module):
 *
 *   import { useVmDiagnostics } from 'qlayer/testing/vitest';
 *   useVmDiagnostics();
 *
 * "Its VMs" are those booted or used (any method) during the test, including ones already
 * closed by `await using` when the failure is reported.
 */
import { beforeEach } from 'vitest';
import { describeVm, mark, usedSince } from './diagnostics.js';

export interface VmDiagnosticsOptions {
  /** Console lines per VM (default 50). */
  serialLines?: number;
  /** Agent commands per VM (default 10). */
  commands?: number;
}

export function useVmDiagnostics(options: VmDiagnosticsOptions = {}): void {
  beforeEach((context) => {
    const since = mark();
    context.onTestFailed(({ task }) => {
      const vms = usedSince(since);
      if (vms.length === 0) return;
      const text = vms.map((vm) => describeVm(vm, options)).join('\n\n');
      // An extra error entry: every reporter prints it with the failure, and the JSON
      // reporter's failureMessages carry it, so CI logs show the console next to the assertion.
      task.result?.errors?.push({ name: 'QlayerVmDiagnostics', message: text, stack: `QlayerVmDiagnostics: ${text}` });
    });
  });
}
