/** Directory hashes against debugfs dx_hash, for every algorithm, both char signednesses, with and without a seed. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { tempDir } from '../helpers/qemu.js';
import { HASH, dirHash } from '../../src/fs/ext4/htree.js';
import { debugfs, mkfs } from './e2fs.js';

let dir: string;
let cleanup: () => Promise<void>;
let image: string;

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-fs-hash-'));
  image = join(dir, 'h.img');
  await mkfs(image, { size: 4 * 1024 * 1024, blockSize: 1024 });
});
afterAll(async () => {
  await cleanup();
});

const NAMES = ['a', 'hello', 'file-1234', 'x'.repeat(15), 'y'.repeat(16), 'z'.repeat(17), 'long-name-'.repeat(10), 'été', '名前', '\u00ff\u00fe', 'n'.repeat(255)];
// debugfs knows the unsigned variants only by number (its name table lacks them, and an unknown
// name silently becomes atoi() = 0, the signed legacy hash).
const ALGORITHMS: Array<[string, number]> = [
  ['legacy', HASH.LEGACY],
  ['half_md4', HASH.HALF_MD4],
  ['tea', HASH.TEA],
  ['3', HASH.LEGACY_UNSIGNED],
  ['4', HASH.HALF_MD4_UNSIGNED],
  ['5', HASH.TEA_UNSIGNED],
];
const SEED_UUID = 'c0ffee00-1234-4321-8888-0123456789ab';

/** s_hash_seed words as the superblock stores that UUID (little-endian u32s over its bytes). */
function seedWords(uuid: string): number[] {
  const bytes = Buffer.from(uuid.replace(/-/g, ''), 'hex');
  return [0, 4, 8, 12].map((i) => bytes.readUInt32LE(i));
}

describe('htree hashes', () => {
  it('match debugfs dx_hash', async () => {
    const commands: string[] = [];
    const expected: Array<{ name: string; version: number; seed: number[] }> = [];
    for (const [alg, version] of ALGORITHMS) {
      for (const seeded of [false, true]) {
        for (const name of NAMES) {
          commands.push(`dx_hash -h ${alg}${seeded ? ` -s ${SEED_UUID}` : ''} "${name}"`);
          expected.push({ name, version, seed: seeded ? seedWords(SEED_UUID) : [0, 0, 0, 0] });
        }
      }
    }
    // The variants differ on bytes >= 0x80, so both are really exercised.
    expect(dirHash(Buffer.from('été'), HASH.TEA, [0, 0, 0, 0]).hash).not.toBe(dirHash(Buffer.from('été'), HASH.TEA_UNSIGNED, [0, 0, 0, 0]).hash);
    const out = await debugfs(image, commands);
    const results = [...out.matchAll(/Hash of .* is 0x([0-9a-f]+) \(minor 0x([0-9a-f]+)\)/g)];
    expect(results.length).toBe(expected.length);
    results.forEach((m, i) => {
      const { name, version, seed } = expected[i]!;
      const ours = dirHash(Buffer.from(name, 'utf8'), version, seed);
      expect({ name, version, hash: ours.hash.toString(16), minor: version % 3 === 0 ? '0' : ours.minor.toString(16) }).toEqual({
        name,
        version,
        hash: ((Number.parseInt(m[1]!, 16) & ~1) >>> 0).toString(16),
        minor: version % 3 === 0 ? '0' : Number.parseInt(m[2]!, 16).toString(16),
      });
    });
  });
});
