/**
 * Hostile or broken headers: every one must end in a typed Qcow2Error with a stable code, for
 * read-only and writable opens, without changing a byte of the file.
 */
import { copyFile, open, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openChain } from '../../src/chain/index.js';
import { decompressCluster, Qcow2Error, Qcow2Image } from '../../src/qcow2/index.js';
import { qemuCreate, qemuImg, qemuIo, tempDir } from '../helpers/qemu.js';

const MiB = 1 << 20;
let dir: string;
let cleanup: () => Promise<void>;
let pristine: string;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-bad-'));
  pristine = join(dir, 'pristine.qcow2');
  await qemuCreate(pristine, 4 * MiB, { cluster_size: 65536 });
  await qemuIo(pristine, ['write -P 7 0 1M', 'write -P 8 3M 64k']);
});
afterAll(async () => cleanup());

let n = 0;
async function patched(patch: (bytes: Buffer) => void, source = pristine): Promise<string> {
  n += 1;
  const path = join(dir, `bad-${n}.qcow2`);
  await copyFile(source, path);
  const bytes = await readFile(path);
  patch(bytes);
  const handle = await open(path, 'r+');
  await handle.write(bytes, 0, bytes.length, 0);
  await handle.close();
  return path;
}

async function expectError(path: string, code: string, modes: Array<'read' | 'write'> = ['read', 'write']): Promise<void> {
  const before = await readFile(path);
  for (const mode of modes) {
    const error = await Qcow2Image.open(path, { writable: mode === 'write' }).then(
      async (image) => {
        await image.close();
        return null;
      },
      (e: unknown) => e,
    );
    expect(error, `${mode} open of ${path}`).toBeInstanceOf(Qcow2Error);
    expect((error as Qcow2Error).code).toBe(code);
    expect((error as Error).message.length).toBeGreaterThan(10);
  }
  expect((await readFile(path)).equals(before)).toBe(true);
}

describe('bad headers give typed errors and leave the file alone', () => {
  it('bad magic', async () => {
    await expectError(await patched((b) => b.write('QFI\xfa', 0, 'latin1')), 'qcow2.bad-magic');
    await expectError(await patched((b) => b.fill(0, 0, 4)), 'qcow2.bad-magic');
  });

  it('version 4 and version 1', async () => {
    await expectError(await patched((b) => b.writeUInt32BE(4, 4)), 'qcow2.unsupported-version');
    await expectError(await patched((b) => b.writeUInt32BE(1, 4)), 'qcow2.unsupported-version');
  });

  it('cluster_bits 8 and 22', async () => {
    await expectError(await patched((b) => b.writeUInt32BE(8, 20)), 'qcow2.bad-header-field');
    await expectError(await patched((b) => b.writeUInt32BE(22, 20)), 'qcow2.bad-header-field');
  });

  it('L1 table past EOF and a huge l1_size', async () => {
    await expectError(await patched((b) => b.writeUInt32BE(0x10000000, 40 + 4)), 'qcow2.offset-past-eof');
    await expectError(await patched((b) => b.writeUInt32BE(0x7fffffff, 36)), 'qcow2.bad-header-field');
    // l1_size too small for the virtual size.
    await expectError(await patched((b) => b.writeUInt32BE(0, 36)), 'qcow2.bad-header-field');
  });

  it('unknown incompatible feature bits, named from the feature table when present', async () => {
    const path = await patched((b) => b.writeUInt32BE(1 << 20, 72 + 4));
    await expectError(path, 'qcow2.unknown-incompatible-feature');
    await expect(Qcow2Image.open(path)).rejects.toThrow(/bit 20/);
    await expectError(await patched((b) => b.writeUInt32BE(0x80000000, 72)), 'qcow2.unknown-incompatible-feature');
  });

  it('corrupt bit: readable, but refused for writing', async () => {
    const path = await patched((b) => b.writeUInt32BE(2, 72 + 4));
    const image = await Qcow2Image.open(path);
    expect(image.size).toBe(4 * MiB);
    await image.close();
    await expectError(path, 'qcow2.corrupt-flag-set', ['write']);
  });

  it('encrypted images (AES crypt_method, LUKS)', async () => {
    await expectError(await patched((b) => b.writeUInt32BE(1, 32)), 'qcow2.encrypted');
    const luks = join(dir, 'luks.qcow2');
    // qemu-img times PBKDF2 to pick the LUKS iteration count, and QEMU 7.2.x fails now and then
    // with "Unable to get accurate CPU usage" when its first timing round measures 0 ms (a QEMU
    // bug reported on qemu-devel in January 2025; seen twice here). That is qemu-img's benchmark,
    // not what this test checks, so that one error gets a few attempts.
    const create = ['create', '-q', '-f', 'qcow2', '--object', 'secret,id=sec0,data=123456', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', luks, '1M'];
    for (let attempt = 1; ; attempt += 1) {
      const result = await qemuImg(create, [0, 1]);
      if (result.exitCode === 0) break;
      if (attempt === 5 || !/accurate CPU usage/.test(result.stderr)) throw new Error(`qemu-img ${create.join(' ')}: ${result.stderr}`);
    }
    await expectError(luks, 'qcow2.encrypted');
  });

  it('bad refcount table, header_length, refcount_order, compression type, backing name', async () => {
    await expectError(await patched((b) => b.writeUInt32BE(0x12345, 48 + 4)), 'qcow2.bad-header-field');
    await expectError(await patched((b) => b.writeUInt32BE(0, 56)), 'qcow2.bad-header-field');
    await expectError(await patched((b) => b.writeUInt32BE(4096, 56)), 'qcow2.bad-header-field');
    await expectError(await patched((b) => b.writeUInt32BE(100, 100)), 'qcow2.bad-header-field');
    await expectError(await patched((b) => b.writeUInt32BE(7, 96)), 'qcow2.bad-header-field');
    await expectError(await patched((b) => b.writeUInt8(1, 104)), 'qcow2.bad-header-field');
    await expectError(await patched((b) => { b.writeUInt32BE(0, 8); b.writeUInt32BE(70000, 12); b.writeUInt32BE(10, 16); }), 'qcow2.bad-header-field');
    await expectError(await patched((b) => b.writeUInt32BE(0xffffffff, 24)), 'qcow2.bad-header-field');
    await expectError(await patched((b) => b.writeUInt32BE(0x001fffff, 24)), 'qcow2.too-large');
  });

  it('snapshot table claims that run past EOF', async () => {
    await expectError(await patched((b) => { b.writeUInt32BE(1000, 60); b.writeUInt32BE(0x7fff0000, 64 + 4); }), 'qcow2.offset-past-eof');
  });

  it('truncated file and empty file', async () => {
    const truncated = join(dir, 'truncated.qcow2');
    await copyFile(pristine, truncated);
    const handle = await open(truncated, 'r+');
    await handle.truncate(100);
    await handle.close();
    await expectError(truncated, 'qcow2.bad-header-field', ['read']);
    const empty = join(dir, 'empty.qcow2');
    await (await open(empty, 'w')).close();
    await expectError(empty, 'qcow2.bad-magic', ['read']);
  });

  it('API misuse: bad offsets and ranges are typed errors', async () => {
    const image = await Qcow2Image.open(pristine);
    await expect(image.readAt(Buffer.alloc(10), -1)).rejects.toMatchObject({ code: 'qcow2.out-of-range' });
    await expect(image.readAt(Buffer.alloc(10), 0.5)).rejects.toMatchObject({ code: 'qcow2.out-of-range' });
    await expect(image.mappingOf(4 * MiB)).rejects.toMatchObject({ code: 'qcow2.out-of-range' });
    await expect(image.mapRange(4 * MiB - 10, 11)).rejects.toMatchObject({ code: 'qcow2.out-of-range' });
    await expect(image.write(Buffer.alloc(1), 0)).rejects.toMatchObject({ code: 'qcow2.read-only' });
    const past = Buffer.alloc(100, 9);
    await image.readAt(past, 4 * MiB - 50);
    expect(past.subarray(50).every((b) => b === 0)).toBe(true);
    await image.close();
    await expect(image.readAt(Buffer.alloc(1), 0)).rejects.toMatchObject({ code: 'qcow2.closed' });
  });

  it('hostile compressed data: huge zstd windows, garbage deflate, short output', async () => {
    const huge = Uint8Array.from([0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8, 0, 0, 0, 0]);
    expect(() => decompressCluster(huge, 65536, 1)).toThrow(Qcow2Error);
    expect(() => decompressCluster(huge, 65536, 1)).toThrow(/window/);
    expect(() => decompressCluster(Uint8Array.from([1, 2, 3, 4, 5, 6, 7, 8]), 65536, 1)).toThrow(Qcow2Error);
    expect(() => decompressCluster(Uint8Array.from([0xff, 0xff, 0xff, 0xff]), 4096, 0)).toThrow(Qcow2Error);
    const { deflateRawSync } = await import('node:zlib');
    expect(() => decompressCluster(deflateRawSync(Buffer.alloc(100, 1)), 4096, 0)).toThrow(/100 bytes/);
    expect(decompressCluster(deflateRawSync(Buffer.alloc(4096, 7), { windowBits: 12 }), 4096, 0)[4095]).toBe(7);
  });

  it('missing image and missing external data file: qcow2.not-found', async () => {
    await expect(Qcow2Image.open(join(dir, 'nothing-here.qcow2'))).rejects.toMatchObject({ code: 'qcow2.not-found' });
    const path = join(dir, 'lost-data.qcow2');
    await qemuCreate(path, MiB, { data_file: join(dir, 'lost-data.raw') });
    const { rm } = await import('node:fs/promises');
    await rm(join(dir, 'lost-data.raw'));
    await expect(Qcow2Image.open(path)).rejects.toMatchObject({ code: 'qcow2.not-found' });
  });

  it('a chain through a bad image reports the bad image', async () => {
    const bad = await patched((b) => b.writeUInt32BE(4, 4));
    const top = join(dir, 'over-bad.qcow2');
    await qemuCreate(top, 4 * MiB, {});
    await qemuImg(['rebase', '-u', '-b', bad, '-F', 'qcow2', top]);
    await expect(openChain(top)).rejects.toMatchObject({ code: 'qcow2.unsupported-version' });
  });
});
