/**
 * recheckAssigned: before a new plan, the files of apps that stay assigned are looked at again.
 * The user's deletes, replacements and truncations are made with debugfs -w on a real ext4
 * image (mke2fs -d), and debugfs's own block lists are the oracle for what the file still holds.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { recheckAssigned } from '../../src/layers/locate.js';
import type { LocatedFile } from '../../src/layers/state.js';
import { tempDir } from '../helpers/qemu.js';
import { closeOpened, debugfs, mkfs, openRaw, oracleExtents, patternBytes } from '../fs/e2fs.js';

const BLOCK = 4096;
let dir: string;
let cleanup: () => Promise<void>;
let image: string;

/** What locate would have recorded for `path` (inode, mtime, extents), read with our reader. */
async function recorded(path: string): Promise<LocatedFile> {
  const fs = await openRaw(image);
  const info = await fs.lookup(path, { follow: false });
  const extents = (await fs.extents(path)).map(({ fileOffset, diskOffset, length }) => ({ fileOffset, diskOffset, length }));
  return { app: 'app@1', path, size: info.size, payloadOffset: 0, extents, inode: info.inode, mtime: info.mtime };
}

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-recheck-'));
  const tree = join(dir, 'tree', 'opt', 'app');
  await mkdir(tree, { recursive: true });
  for (const [name, blocks] of [['deleted', 16], ['replaced', 16], ['truncated', 32], ['edited', 8], ['untouched', 24]] as const) {
    await writeFile(join(tree, name), patternBytes(blocks * BLOCK, blocks));
  }
  await writeFile(join(tree, 'empty'), '');
  image = join(dir, 'disk.raw');
  await mkfs(image, { size: 32 << 20, blockSize: BLOCK, from: join(dir, 'tree') });
});

afterAll(async () => {
  await closeOpened();
  await cleanup?.();
});

describe('recheckAssigned against what the user did in the guest', () => {
  it('releases deleted, replaced and freed blocks, and keeps what the files still hold', async () => {
    const names = ['deleted', 'replaced', 'truncated', 'edited', 'untouched', 'empty'];
    const before = await Promise.all(names.map((n) => recorded(`/opt/app/${n}`)));
    const replacement = join(dir, 'replacement');
    await writeFile(replacement, patternBytes(16 * BLOCK, 99));
    // What a user does: delete one file, replace another (a new inode), cut the blocks 16..31 out
    // of a third, and write in place into a fourth (same blocks: nothing is freed).
    await debugfs(image, ['rm /opt/app/deleted', 'rm /opt/app/replaced', `write ${replacement} /opt/app/replaced`, 'punch /opt/app/truncated 16 31', 'set_inode_field /opt/app/edited mtime 20300101000000'], true);

    const fs = await openRaw(image);
    const { files, released } = await recheckAssigned(fs, before);
    const byPath = Object.fromEntries(files.map((f) => [f.path, f]));
    expect(files.map((f) => f.path)).toEqual(before.map((f) => f.path));
    expect(Object.fromEntries(released.map((r) => [r.path, r.bytes]))).toEqual({
      '/opt/app/deleted': 16 * BLOCK,
      '/opt/app/replaced': 16 * BLOCK,
      '/opt/app/truncated': 16 * BLOCK,
    });
    expect(released.find((r) => r.path === '/opt/app/replaced')!.why).toMatch(/replaced in the guest \(inode \d+, was \d+\)/);
    expect(released.find((r) => r.path === '/opt/app/deleted')!.why).toBe('deleted in the guest');
    expect(byPath['/opt/app/deleted']!.extents).toEqual([]);
    expect(byPath['/opt/app/replaced']!.extents).toEqual([]);
    // The oracle: the blocks debugfs still lists for the truncated file are exactly what is kept.
    const oracle = (await oracleExtents(image, '/opt/app/truncated', BLOCK)).map(({ fileOffset, diskOffset, length }) => ({ fileOffset, diskOffset, length }));
    expect(oracle.reduce((n, e) => n + e.length, 0)).toBe(16 * BLOCK);
    expect(byPath['/opt/app/truncated']!.extents).toEqual(oracle);
    // Edited in place (mtime moved, same blocks) and untouched files keep every extent.
    for (const name of ['edited', 'untouched', 'empty']) expect(byPath[`/opt/app/${name}`]).toEqual(before.find((f) => f.path === `/opt/app/${name}`));
  });
});
