import { loadExeca } from './external-program.js';

/** A byte range of a host file. */
export interface HostRange {
  offset: number;
  length: number;
}

/** Sort and join touching ranges, so each punch is one call. */
export function coalesceRanges(ranges: HostRange[]): HostRange[] {
  const sorted = [...ranges].sort((a, b) => a.offset - b.offset);
  const out: HostRange[] = [];
  for (const range of sorted) {
    const last = out[out.length - 1];
    if (last && range.offset <= last.offset + last.length) last.length = Math.max(last.length, range.offset + range.length - last.offset);
    else out.push({ ...range });
  }
  return out;
}

/**
 * Give the host blocks of these ranges back to the file system (FALLOCATE_PUNCH_HOLE, the file
 * keeps its length and the ranges read as zeros). Node has no fallocate(2), so this runs
 * util-linux `fallocate --punch-hole`, once per coalesced range. Returns false, changing
 * nothing, where the tool or the file system cannot punch: space is then only reused, not
 * returned, which is never wrong.
 */
export async function punchHoles(path: string, ranges: HostRange[]): Promise<boolean> {
  const { execa } = await loadExeca();
  for (const range of coalesceRanges(ranges)) {
    const result = await execa('fallocate', ['--punch-hole', '--offset', String(range.offset), '--length', String(range.length), path], { reject: false });
    if (result.exitCode !== 0) return false;
  }
  return true;
}
