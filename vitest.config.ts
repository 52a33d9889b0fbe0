import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Shut-off domains of e2e desktops whose folders are gone (test/global-teardown.ts).
    globalSetup: ['test/global-teardown.ts'],
    // Interop tests spawn qemu-img many times and e2e tests boot guests under TCG;
    // on a 2-core machine, parallel files only fight over the CPU.
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 300_000,
    reporters: ['default'],
  },
});
