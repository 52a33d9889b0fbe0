/**
 * Header parse/serialize against headers qemu-img wrote: byte-exact round trips, extensions
 * decoded (backing format, data file, bitmaps, feature names), unknown extensions and
 * compatible bits preserved through a rewrite, unknown autoclear bits cleared on writable open.
 */
import { open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  Autoclear,
  backingFormatOf,
  bitmapsExtensionOf,
  Compatible,
  describeFeatures,
  externalDataFileOf,
  featureNamesOf,
  Incompatible,
  parseHeader,
  Qcow2Image,
  serializeHeader,
} from '../../src/qcow2/index.js';
import { qemuCheck, qemuCreate, qemuImg, qemuInfo, qemuIo, qemuReadRaw, sha256, tempDir } from '../helpers/qemu.js';

const MiB = 1 << 20;
let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-header-'));
});
afterAll(async () => cleanup());

async function headerOf(path: string) {
  const bytes = await readFile(path);
  return { bytes, header: parseHeader(bytes.subarray(0, 2 * MiB), bytes.length) };
}

/** Bytes of the first cluster that carry meaning: up to the end of the backing name or the end marker. */
function usedLength(header: ReturnType<typeof parseHeader>): number {
  const extensions = header.extensions.reduce((n, e) => n + 8 + Math.ceil(e.data.length / 8) * 8, 0);
  return Math.max(header.headerLength + extensions + 8, header.backingFileOffset + header.backingFileSize);
}

describe('header', () => {
  const cases: Array<[string, Record<string, string | number | boolean>, { backing?: boolean }]> = [
    ['v2', { compat: '0.10' }, {}],
    ['v2 with backing', { compat: '0.10' }, { backing: true }],
    ['v3 defaults', {}, {}],
    ['v3 512-byte clusters with backing', { cluster_size: 512 }, { backing: true }],
    ['v3 zstd, extended L2, lazy refcounts, refcount 1', { compression_type: 'zstd', extended_l2: true, lazy_refcounts: true, refcount_bits: 1 }, {}],
    ['v3 2 MiB clusters, refcount 64', { cluster_size: 2 * MiB, refcount_bits: 64 }, {}],
  ];
  for (const [name, options, extra] of cases) {
    it(`round-trips a qemu-img header byte for byte: ${name}`, async () => {
      const base = join(dir, `${name}-base.qcow2`.replace(/[ ,]/g, '_'));
      const path = join(dir, `${name}.qcow2`.replace(/[ ,]/g, '_'));
      if (extra.backing) await qemuCreate(base, 4 * MiB, {});
      await qemuCreate(path, 4 * MiB, options, extra.backing ? { backing: base, backingFormat: 'qcow2' } : {});
      const { bytes, header } = await headerOf(path);
      const out = serializeHeader(header);
      const n = usedLength(header);
      expect(Buffer.from(out.bytes.subarray(0, n)).equals(bytes.subarray(0, n))).toBe(true);
      const info = await qemuInfo(path);
      expect(header.size).toBe(info['virtual-size']);
      expect(2 ** header.clusterBits).toBe(info['cluster-size']);
      if (extra.backing) {
        expect(header.backingFile).toBe(base);
        expect(backingFormatOf(header)).toBe('qcow2');
      }
    });
  }

  it('decodes feature bits, feature names, data file and bitmaps extensions', async () => {
    const path = join(dir, 'features.qcow2');
    await qemuCreate(path, 4 * MiB, { data_file: join(dir, 'features.data'), data_file_raw: true, lazy_refcounts: true });
    await qemuImg(['bitmap', '--add', path, 'bm']);
    const { header } = await headerOf(path);
    expect(header.incompatibleFeatures & Incompatible.externalDataFile).toBe(Incompatible.externalDataFile);
    expect(header.compatibleFeatures & Compatible.lazyRefcounts).toBe(Compatible.lazyRefcounts);
    expect(header.autoclearFeatures & (Autoclear.bitmaps | Autoclear.rawExternalData)).toBe(Autoclear.bitmaps | Autoclear.rawExternalData);
    expect(externalDataFileOf(header)).toBe(join(dir, 'features.data'));
    expect(bitmapsExtensionOf(header)?.nbBitmaps).toBe(1);
    expect(featureNamesOf(header).find((f) => f.kind === 'incompatible' && f.bit === 0)?.name).toBe('dirty bit');
    expect(describeFeatures(header)).toEqual({ incompatible: ['externalDataFile'], compatible: ['lazyRefcounts'], autoclear: ['bitmaps', 'rawExternalData'] });
  });

  it('keeps unknown extensions and compatible bits through a rewrite; clears unknown autoclear bits', async () => {
    const base = join(dir, 'keep-base.qcow2');
    await qemuCreate(base, 2 * MiB, {});
    await qemuIo(base, ['write -P 0x66 0 2M']);
    const path = join(dir, 'keep.qcow2');
    await qemuCreate(path, 2 * MiB, {});
    await qemuIo(path, ['write -P 0x77 0 64k']);
    const { header } = await headerOf(path);
    const unknown = { type: 0x12345678, data: Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]) };
    const patched = serializeHeader({
      ...header,
      extensions: [...header.extensions, unknown],
      compatibleFeatures: header.compatibleFeatures | (1n << 7n),
      autoclearFeatures: header.autoclearFeatures | (1n << 9n),
    });
    const handle = await open(path, 'r+');
    await handle.write(patched.bytes, 0, 4096, 0);
    await handle.close();

    const image = await Qcow2Image.open(path, { writable: true });
    await image.setBackingFile('keep-base.qcow2', 'qcow2');
    await image.close();
    const after = (await headerOf(path)).header;
    const kept = after.extensions.find((e) => e.type === 0x12345678);
    expect(kept && Buffer.from(kept.data).equals(Buffer.from(unknown.data))).toBe(true);
    expect(after.compatibleFeatures & (1n << 7n)).toBe(1n << 7n);
    expect(after.autoclearFeatures & (1n << 9n)).toBe(0n);
    expect(after.backingFile).toBe('keep-base.qcow2');
    const check = await qemuCheck(path);
    expect(check.corruptions + check.leaks).toBe(0);
    const expected = Buffer.alloc(2 * MiB, 0x66);
    expected.fill(0x77, 0, 64 * 1024);
    expect(sha256(await qemuReadRaw(path))).toBe(sha256(expected));
  });
});
