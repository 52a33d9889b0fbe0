/**
 * Hostile images against every command that opens an image: no byte of a host file outside the
 * image's folder tree (the canary) ever reaches an output or the store, non-regular files are
 * refused without hanging, and every refusal is one line with a stable code. Images are built
 * from scratch images and byte patches: never ask qemu-img to create a data file at a real host
 * path (`-o data_file=PATH` truncates PATH).
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmod, copyFile, mkdir, open, readdir, readFile, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openChain } from '../../src/chain/chain.js';
import { qemuImg, tempDir } from '../helpers/qemu.js';

const ROOT = resolve(import.meta.dirname, '../..');
const BIN = join(ROOT, 'bin', 'qlayer.js');
const TIMEOUT_MS = 20_000;
const DATA_FILE_EXT = 0x44415441;

interface Run {
  exitCode: number;
  stdout: string;
  stderr: string;
}

/** The CLI as a child process; a run past TIMEOUT_MS is a hang and fails the test. */
function qlayer(args: string[], cwd: string, env: NodeJS.ProcessEnv = {}): Promise<Run> {
  return new Promise((done, fail) => {
    execFile(process.execPath, [BIN, ...args], { cwd, timeout: TIMEOUT_MS, killSignal: 'SIGKILL', env: { ...process.env, ...env }, maxBuffer: 64 << 20 }, (error, stdout, stderr) => {
      if (error && (error as { killed?: boolean }).killed) return fail(new Error(`qlayer ${args.join(' ')} hung (killed after ${TIMEOUT_MS} ms)`));
      const code = error ? (typeof error.code === 'number' ? error.code : 1) : 0;
      done({ exitCode: code, stdout, stderr });
    });
  });
}

/** Rewrite the header extensions of a v3 image: `type` gets `data` (null removes it). */
async function setExtension(path: string, type: number, data: Buffer | null): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    const first = Buffer.alloc(65536);
    await handle.read(first, 0, first.length, 0);
    const headerLength = first.readUInt32BE(100);
    const extensions: Array<{ type: number; data: Buffer }> = [];
    for (let at = headerLength; ; ) {
      const t = first.readUInt32BE(at);
      const len = first.readUInt32BE(at + 4);
      if (t === 0) break;
      if (t !== type) extensions.push({ type: t, data: first.subarray(at + 8, at + 8 + len) });
      at += 8 + Math.ceil(len / 8) * 8;
    }
    if (data) extensions.push({ type, data });
    const parts: Buffer[] = [];
    for (const e of extensions) {
      const head = Buffer.alloc(8);
      head.writeUInt32BE(e.type, 0);
      head.writeUInt32BE(e.data.length, 4);
      parts.push(head, e.data, Buffer.alloc(Math.ceil(e.data.length / 8) * 8 - e.data.length));
    }
    parts.push(Buffer.alloc(8));
    await handle.write(Buffer.concat(parts), 0, undefined, headerLength);
  } finally {
    await handle.close();
  }
}

/** Replace the backing file name (the image was made with a long placeholder name). */
async function setBackingName(path: string, name: string): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    const head = Buffer.alloc(20);
    await handle.read(head, 0, 20, 0);
    const offset = Number(head.readBigUInt64BE(8));
    const bytes = Buffer.from(name);
    const size = Buffer.alloc(4);
    size.writeUInt32BE(bytes.length, 0);
    await handle.write(bytes, 0, bytes.length, offset);
    await handle.write(size, 0, 4, 16);
  } finally {
    await handle.close();
  }
}

async function pokeU64(path: string, at: number, value: bigint): Promise<void> {
  const handle = await open(path, 'r+');
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(value);
  await handle.write(b, 0, 8, at);
  await handle.close();
}

async function pokeU32(path: string, at: number, value: number): Promise<void> {
  const handle = await open(path, 'r+');
  const b = Buffer.alloc(4);
  b.writeUInt32BE(value);
  await handle.write(b, 0, 4, at);
  await handle.close();
}

/** Every file under `dir` (outputs, the store). */
async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await filesUnder(path)));
    else if (entry.isFile()) out.push(path);
  }
  return out;
}

interface Case {
  name: string;
  /** The image a command is pointed at. */
  image: string;
  /** Code every chain-opening command must refuse with; null when the case may succeed (then only: no canary, no hang). */
  refusal: string | null;
  /** Extra arguments for the chain-opening commands (an --allow that moves the refusal to the file-kind check, -f raw). */
  args?: string[];
}

let temp: { dir: string; cleanup: () => Promise<void> };
let canary: Buffer;
let canaryPath: string;
let work: string;
let out: string;
const cases: Case[] = [];

/** A scratch qcow2 of 1 MiB holding a little data of its own. */
async function scratch(path: string, extra: string[] = []): Promise<void> {
  await qemuImg(['create', '-q', '-f', 'qcow2', ...extra, path, '1M']);
}

beforeAll(async () => {
  temp = await tempDir('qlayer-hostile-');
  // The folders: the canary lives outside the images' folder; images sit two levels down so
  // that ../../ leaves their tree.
  const outside = join(temp.dir, 'outside');
  work = join(temp.dir, 'a', 'b', 'images');
  out = join(temp.dir, 'out');
  await mkdir(outside, { recursive: true });
  await mkdir(work, { recursive: true });
  await mkdir(out, { recursive: true });
  canary = randomBytes(256 * 1024);
  canaryPath = join(outside, 'canary.bin');
  await writeFile(canaryPath, canary);
  const placeholder = 'P'.repeat(400);
  const add = async (name: string, backing: string | null, refusal: string | null, args?: string[]) => {
    const image = join(work, `${name}.qcow2`);
    if (backing !== null) {
      await scratch(image, ['-u', '-b', placeholder, '-F', 'raw']);
      await setBackingName(image, backing);
    } else await scratch(image);
    cases.push({ name, image, refusal, ...(args ? { args } : {}) });
    return image;
  };

  await add('absolute-backing', canaryPath, 'chain.outside-allowed');
  await add('relative-dotdot-backing', '../../../outside/canary.bin', 'chain.outside-allowed');
  await symlink(canaryPath, join(work, 'innocent.raw'));
  await add('symlinked-backing', 'innocent.raw', 'chain.outside-allowed');
  await add('json-backing', `json:{"driver":"raw","file":{"driver":"file","filename":"${canaryPath}"}}`, 'chain.refused-protocol');
  await add('protocol-backing', `file:${canaryPath}`, 'chain.refused-protocol');
  await writeFile(join(work, 'fifo'), '');
  await rm(join(work, 'fifo'));
  await new Promise<void>((done, fail) => execFile('mkfifo', [join(work, 'fifo')], (e) => (e ? fail(e) : done())));
  await add('fifo-backing', 'fifo', 'chain.not-regular-file');
  await add('dev-zero-backing', '/dev/zero', 'chain.outside-allowed');
  await add('dev-zero-backing-allowed', '/dev/zero', 'chain.not-regular-file', ['--allow', '/dev']);
  await add('proc-backing-allowed', '/proc/self/environ', 'chain.not-regular-file', ['--allow', '/proc']);
  await add('sys-backing-allowed', '/sys/kernel/mm/transparent_hugepage/enabled', 'chain.not-regular-file', ['--allow', '/sys']);
  await add('dir-backing', '.', 'chain.not-regular-file');

  // External data files: made with a scratch data file next to the image, then renamed by patching.
  const withData = async (name: string, dataName: string, refusal: string, args?: string[]) => {
    const image = join(work, `${name}.qcow2`);
    // An absolute scratch path inside the temporary folder (qemu-img takes a relative one from its cwd).
    await qemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(work, `${name}.scratch-data`)}`, image, '1M']);
    await setExtension(image, DATA_FILE_EXT, Buffer.from(dataName));
    cases.push({ name, image, refusal, ...(args ? { args } : {}) });
  };
  await withData('absolute-data-file', canaryPath, 'chain.outside-allowed');
  await withData('relative-data-file', '../../../outside/canary.bin', 'chain.outside-allowed');
  await withData('symlinked-data-file', 'innocent.raw', 'chain.outside-allowed');
  await withData('fifo-data-file', 'fifo', 'chain.not-regular-file');
  await withData('dev-zero-data-file', '/dev/zero', 'chain.not-regular-file', ['--allow', '/dev']);
  await withData('json-data-file', `json:{"driver":"file","filename":"${canaryPath}"}`, 'chain.refused-protocol');

  // Huge sizes: a virtual size of 2^62 bytes, an L1 table of 2^31-1 entries.
  const huge = await add('huge-virtual-size', null, null);
  await pokeU64(huge, 24, 1n << 62n);
  const hugeL1 = await add('huge-l1-size', null, null);
  await pokeU32(hugeL1, 36, 0x7fffffff);

  // A raw disk whose first sector is a qcow2 header naming the canary: read as raw when told.
  const rawDisk = join(work, 'raw-with-header.img');
  const header = join(work, 'header-source.qcow2');
  await scratch(header, ['-u', '-b', placeholder, '-F', 'raw']);
  await setBackingName(header, canaryPath);
  const disk = Buffer.alloc(1024 * 1024);
  (await readFile(header)).copy(disk, 0, 0, 65536);
  await writeFile(rawDisk, disk);
  cases.push({ name: 'raw-disk-with-qcow2-header', image: rawDisk, refusal: null, args: ['-f', 'raw'] });
  cases.push({ name: 'raw-disk-with-qcow2-header-as-qcow2', image: rawDisk, refusal: 'chain.outside-allowed' });
}, 120_000);

afterAll(async () => {
  // The canary itself was never written.
  expect((await readFile(canaryPath)).equals(canary)).toBe(true);
  await temp?.cleanup();
});

/** No output anywhere holds a 4 KiB piece of the canary. */
async function assertNoCanary(dirs: string[], run?: Run): Promise<void> {
  const needles = [0, 4096, 65536, 200_000].map((at) => canary.subarray(at, at + 4096));
  for (const dir of dirs) {
    for (const file of await filesUnder(dir)) {
      const bytes = await readFile(file);
      for (const needle of needles) expect(bytes.includes(needle), `${file} holds canary bytes`).toBe(false);
    }
  }
  if (run) {
    const hex = canary.subarray(0, 16).toString('hex');
    expect(run.stdout.includes(hex) || run.stderr.includes(hex)).toBe(false);
  }
}

/** A refusal: non-zero exit, one stderr line, the JSON error with the expected code. */
function expectRefused(run: Run, code: string, what: string): void {
  expect(run.exitCode, `${what}: ${run.stdout}${run.stderr}`).not.toBe(0);
  const lines = run.stderr.trimEnd().split('\n');
  expect(lines, what).toHaveLength(1);
  expect(lines[0], what).toMatch(/^qlayer: /);
  const parsed = JSON.parse(run.stdout) as { error: { code: string; message: string } };
  expect(parsed.error.code, `${what}: ${parsed.error.message}`).toBe(code);
}

/** Success or a clean one-line failure, never a hang (the runner enforces it). */
function expectClean(run: Run, what: string): void {
  if (run.exitCode === 0) return;
  const lines = run.stderr.trimEnd().split('\n');
  expect(lines, what).toHaveLength(1);
  expect(lines[0], what).toMatch(/^qlayer: /);
}

const chainCommands: Array<{ name: string; args: (c: Case, o: string) => string[]; output?: (o: string) => string }> = [
  { name: 'image info', args: (c) => ['image', 'info', c.image] },
  { name: 'image info --backing-chain', args: (c) => ['image', 'info', '--backing-chain', c.image] },
  { name: 'image map', args: (c) => ['image', 'map', c.image] },
  { name: 'image convert -O raw', args: (c, o) => ['image', 'convert', c.image, o, '-O', 'raw'], output: (o) => o },
  { name: 'image convert -O qcow2', args: (c, o) => ['image', 'convert', c.image, o, '-O', 'qcow2'], output: (o) => o },
  { name: 'image commit -d', args: (c) => ['image', 'commit', '-d', c.image] },
];

describe('hostile images', () => {
  it('every chain-opening command refuses each hostile name, leaves no output, never hangs', async () => {
    let n = 0;
    for (const c of cases) {
      for (const command of chainCommands) {
        // -f is for info/map/convert; commit takes none.
        const extra = (c.args ?? []).filter((a, i, all) => command.name !== 'image commit -d' || (a !== '-f' && all[i - 1] !== '-f'));
        if (command.name === 'image commit -d' && c.args?.includes('-f')) continue;
        const output = join(out, `${c.name}-${n++}.out`);
        const run = await qlayer([...command.args(c, output), ...extra, '--json'], work);
        const what = `${command.name} ${c.name}`;
        if (c.refusal !== null) {
          expectRefused(run, c.refusal, what);
          if (command.output) await expect(stat(command.output(output)), `${what} left an output`).rejects.toThrow();
        } else expectClean(run, what);
        await assertNoCanary([out], run);
      }
    }
  }, 600_000);

  it('image check reads only the image itself: no canary, no hang, one line when it fails', async () => {
    for (const c of cases) {
      if (c.args?.includes('-f')) continue;
      const run = await qlayer(['image', 'check', c.image, '--json'], work);
      if (run.exitCode !== 0 && run.exitCode !== 2 && run.exitCode !== 3) expectClean(run, `image check ${c.name}`);
      await assertNoCanary([], run);
    }
  }, 300_000);

  it('a raw disk with a qcow2 header converts as raw, byte for byte, when told -f raw', async () => {
    const rawDisk = cases.find((c) => c.name === 'raw-disk-with-qcow2-header')!.image;
    const output = join(out, 'raw-as-raw.img');
    const run = await qlayer(['image', 'convert', '-f', 'raw', '-O', 'raw', rawDisk, output, '--json'], work);
    expect(run.exitCode, run.stderr).toBe(0);
    expect((await readFile(output)).equals(await readFile(rawDisk))).toBe(true);
    const info = await qlayer(['image', 'info', '-f', 'raw', rawDisk, '--json'], work);
    expect(JSON.parse(info.stdout)).toMatchObject({ format: 'raw' });
  }, 60_000);

  it('--allow opens exactly the folder it names (absolute backing), and the config key allow does too', async () => {
    const abs = cases.find((c) => c.name === 'absolute-backing')!.image;
    const allowed = await qlayer(['image', 'info', abs, '--allow', join(temp.dir, 'outside'), '--json'], work);
    expect(allowed.exitCode, allowed.stderr).toBe(0);
    const config = join(temp.dir, 'allow.yaml');
    await writeFile(config, `allow: [${JSON.stringify(join(temp.dir, 'outside'))}]\n`);
    const viaConfig = await qlayer(['image', 'map', abs, '--config', config, '--json'], work);
    expect(viaConfig.exitCode, viaConfig.stderr).toBe(0);
    const sibling = await qlayer(['image', 'info', abs, '--allow', join(temp.dir, 'a'), '--json'], work);
    expectRefused(sibling, 'chain.outside-allowed', 'allow of another folder');
  }, 60_000);

  it('base import refuses every hostile image and the store holds no canary byte', async () => {
    const store = join(temp.dir, 'store-import');
    let i = 0;
    for (const c of cases) {
      if (c.refusal === null) continue;
      // Without -f: a qcow2 header that names another file is not taken for qcow2 at all.
      const sniffed = await qlayer(['base', 'import', `b${i++}`, c.image, '--store', store, '--json'], work);
      const header = await readFile(c.image).then((b) => b.subarray(0, 80), () => Buffer.alloc(0));
      const namesOther = header.toString('latin1', 0, 4) === 'QFI\xfb' && (header.readBigUInt64BE(8) !== 0n || (header.readBigUInt64BE(72) & 4n) !== 0n);
      if (namesOther) expectRefused(sniffed, 'base.format-ambiguous', `base import ${c.name} without -f`);
      else expect(sniffed.exitCode, `base import ${c.name} without -f`).not.toBe(0);
      // Told qcow2, with the same --allow as the other commands: the same refusal as theirs.
      const allow = c.args?.filter((a, k, all) => a === '--allow' || all[k - 1] === '--allow') ?? [];
      const told = await qlayer(['base', 'import', `b${i++}`, c.image, '-f', 'qcow2', ...allow, '--store', store, '--json'], work);
      expectRefused(told, c.refusal, `base import -f qcow2 ${c.name}`);
    }
    // Told raw, the raw disk with a header is imported as the raw bytes it is.
    const rawDisk = cases.find((c) => c.name === 'raw-disk-with-qcow2-header')!.image;
    const raw = await qlayer(['base', 'import', 'rawdisk', rawDisk, '--format', 'raw', '--store', store, '--json'], work);
    expect(raw.exitCode, raw.stderr).toBe(0);
    await assertNoCanary([store]);
  }, 600_000);

  it('desktop create on a planted hostile base: refused (data file) or unusable (backing), never reading the canary', async () => {
    const store = join(temp.dir, 'store-desktop');
    const legit = join(work, 'legit.qcow2');
    await scratch(legit);
    const imported = await qlayer(['base', 'import', 'os', legit, '--store', store, '--json'], work);
    expect(imported.exitCode, imported.stderr).toBe(0);
    const basePath = join(store, 'bases', 'os.qcow2');
    let d = 0;
    for (const name of ['absolute-backing', 'relative-dotdot-backing', 'absolute-data-file', 'fifo-backing', 'dev-zero-backing']) {
      const c = cases.find((x) => x.name === name)!;
      await chmod(basePath, 0o644);
      await rm(basePath);
      await copyFile(c.image, basePath);
      const desktop = `d${d++}`;
      const run = await qlayer(['desktop', 'create', desktop, '--base', 'os', '--store', store, '--json'], work);
      if (run.exitCode !== 0) {
        expectRefused(run, 'chain.outside-allowed', `desktop create on ${name}`);
        continue;
      }
      // Created: every later desktop operation opens the chain confined to the store, as here.
      const user = join(store, 'desktops', desktop, 'user.qcow2');
      await expect(openChain(user, { allowedDirectories: [store] })).rejects.toMatchObject({ code: expect.stringMatching(/^chain\.(outside-allowed|not-regular-file|backing-not-found)$/) });
      const convert = await qlayer(['image', 'convert', user, join(out, `${desktop}.raw`), '-O', 'raw', '--json'], work);
      expect(convert.exitCode).not.toBe(0);
    }
    await assertNoCanary([store, out]);
  }, 600_000);
});

describe('one line for every bad input', () => {
  it("commander's own errors and a broken config are one line, JSON with --json", async () => {
    const resize = await qlayer(['image', 'resize', 'x.qcow2', '-512K', '--json'], temp.dir);
    expectRefused(resize, 'usage.unknown-option', 'resize -512K');
    const missing = await qlayer(['image', 'info', '--json'], temp.dir);
    expectRefused(missing, 'usage.missing-argument', 'info without file');
    const unknown = await qlayer(['image', 'frobnicate', '--json'], temp.dir);
    expectRefused(unknown, 'usage.unknown-command', 'unknown command');
    const badChoice = await qlayer(['image', 'check', 'x.qcow2', '-r', 'everything', '--json'], temp.dir);
    expectRefused(badChoice, 'usage.invalid-argument', 'bad choice');
    const config = join(temp.dir, 'broken.yaml');
    await writeFile(config, 'store: [unclosed\n  guest: {\n');
    const broken = await qlayer(['base', 'list', '--config', config, '--json'], temp.dir);
    expectRefused(broken, 'config.invalid', 'broken YAML');
    const human = await qlayer(['image', 'resize', 'x.qcow2', '-512K'], temp.dir);
    expect(human.stdout).toBe('');
    expect(human.stderr.trimEnd().split('\n')).toHaveLength(1);
  }, 120_000);
});
