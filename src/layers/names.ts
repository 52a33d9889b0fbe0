import { posix } from 'node:path';
import { LayerError } from './errors.js';

const NAME_PATTERN = /^[a-z0-9][a-z0-9._-]{0,62}$/;

/** Names of bases, apps, versions and desktops: safe as file names and libvirt domain suffixes. */
export function checkName(kind: string, name: string): string {
  if (!NAME_PATTERN.test(name)) {
    throw new LayerError(
      'store.bad-name',
      `${kind} name ${JSON.stringify(name)} is not allowed: use 1-63 of a-z 0-9 . _ - starting with a letter or digit`,
    );
  }
  return name;
}

/** Parse APP or APP@VERSION. */
export function parseAppRef(ref: string): { name: string; version: string | null } {
  const at = ref.indexOf('@');
  if (at < 0) return { name: checkName('app', ref), version: null };
  return { name: checkName('app', ref.slice(0, at)), version: checkName('app version', ref.slice(at + 1)) };
}

/** An absolute, normalised guest path with no `..` escaping. */
export function checkGuestPath(path: string): string {
  if (!path.startsWith('/')) throw new LayerError('app.bad-path', `guest path ${JSON.stringify(path)} must be absolute`);
  const normal = posix.normalize(path);
  if (normal !== path.replace(/\/+$/, '') && normal !== path) {
    throw new LayerError('app.bad-path', `guest path ${JSON.stringify(path)} is not normalised (expected ${normal})`);
  }
  if (normal === '/' || /[\0\n]/.test(normal)) throw new LayerError('app.bad-path', `guest path ${JSON.stringify(path)} is not allowed`);
  return normal;
}
