/**
 * Chain opening: names are plain files resolved against the referring image, formats are never
 * probed, loops and depth are capped, confinement holds after symlinks, shared layers are
 * read-only, and a refused chain leaves every file byte-identical.
 */
import { mkdir, open, readFile, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openChain } from '../../src/chain/index.js';
import { assertPlainFileName } from '../../src/qcow2/referenced-names.js';
import { createImage, ExtensionType, parseHeader, Qcow2Error, Qcow2Image, serializeHeader } from '../../src/qcow2/index.js';
import { qemuCreate, qemuImg, qemuIo, qemuReadRaw, sha256, tempDir } from '../helpers/qemu.js';

const MiB = 1 << 20;
let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-chain-'));
});
afterAll(async () => cleanup());

/** Write a backing name into an existing image without any checks (as a hostile owner would). */
async function forceBacking(path: string, name: string, format: string | null): Promise<void> {
  if (format === null) {
    // qemu-img 7.2 refuses to write a backing name without a format: patch the header directly.
    const bytes = await readFile(path);
    const header = parseHeader(bytes.subarray(0, 65536), bytes.length);
    const out = serializeHeader({ ...header, backingFile: name, extensions: header.extensions.filter((e) => e.type !== ExtensionType.backingFormat) });
    const handle = await open(path, 'r+');
    await handle.write(out.bytes, 0, 4096, 0);
    await handle.close();
    return;
  }
  const args = ['rebase', '-u', '-b', name];
  if (format) args.push('-F', format);
  args.push(path);
  await qemuImg(args);
}

async function expectRefused(path: string, code: string, options: Parameters<typeof openChain>[1] = {}): Promise<void> {
  const before = await readFile(path);
  const error = await openChain(path, options).then(
    () => null,
    (e: unknown) => e,
  );
  expect(error).toBeInstanceOf(Qcow2Error);
  expect((error as Qcow2Error).code).toBe(code);
  expect((await readFile(path)).equals(before)).toBe(true);
}

describe('openChain', () => {
  it('reads a three-layer chain like qemu and opens lower layers read-only', async () => {
    const sub = join(dir, 'three');
    await mkdir(sub);
    await createImage({ path: join(sub, 'base.qcow2'), size: 4 * MiB });
    await qemuIo(join(sub, 'base.qcow2'), ['write -P 1 0 4M']);
    await createImage({ path: join(sub, 'apps.qcow2'), backing: { path: 'base.qcow2', format: 'qcow2' } });
    await qemuIo(join(sub, 'apps.qcow2'), ['write -P 2 1M 1M']);
    await createImage({ path: join(sub, 'user.qcow2'), backing: { path: 'apps.qcow2', format: 'qcow2' } });
    const chain = await openChain(join(sub, 'user.qcow2'), { writableTop: true, allowedDirectories: [sub] });
    expect(chain.layers.map((l) => l.path.slice(sub.length + 1))).toEqual(['user.qcow2', 'apps.qcow2', 'base.qcow2']);
    expect(chain.layers.map((l) => l.image?.writable)).toEqual([true, false, false]);
    expect(chain.size).toBe(4 * MiB);
    await chain.topImage.write(Buffer.alloc(1000, 3), 1.5 * MiB);
    await chain.close();
    const whole = Buffer.alloc(4 * MiB, 1);
    whole.fill(2, MiB, 2 * MiB);
    whole.fill(3, 1.5 * MiB, 1.5 * MiB + 1000);
    expect(sha256(await qemuReadRaw(join(sub, 'user.qcow2')))).toBe(sha256(whole));
  });

  it('refuses protocol and json: backing names', async () => {
    for (const name of ['json:{"driver":"file","filename":"/etc/passwd"}', 'nbd:localhost:10809', 'http://example.com/x.qcow2', 'https://e/x', 'file:/etc/passwd', 'ssh://h/x']) {
      const path = join(dir, `proto-${sha256(Buffer.from(name)).slice(0, 8)}.qcow2`);
      await qemuCreate(path, MiB, {});
      await forceBacking(path, name, 'raw');
      await expectRefused(path, 'chain.refused-protocol');
    }
    expect(() => assertPlainFileName('./nbd:x', 'backing file')).not.toThrow();
    expect(() => assertPlainFileName('dir/a:b', 'backing file')).not.toThrow();
  });

  it('refuses a backing loop (also through a symlink) and chains deeper than the cap', async () => {
    const a = join(dir, 'loop-a.qcow2');
    const b = join(dir, 'loop-b.qcow2');
    await qemuCreate(a, MiB, {});
    await qemuCreate(b, MiB, {});
    await forceBacking(a, 'loop-b.qcow2', 'qcow2');
    await forceBacking(b, 'loop-link.qcow2', 'qcow2');
    await symlink(a, join(dir, 'loop-link.qcow2'));
    await expectRefused(a, 'chain.loop');
    const self = join(dir, 'self.qcow2');
    await qemuCreate(self, MiB, {});
    await forceBacking(self, 'self.qcow2', 'qcow2');
    await expectRefused(self, 'chain.loop');

    let previous = join(dir, 'deep-0.qcow2');
    await qemuCreate(previous, MiB, {});
    for (let i = 1; i <= 5; i++) {
      const next = join(dir, `deep-${i}.qcow2`);
      await createImage({ path: next, backing: { path: `deep-${i - 1}.qcow2`, format: 'qcow2' } });
      previous = next;
    }
    await expectRefused(previous, 'chain.too-deep', { maxDepth: 5 });
    const ok = await openChain(previous, { maxDepth: 6 });
    expect(ok.layers).toHaveLength(6);
    await ok.close();
  });

  it('confines backing and data files to allowed directories after realpath', async () => {
    const store = join(dir, 'store');
    const outside = join(dir, 'outside');
    await mkdir(store);
    await mkdir(outside);
    await qemuCreate(join(outside, 'secret.qcow2'), MiB, {});
    await createImage({ path: join(store, 'direct.qcow2'), backing: { path: join(outside, 'secret.qcow2'), format: 'qcow2' } });
    await expectRefused(join(store, 'direct.qcow2'), 'chain.outside-allowed', { allowedDirectories: [store] });
    await createImage({ path: join(store, 'dotdot.qcow2'), backing: { path: '../outside/secret.qcow2', format: 'qcow2' } });
    await expectRefused(join(store, 'dotdot.qcow2'), 'chain.outside-allowed', { allowedDirectories: [store] });
    await symlink(join(outside, 'secret.qcow2'), join(store, 'innocent.qcow2'));
    await createImage({ path: join(store, 'via-link.qcow2'), backing: { path: 'innocent.qcow2', format: 'qcow2' } });
    await expectRefused(join(store, 'via-link.qcow2'), 'chain.outside-allowed', { allowedDirectories: [store] });
    // Confinement is the default: the image's own folder tree, without any allowed folder.
    await expectRefused(join(store, 'via-link.qcow2'), 'chain.outside-allowed');
    // The same chain opens once the user allows the folder the link points into.
    const open = await openChain(join(store, 'via-link.qcow2'), { allowedDirectories: [outside] });
    await open.close();
    // External data file outside the store.
    await qemuCreate(join(store, 'data.qcow2'), MiB, { data_file: join(outside, 'data.raw') });
    await expectRefused(join(store, 'data.qcow2'), 'chain.outside-allowed', { allowedDirectories: [store] });
  });

  it('never probes a backing format: missing extension is an error unless assumed', async () => {
    const base = join(dir, 'noformat-base.raw');
    await writeFile(base, Buffer.alloc(MiB, 7));
    const top = join(dir, 'noformat.qcow2');
    await qemuCreate(top, MiB, {});
    await forceBacking(top, 'noformat-base.raw', null);
    await expectRefused(top, 'chain.missing-backing-format');
    const chain = await openChain(top, { assumeBackingFormat: 'raw' });
    const got = Buffer.alloc(16);
    await chain.readAt(got, 1000);
    expect(got.equals(Buffer.alloc(16, 7))).toBe(true);
    await chain.close();
    const vmdk = join(dir, 'vmdk-backing.qcow2');
    await qemuCreate(vmdk, MiB, {});
    await forceBacking(vmdk, 'noformat-base.raw', 'vmdk');
    await expectRefused(vmdk, 'chain.unsupported-format');
    const missing = join(dir, 'missing-backing.qcow2');
    await qemuCreate(missing, MiB, {});
    await forceBacking(missing, 'not-there.qcow2', 'qcow2');
    await expectRefused(missing, 'chain.backing-not-found');
  });

  it('createImage checks the backing file: present, of the stated format, plain name', async () => {
    await expect(createImage({ path: join(dir, 'c1.qcow2'), backing: { path: 'absent.qcow2', format: 'qcow2' } })).rejects.toMatchObject({ code: 'chain.backing-not-found' });
    await writeFile(join(dir, 'not-qcow2.img'), Buffer.alloc(4096, 1));
    await expect(createImage({ path: join(dir, 'c2.qcow2'), backing: { path: 'not-qcow2.img', format: 'qcow2' } })).rejects.toMatchObject({ code: 'qcow2.bad-magic' });
    await expect(createImage({ path: join(dir, 'c3.qcow2'), backing: { path: 'nbd:host:1', format: 'raw' } })).rejects.toMatchObject({ code: 'chain.refused-protocol' });
    const header = await createImage({ path: join(dir, 'c4.qcow2'), backing: { path: 'not-qcow2.img', format: 'raw' } });
    expect(header.size).toBe(4096);
    await expect(createImage({ path: join(dir, 'c4.qcow2'), size: 4096 })).rejects.toMatchObject({ code: 'qcow2.bad-argument' });
    await createImage({ path: join(dir, 'c4.qcow2'), size: 8192, exclusive: false });
  });

  it('setBackingFile rewrites the header in place and keeps other extensions', async () => {
    const sub = join(dir, 'rebase');
    await mkdir(sub);
    await createImage({ path: join(sub, 'a.qcow2'), size: 2 * MiB });
    await qemuIo(join(sub, 'a.qcow2'), ['write -P 9 0 2M']);
    await qemuImg(['convert', '-O', 'raw', join(sub, 'a.qcow2'), join(sub, 'b.raw')]);
    await createImage({ path: join(sub, 'top.qcow2'), backing: { path: 'a.qcow2', format: 'qcow2' } });
    const probe = await Qcow2Image.open(join(sub, 'top.qcow2'));
    const before = probe.header;
    await probe.close();
    const image = await Qcow2Image.open(join(sub, 'top.qcow2'), { writable: true });
    await image.setBackingFile('b.raw', 'raw');
    await image.close();
    const after = await Qcow2Image.open(join(sub, 'top.qcow2'));
    expect(after.backingFile).toBe('b.raw');
    expect(after.backingFormat).toBe('raw');
    expect(after.header.extensions.filter((e) => e.type !== 0xe2792aca)).toEqual(before.extensions.filter((e) => e.type !== 0xe2792aca));
    await after.close();
    const info = await qemuImg(['info', '--output=json', join(sub, 'top.qcow2')]);
    expect(JSON.parse(info.stdout)['backing-filename-format']).toBe('raw');
    expect(sha256(await qemuReadRaw(join(sub, 'top.qcow2')))).toBe(sha256(Buffer.alloc(2 * MiB, 9)));
    const detach = await Qcow2Image.open(join(sub, 'top.qcow2'), { writable: true });
    await detach.setBackingFile(null, null);
    await detach.close();
    expect(sha256(await qemuReadRaw(join(sub, 'top.qcow2')))).toBe(sha256(Buffer.alloc(2 * MiB)));
    const refuse = await Qcow2Image.open(join(sub, 'top.qcow2'), { writable: true });
    await expect(refuse.setBackingFile('nbd:x', 'raw')).rejects.toMatchObject({ code: 'chain.refused-protocol' });
    await refuse.close();
  });
});
