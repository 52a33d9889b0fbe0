/**
 * Confinement of a chain's files: with allowedDirectories, every backing and data file must be
 * inside one of them after symlinks are resolved, so an untrusted image can never make qlayer
 * read a host file such as /etc/shadow. (Name syntax rules: src/qcow2/referenced-names.ts.)
 */
import { realpath } from 'node:fs/promises';
import { resolve, sep } from 'node:path';
import { ChainError } from '../qcow2/errors.js';

/** True when `path` (already real) is `dir` or inside it. */
function isInside(path: string, dir: string): boolean {
  return path === dir || path.startsWith(dir.endsWith(sep) ? dir : dir + sep);
}

/**
 * Resolve symlinks and check the result is inside one of `allowedDirectories` (themselves
 * resolved). Returns the real path. Without allowedDirectories it only resolves.
 */
export async function confinePath(path: string, allowedDirectories: string[] | undefined, what: string): Promise<string> {
  let real: string;
  try {
    real = await realpath(path);
  } catch (cause) {
    throw new ChainError('chain.backing-not-found', `${what} ${path} does not exist or cannot be resolved`, { cause });
  }
  if (allowedDirectories && allowedDirectories.length > 0) {
    const allowed = await Promise.all(allowedDirectories.map((d) => realpath(d).catch(() => resolve(d))));
    if (!allowed.some((dir) => isInside(real, dir))) {
      throw new ChainError('chain.outside-allowed', `${what} ${path} (real path ${real}) is outside the allowed directories ${allowed.join(', ')}`);
    }
  }
  return real;
}
