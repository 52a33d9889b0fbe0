/** A byte range on the virtual disk. */
export interface DiskRange {
  offset: number;
  length: number;
}

/** Sort and merge overlapping or touching ranges; drops empty ones. */
export function mergeRanges(ranges: Iterable<DiskRange>): DiskRange[] {
  const sorted = [...ranges].filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset);
  const merged: DiskRange[] = [];
  for (const range of sorted) {
    const last = merged[merged.length - 1];
    if (last && range.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, range.offset + range.length - last.offset);
    } else {
      merged.push({ ...range });
    }
  }
  return merged;
}

/** Do any two of these ranges overlap? Returns the first overlapping pair, or null. */
export function findOverlap<T extends DiskRange>(ranges: T[]): [T, T] | null {
  const sorted = [...ranges].sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < sorted.length; i++) {
    const previous = sorted[i - 1]!;
    const current = sorted[i]!;
    if (current.offset < previous.offset + previous.length) return [previous, current];
  }
  return null;
}

/**
 * How a set of ranges covers a layer's clusters. `full` clusters lie wholly inside the ranges and
 * can be dropped from the user delta, so reads fall through to the apps layer; `partial` are the
 * pieces of the ranges that share a cluster with other data, which must be patched in place.
 */
export interface ClusterCoverage {
  full: number[];
  partial: DiskRange[];
}

export function classifyClusters(ranges: Iterable<DiskRange>, clusterSize: number): ClusterCoverage {
  const full: number[] = [];
  const partial: DiskRange[] = [];
  for (const { offset, length } of mergeRanges(ranges)) {
    const end = offset + length;
    const firstFull = Math.ceil(offset / clusterSize);
    const endFull = Math.floor(end / clusterSize);
    if (firstFull >= endFull) {
      partial.push({ offset, length });
      continue;
    }
    if (offset < firstFull * clusterSize) partial.push({ offset, length: firstFull * clusterSize - offset });
    for (let cluster = firstFull; cluster < endFull; cluster++) full.push(cluster);
    if (end > endFull * clusterSize) partial.push({ offset: endFull * clusterSize, length: end - endFull * clusterSize });
  }
  return { full, partial };
}
