import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // A boot under TCG (no KVM) takes seconds, an apps boot twice that: give tests room.
    testTimeout: 300_000,
    hookTimeout: 300_000,
    // Every failing test gets its VMs' consoles and last commands in its report.
    setupFiles: ['./test/setup.ts'],
  },
});
