import type { AppManifest } from './app.js';
import { GUEST_EXIT, runGuestScript, shellQuote, type GuestShell } from './guest-script.js';

const octal = (mode: number): string => (mode & 0o7777).toString(8).padStart(4, '0');

const MIB = 1 << 20;

/**
 * Lines that create `quotedPath` holding exactly `size` zero bytes, written for real: whole MiBs
 * with dd (7x faster than head -c in a TCG guest: 0.9 s against 6.4 s for 100 MB), the rest
 * appended with head -c.
 */
function zeroFill(quotedPath: string, size: number): string[] {
  const whole = Math.floor(size / MIB);
  const rest = size % MIB;
  const lines = [whole > 0 ? `  dd if=/dev/zero of=${quotedPath} bs=${MIB} count=${whole} 2>/dev/null` : `  : > ${quotedPath}`];
  if (rest > 0) lines.push(`  head -c ${rest} /dev/zero >> ${quotedPath}`);
  return lines;
}

/**
 * The guest-side script that allocates the placeholders of these apps: folders first, then each
 * file created with real zero writes of its exact size (dd and head -c from /dev/zero, never fallocate,
 * which leaves unwritten extents that read as zeros whatever the disk holds), its mode and
 * owner, then sync. A path that exists already is refused, unless it is a regular file of the
 * right size: that is a placeholder left by an interrupted assign, and locate re-checks it.
 * Only POSIX sh, dd, head, mkdir, chmod, chown, wc and sync: busybox and full desktops alike.
 */
export function allocationScript(manifests: AppManifest[]): string {
  const lines = ['set -e', `refuse() { echo "$1" >&2; exit ${GUEST_EXIT.exists}; }`];
  for (const manifest of manifests) {
    for (const dir of manifest.directories) {
      const q = shellQuote(dir.path);
      lines.push(`if [ -e ${q} ] && [ ! -d ${q} ]; then refuse ${shellQuote(`${dir.path} (not a folder)`)}; fi`);
      lines.push(`mkdir -p ${q} && chmod ${octal(dir.mode)} ${q} && chown ${dir.uid}:${dir.gid} ${q}`);
    }
    for (const file of manifest.files) {
      const q = shellQuote(file.path);
      lines.push(
        `if [ -e ${q} ] || [ -L ${q} ]; then`,
        `  if [ -f ${q} ] && [ ! -L ${q} ] && [ "$(wc -c < ${q})" -eq ${file.size} ]; then :; else refuse ${shellQuote(file.path)}; fi`,
        `else`,
        ...zeroFill(q, file.size),
        `fi`,
        `chmod ${octal(file.mode)} ${q} && chown ${file.uid}:${file.gid} ${q}`,
      );
    }
  }
  lines.push('sync', 'echo allocated');
  return `${lines.join('\n')}\n`;
}

/** The guest-side script that deletes an app's files and its now-empty folders, then syncs. */
export function removalScript(manifests: AppManifest[]): string {
  const lines = ['set -e'];
  for (const manifest of manifests) {
    for (const file of manifest.files) lines.push(`rm -f -- ${shellQuote(file.path)}`);
    // Deepest folders first; a folder the user put files into stays.
    const dirs = [...manifest.directories].sort((a, b) => b.path.split('/').length - a.path.split('/').length);
    for (const dir of dirs) lines.push(`rmdir -- ${shellQuote(dir.path)} 2>/dev/null || true`);
    for (const file of manifest.files) {
      lines.push(`if [ -e ${shellQuote(file.path)} ]; then echo ${shellQuote(`${file.path} is still present`)} >&2; exit ${GUEST_EXIT.stillPresent}; fi`);
    }
  }
  lines.push('sync', 'echo removed');
  return `${lines.join('\n')}\n`;
}

/** Allocate placeholders for these apps in the running guest. */
export async function allocatePlaceholders(guest: GuestShell, manifests: AppManifest[], timeoutMs?: number): Promise<void> {
  await runGuestScript(guest, allocationScript(manifests), `allocating ${manifests.map((m) => `${m.name}@${m.version}`).join(', ')}`, timeoutMs);
}

/** Delete these apps' files in the running guest. */
export async function removeAppFiles(guest: GuestShell, manifests: AppManifest[], timeoutMs?: number): Promise<void> {
  await runGuestScript(guest, removalScript(manifests), `removing ${manifests.map((m) => `${m.name}@${m.version}`).join(', ')}`, timeoutMs);
}
