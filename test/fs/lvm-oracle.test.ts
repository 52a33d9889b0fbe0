/**
 * The LVM reader against lvm2 itself, on disks lvm2's tools wrote.
 *
 * Disk a.raw: GPT, partition 1 BIOS boot, partitions 2 and 3 PVs of one VG; b.raw: a whole-disk
 * PV of the same VG. LVs:
 *   root     linear, 3 segments: 8 MiB on p2, 6 MiB on p2 after `other`, 4 MiB on p3 (ext4)
 *   other    linear on p2 (a byte pattern), origin of the snapshot `cow`
 *   data     linear on p3 (a byte pattern)
 *   striped  2 stripes over p2 and p3                       -> refused, "striped"
 *   pool     thin pool (pool_tdata, pool_tmeta hidden)      -> refused, "thin-pool"
 *   thin     thin LV in pool                                -> refused, "thin"
 *   cow      old-style snapshot of other                    -> refused, "snapshot"
 *   far      linear on b.raw only                           -> from a.raw: missing PV; from b.raw: readable
 *   split    2 MiB on p2 + 2 MiB on b.raw                   -> from a.raw: missing PV
 *
 * Oracles: where the bytes are, from lvm2's own report (lvs --segments, pvs); the ext4 content
 * from debugfs on the LV's image as written; the bytes through the qcow2 path from qemu-img
 * convert. This machine's kernel has no device-mapper, so /dev/mapper cannot be the oracle here
 * (see lvm-disk.ts); the booted LVM guest (test/e2e/debian-lvm.test.ts) is the kernel's word.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createHash } from 'node:crypto';
import { copyFile, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { readVolumes } from '../../src/fs/index.js';
import { volumeSource } from '../../src/fs/lvm/mapping.js';
import { nodeFileSystem, rawFileSource } from '../../src/io/host-file.js';
import { readBytes } from '../../src/io/byte-source.js';
import { qemuImg, tempDir } from '../helpers/qemu.js';
import { makeTree, mkfs, oracleDump, oracleLs, patternBytes } from './e2fs.js';
import { addLvSections, buildLvmDisk, expectedPieces, hideAndRename, lvmUuid, type LvmDisk } from './lvm-disk.js';

const root = join(import.meta.dirname, '..', '..');
const isRoot = process.getuid?.() === 0;
const hasLvm = await execa('lvm', ['version'], { reject: false }).then((r) => r.exitCode === 0, () => false);

async function qlayer(args: string[]): Promise<{ stdout: string; stderr: string; exitCode: number; raw: Buffer }> {
  const result = await execa('node', [join(root, 'bin', 'qlayer.js'), ...args], { reject: false, timeout: 120_000, encoding: 'buffer', stripFinalNewline: false });
  const stdout = Buffer.from(result.stdout);
  return { stdout: stdout.toString(), stderr: Buffer.from(result.stderr).toString(), exitCode: result.exitCode ?? -1, raw: stdout };
}

function sha256(data: Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

/**
 * One LV section of a vgcfgbackup text with a single segment starting at extent 0, in lvm's own
 * syntax: strings quoted, numbers bare. `fields` are the segment's type-specific settings.
 */
function singleSegmentLv(lv: { name: string; seed: number; status: string[]; extents: number; type: string; fields: Record<string, string | number> }): string {
  const segment = { start_extent: 0, extent_count: lv.extents, type: lv.type, ...lv.fields };
  const lines = Object.entries(segment).map(([key, value]) => `    ${key} = ${typeof value === 'number' ? value : `"${value}"`}`);
  return [
    `${lv.name} {`,
    `  id = "${lvmUuid(lv.seed)}"`,
    `  status = [${lv.status.map((s) => `"${s}"`).join(', ')}]`,
    '  flags = []',
    '  segment_count = 1',
    '  segment1 {',
    ...lines,
    '  }',
    '}',
    '',
  ].join('\n');
}

/** The LV types lvm creates only through device-mapper, written into the backup as lvm stores them. */
const SNAPSHOT_AND_THIN = (vgText: string): string => {
  let text = hideAndRename(vgText, 'tpd', 'pool_tdata');
  text = hideAndRename(text, 'tpm', 'pool_tmeta');
  const visible = ['READ', 'WRITE', 'VISIBLE'];
  const sections = [
    singleSegmentLv({
      name: 'pool',
      seed: 1,
      status: visible,
      extents: 4,
      type: 'thin-pool',
      fields: { metadata: 'pool_tmeta', pool: 'pool_tdata', transaction_id: 1, chunk_size: 128, discards: 'passdown', zero_new_blocks: 1 },
    }),
    singleSegmentLv({ name: 'thin', seed: 2, status: visible, extents: 8, type: 'thin', fields: { thin_pool: 'pool', transaction_id: 0, device_id: 1 } }),
    singleSegmentLv({ name: 'snapshot0', seed: 3, status: ['READ'], extents: 4, type: 'snapshot', fields: { chunk_size: 8, origin: 'other', cow_store: 'cow' } }),
  ];
  return addLvSections(text, `\n${sections.join('')}`);
};

describe.skipIf(!isRoot || !hasLvm)('LVM2 logical volumes against lvm2 (runs as root; needs lvm2)', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let disk: LvmDisk | undefined;
  let vg: string;
  let a: string;
  let b: string;
  let rootImage: string;
  const patterns = new Map<string, Buffer>();

  /** Write `data` into the LV as lvm says it is laid out (the way the kernel would, through dm-linear). */
  async function writeThroughLvm(lv: string, data: Buffer): Promise<void> {
    for (const piece of expectedPieces(disk!, lv)) {
      const file = await open(piece.image, 'r+');
      try {
        await file.write(data, piece.offset, piece.length, piece.diskOffset);
      } finally {
        await file.close();
      }
    }
  }

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir('qlayer-lvm-'));
    vg = `qlt${process.pid}${Math.random().toString(36).slice(2, 7)}`;
    const lv = (...args: string[]): string[] => ['lvcreate', '-q', '-an', '-Zn', '-Wn', ...args];
    disk = await buildLvmDisk({
      dir,
      vg,
      images: [
        { name: 'a.raw', size: 96 * 1024 * 1024, gpt: ['-n1:2048:+1M', '-t1:ef02', '-n2:0:+40M', '-t2:8e00', '-n3:0:0', '-t3:8e00'], pvPartitions: [2, 3] },
        { name: 'b.raw', size: 16 * 1024 * 1024, pvPartitions: [] },
      ],
      steps: [
        lv('-L', '8M', '-n', 'root', vg, '$PV{a.raw:2}'),
        lv('-L', '4M', '-n', 'other', vg, '$PV{a.raw:2}'),
        ['lvextend', '-q', '-L', '+6M', `${vg}/root`, '$PV{a.raw:2}'],
        ['lvextend', '-q', '-L', '+4M', `${vg}/root`, '$PV{a.raw:3}'],
        lv('-L', '6M', '-n', 'data', vg, '$PV{a.raw:3}'),
        lv('-i2', '-I64k', '-L', '4M', '-n', 'striped', vg, '$PV{a.raw:2}', '$PV{a.raw:3}'),
        lv('-L', '4M', '-n', 'far', vg, '$PV{b.raw:0}'),
        lv('-L', '2M', '-n', 'split', vg, '$PV{a.raw:2}'),
        ['lvextend', '-q', '-L', '+2M', `${vg}/split`, '$PV{b.raw:0}'],
        lv('-L', '4M', '-n', 'tpd', vg, '$PV{a.raw:3}'),
        lv('-L', '4M', '-n', 'tpm', vg, '$PV{a.raw:3}'),
        lv('-L', '4M', '-n', 'cow', vg, '$PV{a.raw:2}'),
      ],
      editMetadata: SNAPSHOT_AND_THIN,
    });
    a = join(dir, 'a.raw');
    b = join(dir, 'b.raw');
    // Data goes where lvm says each LV is: an ext4 filesystem into root, patterns elsewhere.
    const tree = join(dir, 'tree');
    await makeTree(tree, {
      'etc/hostname': 'lvm-guest\n',
      'opt/app/big.bin': patternBytes(5 * 1024 * 1024 + 123, 7),
      'opt/app/small.txt': 'hello from an LV\n',
      'home/user/notes': patternBytes(40_000, 9),
    });
    rootImage = join(dir, 'root.img');
    const rootBytes = expectedPieces(disk, 'root').reduce((n, p) => n + p.length, 0);
    await mkfs(rootImage, { size: rootBytes, blockSize: 4096, from: tree });
    await writeThroughLvm('root', await readFile(rootImage));
    for (const [name, seed] of [['other', 11], ['data', 12], ['far', 13]] as const) {
      const bytes = patternBytes(expectedPieces(disk, name).reduce((n, p) => n + p.length, 0), seed);
      patterns.set(name, bytes);
      await writeThroughLvm(name, bytes);
    }
  }, 240_000);

  afterAll(async () => {
    await disk?.release();
    await cleanup?.();
  });

  it('lvm2 reports the layout the test relies on (three segments for root, the refused types)', () => {
    const rootSegments = disk!.segments.filter((s) => s.lv === 'root');
    expect(rootSegments.map((s) => s.segtype)).toEqual(['linear', 'linear', 'linear']);
    expect(new Set(rootSegments.map((s) => s.peRanges[0]!.device)).size).toBe(2);
    const types = Object.fromEntries(disk!.segments.map((s) => [s.lv, s.segtype]));
    expect(types).toMatchObject({ striped: 'striped', pool: 'thin-pool', thin: 'thin', pool_tdata: 'linear', pool_tmeta: 'linear' });
  });

  it('maps every linear LV exactly where lvm2 says its extents are', async () => {
    const file = await nodeFileSystem.open(a, 'read');
    try {
      const { volumes } = await readVolumes(await rawFileSource(file));
      for (const name of ['root', 'other', 'data']) {
        const found = volumes.find((v) => v.name === `${vg}/${name}`);
        const expected = expectedPieces(disk!, name);
        // lvm lists adjacent segments separately; the reader merges them: compare byte by byte ranges.
        const flat = (pieces: Array<{ offset: number; diskOffset: number; length: number }>): string[] =>
          pieces.flatMap((p) => Array.from({ length: p.length / disk!.extentSize }, (_, i) => `${p.offset + i * disk!.extentSize}@${p.diskOffset + i * disk!.extentSize}`));
        expect(flat(found!.lvm!.pieces!), name).toEqual(flat(expected));
        expect(found!.length).toBe(expected.reduce((n, p) => n + p.length, 0));
      }
      expect(volumes.find((v) => v.name === `${vg}/root`)!.lvm!.pieces!.length).toBe(3);
    } finally {
      await file.close();
    }
  });

  it('reads each linear LV byte for byte as written through lvm2\'s layout', async () => {
    const file = await nodeFileSystem.open(a, 'read');
    try {
      const source = await rawFileSource(file);
      const { volumes } = await readVolumes(source);
      const read = async (name: string): Promise<Buffer> => {
        const v = volumes.find((x) => x.name === `${vg}/${name}`)!;
        return readBytes(volumeSource(source, v.lvm!.pieces!, v.length), 0, v.length);
      };
      expect(sha256(await read('root'))).toBe(sha256(await readFile(rootImage)));
      expect(sha256(await read('other'))).toBe(sha256(patterns.get('other')!));
      expect(sha256(await read('data'))).toBe(sha256(patterns.get('data')!));
    } finally {
      await file.close();
    }
  });

  it('fs partitions lists the partitions, the PVs\' VG and every visible LV, with --json', async () => {
    const json = await qlayer(['fs', 'partitions', a, '--json']);
    expect(json.exitCode, json.stderr).toBe(0);
    const entries = JSON.parse(json.stdout) as Array<{ index: number; scheme: string; type: string; name?: string; linux: boolean; lvm?: { refused?: string } }>;
    expect(entries.filter((e) => e.scheme === 'gpt').map((e) => e.index)).toEqual([1, 2, 3]);
    const lvs = entries.filter((e) => e.scheme === 'lvm');
    // lvm2's own list of visible LVs is the oracle for which LVs exist.
    const visible = JSON.parse(await disk!.lvm(['lvs', '--reportformat', 'json', '-o', 'lv_name', vg])) as { report: Array<{ lv: Array<{ lv_name: string }> }> };
    expect(lvs.map((e) => e.name).sort()).toEqual(visible.report[0]!.lv.map((l) => `${vg}/${l.lv_name}`).sort());
    const byName = Object.fromEntries(lvs.map((e) => [e.name!.split('/')[1]!, e]));
    expect(byName.root).toMatchObject({ type: 'linear', linux: true });
    expect(byName.root!.lvm?.refused).toBeUndefined();
    expect(byName.striped!.type).toBe('striped');
    expect(byName.thin!.type).toBe('thin');
    expect(byName.pool!.type).toBe('thin-pool');
    expect(byName.cow!.lvm?.refused).toMatch(/snapshot/);
    expect(byName.far!.lvm?.refused).toMatch(/not on this disk/);
    const text = await qlayer(['fs', 'partitions', a]);
    expect(text.stdout).toContain(`${vg}/root\tlvm\tlinear`);
    expect(text.stdout).toMatch(new RegExp(`^2\\tgpt\\t.*LVM PV of VG ${vg}$`, 'm'));
  });

  for (const format of ['raw', 'qcow2'] as const) {
    it(`fs ls, cat and extents on VG/root through the ${format} path agree with debugfs`, async () => {
      let image = a;
      if (format === 'qcow2') {
        image = join(dir, 'a.qcow2');
        await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', a, image]);
      }
      const ls = await qlayer(['fs', 'ls', image, '/opt/app', '--partition', `${vg}/root`, '--json']);
      expect(ls.exitCode, ls.stderr).toBe(0);
      const names = (JSON.parse(ls.stdout) as Array<{ name: string; inode: number }>).map((e) => [e.name, e.inode]).sort();
      expect(names).toEqual((await oracleLs(rootImage, '/opt/app')).map((e) => [e.name, e.inode]).sort());
      for (const path of ['/opt/app/big.bin', '/opt/app/small.txt', '/home/user/notes', '/etc/hostname']) {
        const cat = await qlayer(['fs', 'cat', image, path, '--partition', `${vg}/root`]);
        expect(cat.exitCode, cat.stderr).toBe(0);
        expect(sha256(cat.raw), path).toBe(sha256(await oracleDump(rootImage, path, dir)));
      }
      // Without --partition: the only LV holding an ext filesystem is the one chosen.
      const auto = await qlayer(['fs', 'cat', image, '/etc/hostname']);
      expect(auto.stdout).toBe('lvm-guest\n');
      // Extents are virtual-disk bytes: each one, read from the disk image, is the file's bytes.
      const stat = await qlayer(['fs', 'extents', image, '/opt/app/big.bin', '--partition', `${vg}/root`, '--json']);
      const extents = JSON.parse(stat.stdout) as Array<{ fileOffset: number; diskOffset: number; length: number }>;
      const big = await oracleDump(rootImage, '/opt/app/big.bin', dir);
      const rawDisk = await open(a, 'r');
      try {
        for (const e of extents) {
          const buffer = Buffer.alloc(Math.min(e.length, big.length - e.fileOffset));
          await rawDisk.read(buffer, 0, buffer.length, e.diskOffset);
          expect(buffer.equals(big.subarray(e.fileOffset, e.fileOffset + buffer.length)), `extent at file offset ${e.fileOffset}`).toBe(true);
        }
      } finally {
        await rawDisk.close();
      }
      expect(extents.reduce((n, e) => n + e.length, 0)).toBeGreaterThanOrEqual(big.length);
    }, 120_000);
  }

  it('refuses thin, thin-pool, striped, snapshot and hidden LVs by name and type', async () => {
    const cases: Array<[string, RegExp]> = [
      ['thin', /LV \S+\/thin has type "thin"/],
      ['pool', /LV \S+\/pool has type "thin-pool"/],
      ['striped', /LV \S+\/striped is striped over 2 PVs/],
      ['cow', /LV \S+\/cow is a snapshot of \S+\/other/],
      ['pool_tdata', /LV \S+\/pool_tdata is a hidden internal volume/],
    ];
    for (const [name, message] of cases) {
      const result = await qlayer(['fs', 'ls', a, '/', '--partition', `${vg}/${name}`]);
      expect(result.exitCode, name).not.toBe(0);
      expect(result.stderr, name).toMatch(message);
    }
    const json = await qlayer(['fs', 'ls', a, '/', '--partition', `${vg}/thin`, '--json']);
    expect(json.stdout + json.stderr).toContain('fs.lvm-unsupported');
  });

  it('names the missing PV of an LV with extents on another disk; reads the LV from the disk that has it', async () => {
    const bUuid = [...disk!.pvs.entries()].find(([device]) => disk!.loops.find((l) => l.device === device)?.image === b)![1].uuid;
    for (const name of ['far', 'split']) {
      const result = await qlayer(['fs', 'ls', a, '/', '--partition', `${vg}/${name}`]);
      expect(result.exitCode).not.toBe(0);
      expect(result.stderr).toContain(`LV ${vg}/${name} has extents on PV`);
      expect(result.stderr).toContain(bUuid);
    }
    // b.raw is a whole-disk PV: the VG's metadata is on it too, and `far` lies wholly on it.
    const file = await nodeFileSystem.open(b, 'read');
    try {
      const source = await rawFileSource(file);
      const { volumes } = await readVolumes(source);
      const far = volumes.find((v) => v.name === `${vg}/far`)!;
      expect(far.index).toBe(0);
      expect(sha256(await readBytes(volumeSource(source, far.lvm!.pieces!, far.length), 0, far.length))).toBe(sha256(patterns.get('far')!));
      expect(volumes.find((v) => v.name === `${vg}/root`)!.lvm!.refused).toMatch(/not on this disk/);
    } finally {
      await file.close();
    }
  });

  it('corrupt metadata: one bad copy falls back to the other PV\'s; both bad is a clear error, and nothing is written', async () => {
    const copy = join(dir, 'corrupt.raw');
    await copyFile(a, copy);
    // The current metadata text of each PV on a.raw: mda header at PV byte 4096, raw_locn at +40.
    const parts = (JSON.parse((await qlayer(['fs', 'partitions', a, '--json'])).stdout) as Array<{ index: number; scheme: string; offset: number }>).filter(
      (p) => p.scheme === 'gpt' && p.index >= 2,
    );
    const flipText = async (pvOffset: number): Promise<void> => {
      const handle = await open(copy, 'r+');
      try {
        const header = Buffer.alloc(512);
        await handle.read(header, 0, 512, pvOffset + 4096);
        const textOffset = Number(header.readBigUInt64LE(40));
        const byte = Buffer.alloc(1);
        await handle.read(byte, 0, 1, pvOffset + 4096 + textOffset + 20);
        byte[0] = byte[0]! ^ 0x20;
        await handle.write(byte, 0, 1, pvOffset + 4096 + textOffset + 20);
      } finally {
        await handle.close();
      }
    };
    await flipText(parts[0]!.offset);
    const one = await qlayer(['fs', 'cat', copy, '/etc/hostname', '--partition', `${vg}/root`]);
    expect(one.exitCode, one.stderr).toBe(0);
    expect(one.stdout).toBe('lvm-guest\n');
    const warned = await qlayer(['fs', 'partitions', copy]);
    expect(warned.stdout).toMatch(/warning: LVM metadata is corrupt: partition 2: metadata area at byte 4096: metadata text checksum mismatch/);

    await flipText(parts[1]!.offset);
    // b.raw's copy is not on this disk: with both copies here damaged there is no metadata left.
    const before = sha256(await readFile(copy));
    const both = await qlayer(['fs', 'cat', copy, '/etc/hostname', '--partition', `${vg}/root`]);
    expect(both.exitCode).not.toBe(0);
    expect(both.stderr).toMatch(/LVM metadata is corrupt: partition 2: .*checksum mismatch/);
    const auto = await qlayer(['fs', 'cat', copy, '/etc/hostname']);
    expect(auto.stderr).toMatch(/LVM metadata is corrupt/);
    expect(sha256(await readFile(copy))).toBe(before);
  });
});
