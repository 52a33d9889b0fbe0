/**
 * The lookup benchmark's own check at a small scale: locating 2,000 files in an 8 GiB sparse
 * ext4 agrees with debugfs block for block and reads a few MiB, not the disk.
 */
import { describe, expect, it } from 'vitest';
import { measureFsLookups } from '../../bench/fs-lookups.js';

describe('bench/fs-lookups', () => {
  it('locates 2,000 files in an 8 GiB filesystem reading only metadata it needs', async () => {
    const result = await measureFsLookups({ files: 2000, runs: 1 }); // throws if any block list differs from debugfs
    expect(result.imageBytes).toBe(8 * 1024 ** 3);
    expect(result.qlayerBytesRead).toBeGreaterThan(0);
    expect(result.qlayerBytesRead).toBeLessThan(16 * 1024 * 1024);
    console.log(`fs lookups: ${JSON.stringify(result)}`);
  });
});
