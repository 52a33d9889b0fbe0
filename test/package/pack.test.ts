/**
 * The published package works from outside this repository: `npm pack`, install the tarball
 * into a fresh project, type-check a consumer of `qlayer` and `qlayer/testing` with tsc against
 * the shipped .d.ts files, and run it on Node 20 (this machine's) and Node 24 (the npm package
 * node@24, as scripts/test-node24.sh gets it). Nothing here boots a guest: the example project
 * (examples/vm-test) does that through the same tarball.
 */
import { execFile } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

const run = promisify(execFile);
const repo = resolve(import.meta.dirname, '../..');
let dir: string;
let project: string;

/** Node 24 from the npm package node@24, cached where scripts/test-node24.sh keeps it. */
async function node24(): Promise<string> {
  const prefix = join(repo, '.cache', 'node24');
  const binary = join(prefix, 'node_modules', 'node', 'bin', 'node');
  if (!existsSync(binary)) {
    mkdirSync(prefix, { recursive: true });
    await run('npm', ['install', '--prefix', prefix, '--no-save', '--no-audit', '--no-fund', '--loglevel=error', 'node@24'], { timeout: 300_000 });
  }
  return binary;
}

const consumer = `
import { createImage, infoImage, openChain, openGuestFilesystem, QlayerError, type ImageInfo } from 'qlayer';
import { boot, reap, TestingError, Vm, type VmOptions, type ExecResult } from 'qlayer/testing';
import { join } from 'node:path';

const dir = process.argv[2]!;
// The engine: make an overlay over a base, read its chain back.
await createImage({ path: join(dir, 'base.qcow2'), size: 64 * 1024 * 1024 });
await createImage({ path: join(dir, 'top.qcow2'), backing: { path: 'base.qcow2', format: 'qcow2' } });
const infos: ImageInfo[] = await infoImage(join(dir, 'top.qcow2'), { backingChain: true });
const chain = await openChain(join(dir, 'top.qcow2'));
const layers = chain.layers.length;
await chain.close();
let fsError = '';
try {
  await openGuestFilesystem((await openChain(join(dir, 'base.qcow2'))));
} catch (error) {
  fsError = error instanceof QlayerError ? error.code : 'not a QlayerError';
}

// The harness: options type-check, and bad input is a clear error before any VM exists.
const options: VmOptions = { image: join(dir, 'missing.qcow2'), boot: { mode: 'kernel', kernel: '/boot/vmlinuz' }, memoryMiB: 256 };
let bootError = '';
try {
  await using vm = await boot({ ...options, boot: { mode: 'firmware' } });
  const r: ExecResult = await vm.exec('true');
  console.log(r.exitCode, vm instanceof Vm);
} catch (error) {
  bootError = error instanceof TestingError ? \`\${error.code}: \${error.message}\` : String(error);
}
console.log(JSON.stringify({ node: process.version, images: infos.length, layers, fsError, bootError, reap: typeof reap, kernelOption: options.boot?.mode }));
`;

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'qlayer-pack-'));
  // --ignore-scripts: no prepack build. The test command built dist/ before the suite started,
  // and rebuilding it here would rewrite files that other test files run the CLI from meanwhile.
  if (!existsSync(join(repo, 'dist', 'src', 'index.js'))) throw new Error('dist/ is not built: run npm run build first');
  const { stdout } = await run('npm', ['pack', '--ignore-scripts', '--pack-destination', dir, '--silent'], { cwd: repo, timeout: 300_000 });
  const tarball = join(dir, stdout.trim().split('\n').pop()!);
  project = join(dir, 'consumer');
  mkdirSync(project);
  writeFileSync(join(project, 'package.json'), JSON.stringify({ name: 'consumer', private: true, type: 'module', dependencies: { qlayer: `file:${tarball}` } }, null, 2));
  await run('npm', ['install', '--no-audit', '--no-fund', '--prefer-offline', '--loglevel=error'], { cwd: project, timeout: 600_000 });
  writeFileSync(join(project, 'consumer.ts'), consumer);
  writeFileSync(
    join(project, 'tsconfig.json'),
    JSON.stringify({
      compilerOptions: {
        target: 'ES2022', module: 'NodeNext', moduleResolution: 'NodeNext', strict: true, noUncheckedIndexedAccess: true,
        lib: ['ES2023', 'ESNext.Disposable'], types: ['node'], typeRoots: [join(repo, 'node_modules', '@types')], outDir: 'out', skipLibCheck: false,
      },
      files: ['consumer.ts'],
    }),
  );
}, 900_000);

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('npm pack', () => {
  it('ships dist with .d.ts for both entry points and no tests', async () => {
    const pkg = join(project, 'node_modules', 'qlayer');
    for (const file of ['dist/src/index.js', 'dist/src/index.d.ts', 'dist/src/testing/index.js', 'dist/src/testing/index.d.ts', 'dist/src/testing/vitest.d.ts', 'bin/qlayer.js', 'vm-fixtures/build.sh']) {
      expect(existsSync(join(pkg, file)), file).toBe(true);
    }
    expect(existsSync(join(pkg, 'test'))).toBe(false);
    expect(readdirSync(join(pkg, 'dist'))).toEqual(['src']);
  });

  it('type-checks a consumer against the shipped declarations (strict, skipLibCheck off)', async () => {
    const tsc = join(repo, 'node_modules', '.bin', 'tsc');
    const result = await run(tsc, ['-p', 'tsconfig.json'], { cwd: project }).catch((error: { stdout: string }) => ({ stdout: error.stdout, failed: true }));
    expect(result.stdout).toBe('');
    expect(existsSync(join(project, 'out', 'consumer.js'))).toBe(true);
  });

  it.each([['20'], ['24']])('runs on Node %s', async (major) => {
    const node = major === '20' ? process.execPath : await node24();
    const work = mkdtempSync(join(dir, `run-${major}-`));
    const { stdout } = await run(node, [join(project, 'out', 'consumer.js'), work], { cwd: project, timeout: 120_000 });
    const out = JSON.parse(stdout.trim().split('\n').pop()!) as Record<string, string | number>;
    expect(out['node']).toMatch(new RegExp(`^v${major}\\.`));
    expect(out).toMatchObject({ images: 2, layers: 2, reap: 'function', kernelOption: 'kernel' });
    expect(out['fsError']).toMatch(/^fs\./);
    expect(out['bootError']).toMatch(/^testing\.image-missing: boot: the image .*missing\.qcow2 does not exist$/);
  });

  it('the CLI runs from the installed package', async () => {
    const { stdout } = await run(join(project, 'node_modules', '.bin', 'qlayer'), ['--help'], { cwd: project });
    expect(stdout).toMatch(/image/);
  });
});
