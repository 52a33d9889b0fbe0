/**
 * Stand-in for a running guest when a test needs guest writes but no VM: the chain is exported
 * to raw, e2fsprogs' debugfs changes the filesystem there, and every 4 KiB block that changed is
 * written back into the top image through our engine, which is how a guest's writes land in
 * the user delta (4 KiB at a time, so placeholders share clusters with other metadata). The e2e
 * tests do the same through a real guest; this one makes every crash point cheap to test.
 */
import { readFile, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { execa } from 'execa';
import { openChain } from '../../src/chain/chain.js';
import { qemuReadRaw } from './qemu.js';

const BLOCK = 4096;

/** Run debugfs -w commands on a raw file; throws on a failed command. */
export async function debugfsWrite(rawPath: string, commands: string[]): Promise<void> {
  const result = await execa('debugfs', ['-w', '-f', '-', rawPath], { input: `${commands.join('\n')}\n`, reject: false });
  const failure = result.stderr.split('\n').find((line) => /: (.*(not found|Could not|error|Invalid)|File exists)/i.test(line) && !line.startsWith('debugfs '));
  if (result.exitCode !== 0 || failure) throw new Error(`debugfs failed: ${failure ?? result.stderr}`);
}

/** debugfs -R on a raw file (read-only), stdout. */
export async function debugfsRead(rawPath: string, request: string): Promise<string> {
  const result = await execa('debugfs', ['-R', request, rawPath], { reject: false });
  return result.stdout;
}

/** The blocks debugfs lists for a path, as disk byte ranges (fs block size given). */
export async function debugfsExtents(rawPath: string, path: string, blockSize: number): Promise<Array<{ offset: number; length: number }>> {
  const blocks = (await debugfsRead(rawPath, `blocks ${path}`)).trim().split(/\s+/).filter(Boolean).map(Number);
  const ranges: Array<{ offset: number; length: number }> = [];
  for (const block of blocks) {
    const last = ranges[ranges.length - 1];
    if (last && last.offset + last.length === block * blockSize) last.length += blockSize;
    else ranges.push({ offset: block * blockSize, length: blockSize });
  }
  return ranges;
}

export interface LeafExtent {
  logical: number;
  physical: number;
  length: number;
  unwritten: boolean;
}

/** Leaf extents as debugfs lists them (`ex PATH`). */
export async function debugfsLeaves(raw: string, path: string): Promise<LeafExtent[]> {
  const out = await debugfsRead(raw, `ex ${path}`);
  const leaves: LeafExtent[] = [];
  for (const line of out.split('\n')) {
    // " 1/ 1   3/ 20    20 -    29  1212 -  1221     10 Uninit" (a one-block extent has no "- end")
    const m = /^\s*(\d+)\/\s*(\d+)\s+\d+\/\s*\d+\s+(\d+)\s+-\s+\d+\s+(\d+)(?:\s+-\s+\d+)?\s+(\d+)\s*(Uninit)?\s*$/.exec(line);
    if (!m || m[1] !== m[2]) continue;
    leaves.push({ logical: Number(m[3]), physical: Number(m[4]), length: Number(m[5]), unwritten: m[6] === 'Uninit' });
  }
  return leaves;
}

/** debugfs's own flip of every unwritten leaf extent of `path`. */
export async function debugfsFlip(raw: string, path: string): Promise<void> {
  const commands = [`extent_open ${path}`];
  for (const e of await debugfsLeaves(raw, path)) {
    if (e.unwritten) commands.push(`goto_block ${e.logical}`, `replace_node ${e.logical} ${e.length} ${e.physical}`);
  }
  commands.push('extent_close');
  await debugfsWrite(raw, commands);
}

/** Write every 4 KiB block where `after` differs from `before` into the top image of the chain. */
export async function writeBackChanges(
  topImage: string,
  before: Buffer,
  after: Buffer,
  /** Ranges the guest wrote even though their bytes did not change (zeros over zeros). */
  forced: Array<{ offset: number; length: number }> = [],
): Promise<number> {
  // This stands in for QEMU running the desktop, which follows the chain wherever it leads; a
  // desktop's chain spans its store (desktops/NAME -> ../../bases), so allow the store's folder.
  const chain = await openChain(topImage, { writableTop: true, allowedDirectories: [resolve(dirname(topImage), '..', '..')] });
  let blocks = 0;
  try {
    const image = chain.topImage;
    for (const range of forced) await image.write(after.subarray(range.offset, range.offset + range.length), range.offset);
    for (let offset = 0; offset < after.length; offset += BLOCK) {
      const end = Math.min(after.length, offset + BLOCK);
      if (before.subarray(offset, end).equals(after.subarray(offset, end))) continue;
      // Coalesce a run of changed blocks into one write, as a guest's writeback would.
      let runEnd = end;
      while (runEnd < after.length && !before.subarray(runEnd, runEnd + BLOCK).equals(after.subarray(runEnd, runEnd + BLOCK))) runEnd += BLOCK;
      await image.write(after.subarray(offset, runEnd), offset);
      blocks += (runEnd - offset) / BLOCK;
      offset = runEnd - BLOCK;
    }
    await image.flush();
  } finally {
    await chain.close();
  }
  return blocks;
}

/**
 * Apply debugfs commands to the guest filesystem of `topImage` as if the guest ran them:
 * export, change, write the changed blocks back. `afterDebugfs` may edit the raw further
 * (e.g. zero a placeholder's blocks). Returns the raw disk after the change.
 */
export async function guestChange(
  topImage: string,
  scratchDir: string,
  commands: string[],
  afterDebugfs?: (rawPath: string, raw: Buffer) => Promise<{ raw: Buffer; forced?: Array<{ offset: number; length: number }> }>,
): Promise<Buffer> {
  const before = await qemuReadRaw(topImage);
  const rawPath = join(scratchDir, 'guest-change.raw');
  await writeFile(rawPath, before);
  if (commands.length) await debugfsWrite(rawPath, commands);
  let after: Buffer = await readFile(rawPath);
  let forced: Array<{ offset: number; length: number }> = [];
  if (afterDebugfs) ({ raw: after, forced = [] } = await afterDebugfs(rawPath, after));
  await writeBackChanges(topImage, before, after, forced);
  return after;
}
