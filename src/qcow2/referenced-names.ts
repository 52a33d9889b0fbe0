/**
 * The file names an image may refer to (backing file, external data file). Images can come from
 * untrusted owners, so a name is only ever a plain host path, with no QEMU protocol syntax
 * (json:, nbd:, http:, file:...), resolved against the referring image's folder. Confining the
 * result to allowed folders is the chain's job (src/chain/confine.ts).
 */
import { dirname, isAbsolute, resolve } from 'node:path';
import { ChainError } from './errors.js';

/**
 * Refuse anything QEMU would parse as a protocol or JSON description. QEMU treats a name as a
 * protocol when the text before the first ':' is a plain word and no '/' comes earlier; we are
 * stricter and refuse every `word:` prefix, plus names with NUL or empty names.
 */
export function assertPlainFileName(name: string, what: string): void {
  if (name.length === 0) throw new ChainError('chain.refused-protocol', `${what} name is empty`);
  if (name.includes('\0')) throw new ChainError('chain.refused-protocol', `${what} name contains a NUL byte`);
  if (name.startsWith('json:')) throw new ChainError('chain.refused-protocol', `${what} "${name.slice(0, 40)}..." is a json: description; only plain file names are allowed`);
  const colon = name.indexOf(':');
  const slash = name.indexOf('/');
  if (colon > 0 && (slash < 0 || colon < slash) && /^[A-Za-z0-9_.+-]+$/.test(name.slice(0, colon))) {
    throw new ChainError('chain.refused-protocol', `${what} "${name}" uses the protocol prefix "${name.slice(0, colon)}:"; only plain file names are allowed`);
  }
}

/** Resolve `name` (as stored in the image at `referrerPath`) to a host path. */
export function resolveReferencedPath(name: string, referrerPath: string, what: string): string {
  assertPlainFileName(name, what);
  return isAbsolute(name) ? name : resolve(dirname(referrerPath), name);
}
