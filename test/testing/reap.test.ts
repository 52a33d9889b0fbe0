/**
 * A test process killed with SIGKILL runs no cleanup: its VM keeps running and its overlay stays.
 * reap() (and every later boot()) removes both, because the owner recorded with them is dead.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { describe, expect, it } from 'vitest';
import { reap } from '../../src/testing/index.js';
import { LibvirtConnection } from '../../src/virt/libvirt.js';

const repo = resolve(import.meta.dirname, '../..');

async function domainState(name: string): Promise<string> {
  const connection = await LibvirtConnection.open();
  try {
    return await connection.state(name);
  } finally {
    await connection.close();
  }
}

describe('reap', () => {
  it('removes the domain and folder a SIGKILLed test process left, and nothing of a live one', async () => {
    const child = spawn(process.execPath, ['--import', 'tsx', join(repo, 'test/testing/helpers/boot-and-wait.ts')], { cwd: repo, stdio: ['ignore', 'pipe', 'inherit'] });
    let left: { name: string; dir: string; overlay: string };
    try {
      const line = await new Promise<string>((res, rej) => {
        createInterface({ input: child.stdout! }).once('line', res);
        child.once('exit', (code) => rej(new Error(`the child exited (${code}) before booting`)));
      });
      left = JSON.parse(line) as typeof left;
      // While the owner runs, reap() leaves its VM alone.
      const early = await reap();
      expect(early.domains).not.toContain(left.name);
      expect(await domainState(left.name)).toBe('running');
    } finally {
      child.kill('SIGKILL');
      await new Promise((res) => (child.exitCode !== null || child.signalCode !== null ? res(null) : child.once('exit', res)));
    }
    expect(await domainState(left.name)).toBe('running');
    expect(existsSync(left.overlay)).toBe(true);

    const result = await reap();
    expect(result.domains).toContain(left.name);
    expect(result.folders).toContain(left.name);
    expect(await domainState(left.name)).toBe('absent');
    expect(existsSync(left.dir)).toBe(false);
    expect((await reap()).domains).not.toContain(left.name); // nothing left the second time
  }, 300_000);
});
