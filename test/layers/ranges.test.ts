import { describe, expect, it } from 'vitest';
import { classifyClusters, findOverlap, mergeRanges } from '../../src/layers/ranges.js';

describe('mergeRanges', () => {
  it('sorts, merges touching and overlapping ranges, drops empty ones', () => {
    expect(
      mergeRanges([
        { offset: 8192, length: 4096 },
        { offset: 0, length: 4096 },
        { offset: 4096, length: 100 },
        { offset: 9000, length: 5000 },
        { offset: 50, length: 0 },
      ]),
    ).toEqual([
      { offset: 0, length: 4196 },
      { offset: 8192, length: 5808 },
    ]);
  });
});

describe('findOverlap', () => {
  it('finds the first overlapping pair and accepts touching ranges', () => {
    expect(findOverlap([{ offset: 0, length: 10 }, { offset: 10, length: 5 }])).toBeNull();
    const pair = findOverlap([{ offset: 20, length: 10 }, { offset: 0, length: 21 }]);
    expect(pair).toEqual([{ offset: 0, length: 21 }, { offset: 20, length: 10 }]);
  });
});

describe('classifyClusters', () => {
  const K = 1024;
  it('a placeholder starting 4 KiB into a 64 KiB cluster is partial there, full after', () => {
    // The case TEST-GUEST.md saw: a directory block shares the first cluster.
    const coverage = classifyClusters([{ offset: 4 * K, length: 200 * K }], 64 * K);
    expect(coverage.full).toEqual([1, 2]);
    expect(coverage.partial).toEqual([
      { offset: 4 * K, length: 60 * K },
      { offset: 192 * K, length: 12 * K },
    ]);
  });
  it('ranges from different files that together fill a cluster make it full', () => {
    const coverage = classifyClusters(
      [
        { offset: 0, length: 32 * K },
        { offset: 32 * K, length: 32 * K },
      ],
      64 * K,
    );
    expect(coverage).toEqual({ full: [0], partial: [] });
  });
  it('a range inside one cluster is one partial piece', () => {
    expect(classifyClusters([{ offset: 70 * K, length: 4 * K }], 64 * K)).toEqual({
      full: [],
      partial: [{ offset: 70 * K, length: 4 * K }],
    });
  });
  it('matches a byte-by-byte model on random ranges', () => {
    let seed = 42;
    const random = (n: number): number => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    for (let round = 0; round < 200; round++) {
      const clusterSize = 2 ** (9 + random(5));
      const ranges = Array.from({ length: 1 + random(6) }, () => ({ offset: random(40_000), length: random(9000) }));
      const covered = new Uint8Array(60_000);
      for (const r of ranges) covered.fill(1, r.offset, r.offset + r.length);
      const { full, partial } = classifyClusters(ranges, clusterSize);
      const model = new Uint8Array(60_000);
      for (const c of full) model.fill(1, c * clusterSize, (c + 1) * clusterSize);
      for (const p of partial) {
        // A partial piece never lies in a full cluster, and never fills a whole cluster.
        expect(full).not.toContain(Math.floor(p.offset / clusterSize));
        model.fill(1, p.offset, p.offset + p.length);
      }
      expect(Buffer.from(model).equals(Buffer.from(covered))).toBe(true);
      for (const c of full) expect(covered.subarray(c * clusterSize, (c + 1) * clusterSize).every((b) => b === 1)).toBe(true);
    }
  });
});
