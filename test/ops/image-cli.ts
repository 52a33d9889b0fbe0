/** `qlayer image ARGS...` run as a user runs it (the built CLI in a child process), never throwing. */
import { join } from 'node:path';
import { execa } from 'execa';

const root = join(import.meta.dirname, '..', '..');

export async function qlayerImage(args: string[]): Promise<{ stdout: string; stderr: string; exitCode: number }> {
  const result = await execa('node', [join(root, 'bin', 'qlayer.js'), 'image', ...args], { reject: false, timeout: 120_000 });
  return { stdout: result.stdout, stderr: result.stderr, exitCode: result.exitCode ?? -1 };
}
