/**
 * The `qlayer image` commands run as a user runs them: bin/qlayer.js (compiled with tsc) in a
 * child process, checked against qemu-img on the same files.
 */
import { copyFile, link, open, readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pausedQemu, qemuCheck, qemuCompare, qemuCreate, qemuImg, qemuIo, sha256, tempDir } from '../helpers/qemu.js';
import { writeRandomRaw } from './fixtures.js';
import { layoutOf, pokeLeak, setStoredRefcount } from './poke.js';
import { qlayerImage } from './image-cli.js';

const root = join(import.meta.dirname, '..', '..');
let dir: string;
let cleanup: () => Promise<void>;
const p = (name: string) => join(dir, name);

const qlayer = qlayerImage;

async function json(args: string[]): Promise<unknown> {
  const result = await qlayer([...args, '--json']);
  expect(result.exitCode, result.stderr).toBe(0);
  return JSON.parse(result.stdout);
}

beforeAll(async () => {
  // tsc emits even when another folder has type errors; the launcher needs dist/.
  await execa('npx', ['tsc', '-p', root], { cwd: root, reject: false, timeout: 300_000 });
  ({ dir, cleanup } = await tempDir('qlayer-ops-cli-'));
});
afterAll(async () => cleanup());

describe('qlayer image (CLI)', () => {
  it('create: options and backing file as qemu-img understands them', async () => {
    await json(['create', '-o', 'cluster_size=128k,extended_l2=on,refcount_bits=8', p('a.qcow2'), '1G']);
    const info = JSON.parse((await qemuImg(['info', '--output=json', p('a.qcow2')])).stdout);
    expect(info['virtual-size']).toBe(1024 ** 3);
    expect(info['cluster-size']).toBe(128 * 1024);
    expect(info['format-specific'].data['extended-l2']).toBe(true);
    expect(info['format-specific'].data['refcount-bits']).toBe(8);
    await json(['create', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', p('b.qcow2')]);
    const b = JSON.parse((await qemuImg(['info', '--output=json', p('b.qcow2')])).stdout);
    expect(b['backing-filename']).toBe('a.qcow2');
    expect(b['virtual-size']).toBe(1024 ** 3);
    await json(['create', '-o', 'compat=0.10', p('v2.qcow2'), '512M']);
    expect(JSON.parse((await qemuImg(['info', '--output=json', p('v2.qcow2')])).stdout)['format-specific'].data.compat).toBe('0.10');
    expect((await qemuCheck(p('b.qcow2'))).exitCode).toBe(0);
    const noFormat = await qlayer(['create', '-b', 'a.qcow2', p('c.qcow2')]);
    expect(noFormat.exitCode).toBe(1);
    expect(noFormat.stderr).toMatch(/-F/);
  });

  it('info and map print qemu-img\'s JSON', async () => {
    await qemuCreate(p('base.qcow2'), '32M');
    await qemuIo(p('base.qcow2'), ['write -P 1 0 2M']);
    await qemuCreate(p('top.qcow2'), '', {}, { backing: 'base.qcow2', backingFormat: 'qcow2' });
    await qemuIo(p('top.qcow2'), ['write -P 2 1M 2M', 'write -z 10M 1M']);
    expect(await json(['info', p('top.qcow2')])).toEqual(JSON.parse((await qemuImg(['info', '--output=json', p('top.qcow2')])).stdout));
    expect(await json(['info', '--backing-chain', p('top.qcow2')])).toEqual(JSON.parse((await qemuImg(['info', '--output=json', '--backing-chain', p('top.qcow2')])).stdout));
    expect(await json(['map', p('top.qcow2')])).toEqual(JSON.parse((await qemuImg(['map', '--output=json', p('top.qcow2')])).stdout));
    const text = await qlayer(['info', p('top.qcow2')]);
    expect(text.stdout).toMatch(/backing file: base.qcow2/);
  });

  it('check: JSON and exit codes 0, 3 (leaks), 2 (corruption) like qemu-img; -r repairs', async () => {
    await qemuCreate(p('chk.qcow2'), '16M');
    await qemuIo(p('chk.qcow2'), ['write -P 3 0 1M']);
    expect((await qlayer(['check', p('chk.qcow2')])).exitCode).toBe(0);
    // Poke a leak: one extra cluster at the end, counted but unused.
    await pokeLeak(p('chk.qcow2'));
    await copyFile(p('chk.qcow2'), p('chk2.qcow2'));

    const leaky = await qlayer(['check', '--json', p('chk.qcow2')]);
    expect(leaky.exitCode).toBe(3);
    expect(JSON.parse(leaky.stdout)).toEqual((await qemuCheck(p('chk.qcow2'))).raw);
    const human = await qlayer(['check', p('chk.qcow2')]);
    expect(human.stdout).toMatch(/1 leaked clusters were found/);
    const repaired = await qlayer(['check', '-r', 'leaks', '--json', p('chk.qcow2')]);
    expect(repaired.exitCode).toBe(0);
    expect(JSON.parse(repaired.stdout)['leaks-fixed']).toBe(1);
    expect((await qemuCheck(p('chk.qcow2'))).exitCode).toBe(0);

    // Refcount of the L1 table's cluster to 0: a corruption.
    const { header, g, handle } = await layoutOf(p('chk2.qcow2'));
    await handle.close();
    await setStoredRefcount(p('chk2.qcow2'), header.l1TableOffset / g.clusterSize, 0);
    const corrupt = await qlayer(['check', '--json', p('chk2.qcow2')]);
    expect(corrupt.exitCode).toBe(2);
    expect(JSON.parse(corrupt.stdout)).toEqual((await qemuCheck(p('chk2.qcow2'))).raw);
    expect((await qlayer(['check', '-r', 'all', p('chk2.qcow2')])).exitCode).toBe(0);
    expect((await qemuCheck(p('chk2.qcow2'))).exitCode).toBe(0);

    const notAnImage = await qlayer(['check', '--json', p('base.raw-missing')]);
    expect(notAnImage.exitCode).toBe(1);
  });

  it('convert, rebase, commit, resize', async () => {
    await writeRandomRaw(p('src.raw'), 3 * 1024 * 1024, 5);
    await json(['convert', '-f', 'raw', '-O', 'qcow2', '-c', p('src.raw'), p('src-c.qcow2')]);
    expect(await qemuCompare(p('src.raw'), p('src-c.qcow2'), 'raw', 'qcow2')).toBe(true);
    await json(['convert', '-O', 'raw', p('top.qcow2'), p('top.raw')]);
    expect(await qemuCompare(p('top.qcow2'), p('top.raw'), 'qcow2', 'raw')).toBe(true);
    await json(['convert', '-o', 'cluster_size=4k', p('top.qcow2'), p('flat.qcow2')]);
    expect(await qemuCompare(p('top.qcow2'), p('flat.qcow2'), 'qcow2', 'qcow2')).toBe(true);
    expect(JSON.parse((await qemuImg(['info', '--output=json', p('flat.qcow2')])).stdout)['cluster-size']).toBe(4096);

    await copyFile(p('top.qcow2'), p('top2.qcow2'));
    const rebased = (await json(['rebase', '-b', '', p('top2.qcow2')])) as Record<string, unknown>;
    expect(rebased['copied-bytes']).toBeGreaterThan(0);
    expect(await qemuCompare(p('top2.qcow2'), p('top.raw'), 'qcow2', 'raw')).toBe(true);

    await json(['commit', p('top.qcow2')]);
    expect(await qemuCompare(p('base.qcow2'), p('top.raw'), 'qcow2', 'raw')).toBe(true);
    expect((await qemuCheck(p('base.qcow2'))).exitCode).toBe(0);

    expect(((await json(['resize', p('top.qcow2'), '+1G'])) as Record<string, unknown>)['virtual-size']).toBe(32 * 1024 * 1024 + 1024 ** 3);
    const shrink = await qlayer(['resize', '--json', p('top.qcow2'), '1M']);
    expect(shrink.exitCode).toBe(1);
    expect(JSON.parse(shrink.stdout).error.message).toMatch(/use --shrink/);
  });

  it('convert refuses an output it would read from, and a failed write leaves no output and a clear error', async () => {
    await writeRandomRaw(p('keep.raw'), 1024 * 1024, 8);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', 'keep.raw', '-F', 'raw', p('keep-top.qcow2')]);
    const before = sha256(await readFile(p('keep.raw')));
    // The source itself, and its backing file under another name (a hard link is the same inode).
    await link(p('keep.raw'), p('keep-alias.raw'));
    for (const [format, source, output] of [['raw', p('keep.raw'), p('keep.raw')], ['qcow2', p('keep-top.qcow2'), p('keep-alias.raw')]] as const) {
      const refused = await qlayer(['convert', '-f', format, '-O', 'raw', '--json', source, output]);
      expect(refused.exitCode, refused.stderr).toBe(1);
      expect(JSON.parse(refused.stdout).error.code).toBe('chain.output-is-input');
    }
    expect(sha256(await readFile(p('keep.raw')))).toBe(before);

    // The output file may not grow past 256 KiB: the write fails with EFBIG (Node ignores SIGXFSZ).
    const limited = await execa('prlimit', ['--fsize=262144', 'node', join(root, 'bin', 'qlayer.js'), 'image', 'convert', '-f', 'raw', '-O', 'qcow2', '--json', p('keep.raw'), p('too-big.qcow2')], { reject: false });
    expect(limited.exitCode, limited.stderr).toBe(1);
    expect(JSON.parse(limited.stdout).error).toEqual({ code: 'os.EFBIG', message: `write ${p('too-big.qcow2')} failed: file too large (EFBIG)` });
    expect(limited.stderr).not.toMatch(/internal error|    at /);
    await expect(stat(p('too-big.qcow2'))).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('every image command has --help text', async () => {
    for (const command of ['create', 'info', 'map', 'check', 'convert', 'rebase', 'commit', 'resize']) {
      const help = await qlayer([command, '--help']);
      expect(help.exitCode).toBe(0);
      expect(help.stdout).toMatch(/--json/);
    }
  });
});

/** Run `qlayer ARGS` as a child process (any command, not only image). */
function qlayerChild(args: string[]) {
  return execa('node', [join(root, 'bin', 'qlayer.js'), ...args], { reject: false, timeout: 120_000 });
}

/** Wait until `path` exists (or the child ends first: then fail). */
async function whenExists(path: string, child: { exitCode?: number | null }, what: string): Promise<void> {
  for (let i = 0; i < 3000; i++) {
    if (await stat(path).then(() => true, () => false)) return;
    if (child.exitCode !== undefined && child.exitCode !== null) throw new Error(`${what} ended before ${path} appeared`);
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`${path} never appeared`);
}

describe('interrupted writes (real signals to real child processes)', () => {
  it('a convert stopped by SIGINT or SIGTERM removes its half-written output and dies of the signal', async () => {
    await writeRandomRaw(p('sig-src.raw'), 4 * 1024 * 1024, 21);
    // The child's output file has no descriptor and its second write never finishes: the
    // signal always arrives mid-convert, however fast or slow this machine is.
    const script = p('sig-child.mjs');
    await writeFile(
      script,
      `import { convertImage } from ${JSON.stringify(join(root, 'dist', 'src', 'chain', 'convert.js'))};
import { nodeFileSystem } from ${JSON.stringify(join(root, 'dist', 'src', 'io', 'host-file.js'))};
let writes = 0;
const fs = {
  syncDirectory: (p) => nodeFileSystem.syncDirectory(p),
  remove: (p) => nodeFileSystem.remove(p),
  async open(path, mode, options) {
    const file = await nodeFileSystem.open(path, mode, options);
    if (mode === 'read') return file;
    return {
      path: file.path, writable: file.writable,
      length: () => file.length(), read: (b, at) => file.read(b, at), truncate: (n) => file.truncate(n),
      sync: () => file.sync(), close: () => file.close(),
      write(data, at) {
        // The timer keeps the process alive: with only a promise that never settles, Node would
        // exit by itself (13, unsettled top-level await) before the signal arrives.
        if (++writes === 2) { setInterval(() => {}, 1000); process.stdout.write('writing\\n'); return new Promise(() => {}); }
        return file.write(data, at);
      },
    };
  },
};
await convertImage(process.argv[2], process.argv[3], { fs, sourceFormat: 'raw', windowSize: 65536 });
`,
    );
    for (const signal of ['SIGINT', 'SIGTERM'] as const) {
      const output = p(`sig-out-${signal}.qcow2`);
      const child = execa('node', [script, p('sig-src.raw'), output], { reject: false, timeout: 60_000 });
      child.stdout!.once('data', () => child.kill(signal));
      const result = await child;
      expect(result.stdout, result.stderr).toBe('writing');
      expect(result.signal).toBe(signal);
      await expect(stat(output)).rejects.toMatchObject({ code: 'ENOENT' });
    }
  });

  it('a base import stopped by SIGTERM leaves no .importing and no lock; one killed by SIGKILL is swept by the next import', async () => {
    // 1 GiB of non-zero data: seconds to import, so the signal lands while it runs.
    const source = p('import-src.raw');
    const handle = await open(source, 'w');
    const block = Buffer.alloc(1 << 20, 0x5a);
    for (let i = 0; i < 1024; i++) await handle.write(block, 0, block.length, i * block.length);
    await handle.close();
    const store = p('interrupt-store');
    const partial = join(store, 'bases', 'big.qcow2.importing');
    for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
      const child = qlayerChild(['base', 'import', 'big', source, '-f', 'raw', '--store', store]);
      await whenExists(partial, child, 'base import');
      child.kill(signal);
      const result = await child;
      expect(result.signal, result.stderr).toBe(signal);
      if (signal === 'SIGTERM') {
        await expect(stat(partial)).rejects.toMatchObject({ code: 'ENOENT' });
        await expect(stat(join(store, 'lock'))).rejects.toMatchObject({ code: 'ENOENT' });
      } else {
        expect((await stat(partial)).isFile()).toBe(true); // SIGKILL cannot be caught
      }
    }
    // The next import of that name sweeps the leftover (the lock of the killed one is stale).
    const small = p('import-small.raw');
    await writeRandomRaw(small, 1024 * 1024, 22);
    const again = await qlayerChild(['base', 'import', 'big', small, '-f', 'raw', '--store', store, '--json']);
    expect(again.exitCode, again.stderr).toBe(0);
    await expect(stat(partial)).rejects.toMatchObject({ code: 'ENOENT' });
    expect(await qemuCompare(small, join(store, 'bases', 'big.qcow2'), 'raw', 'qcow2')).toBe(true);
  });
});

describe('images a running QEMU has open (qemu-system on a real image)', () => {
  it('create refuses to replace it; convert refuses it without -U; info, map and check warn on stderr (none with -U)', async () => {
    await qemuCreate(p('running.qcow2'), '16M');
    await qemuIo(p('running.qcow2'), ['write -P 9 0 1M']);
    const before = sha256(await readFile(p('running.qcow2')));
    const qemu = pausedQemu(p('running.qcow2'));
    try {
      const { writerLocks } = await import('../../src/io/in-use.js');
      for (let i = 0; i < 200 && (await writerLocks(p('running.qcow2'))).length === 0; i++) await new Promise((r) => setTimeout(r, 50));
      expect((await writerLocks(p('running.qcow2'))).length).toBeGreaterThan(0);

      const created = await qlayer(['create', '--json', p('running.qcow2'), '1M']);
      expect(created.exitCode, created.stderr).toBe(1);
      expect(JSON.parse(created.stdout).error.code).toBe('image.in-use');

      const converted = await qlayer(['convert', '--json', p('running.qcow2'), p('running-copy.qcow2')]);
      expect(converted.exitCode, converted.stderr).toBe(1);
      expect(JSON.parse(converted.stdout).error.code).toBe('image.being-written');
      expect(JSON.parse(converted.stdout).error.message).toContain(`pid ${qemu.pid}`);
      const forced = await qlayer(['convert', '-U', p('running.qcow2'), p('running-copy.qcow2')]);
      expect(forced.exitCode, forced.stderr).toBe(0);

      for (const command of [['info'], ['map'], ['check']]) {
        const warned = await qlayer([...command, '--json', p('running.qcow2')]);
        expect(warned.exitCode, warned.stderr).toBe(0);
        expect(JSON.parse(warned.stdout)).toBeTruthy(); // stdout stays one JSON document
        expect(warned.stderr).toMatch(/^qlayer: warning: .*running\.qcow2 is open for writing in another process \(pid \d+ \(qemu-system-x86_64/);
        const quiet = await qlayer([...command, '-U', p('running.qcow2')]);
        expect(quiet.exitCode, quiet.stderr).toBe(0);
        expect(quiet.stderr).toBe('');
      }
      const repair = await qlayer(['check', '-r', 'leaks', '-U', p('running.qcow2')]);
      expect(repair.exitCode).toBe(1);
    } finally {
      qemu.kill('SIGKILL');
      await qemu;
    }
    expect(sha256(await readFile(p('running.qcow2')))).toBe(before);
    // (qemu-img itself refuses to compare while QEMU runs: compared once it is gone.)
    expect(await qemuCompare(p('running.qcow2'), p('running-copy.qcow2'), 'qcow2', 'qcow2')).toBe(true);
    // Once QEMU is gone: no warning, and convert runs.
    const after = await qlayer(['info', p('running.qcow2')]);
    expect(after.stderr).toBe('');
    expect((await qlayer(['convert', p('running.qcow2'), p('running-copy2.qcow2')])).exitCode).toBe(0);
  });
});
