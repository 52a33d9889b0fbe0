/**
 * Remove what dead test processes left behind: harness domains whose owner no longer runs, and
 * their folders (overlays, snapshots, private stores). boot() calls it first; reap() is the
 * same on demand (a CI step after a killed job, or `node -e "import('qlayer/testing').then(m => m.reap())"`).
 * Only harness names (qlayer-test-…) are touched: desktops and the CLI's domains are not ours.
 */
import { readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { DEFAULT_URI, LibvirtConnection } from '../virt/libvirt.js';
import { domainOwnerAlive, ownerAlive, readOwner, TEST_DOMAIN_PREFIX, workspaceRoot } from './owner.js';

export interface ReapOptions {
  /** libvirt connection, default qemu:///system. */
  uri?: string;
}

export interface ReapResult {
  /** Domains destroyed (and undefined). */
  domains: string[];
  /** VM folders deleted. */
  folders: string[];
}

/** A folder with no owner.json is one being made right now, unless it is older than this. */
const ORPHAN_FOLDER_AGE_MS = 10 * 60_000;

/** The VM folder a domain belongs to: the domain's name up to its first suffix (`-apps`). */
const folderOf = (domain: string): string => domain.slice(0, TEST_DOMAIN_PREFIX.length + 12);

export async function reap(options: ReapOptions = {}): Promise<ReapResult> {
  const root = workspaceRoot();
  const deadFolders = new Set<string>();
  let entries: string[] = [];
  try {
    entries = readdirSync(root).filter((name) => name.startsWith(TEST_DOMAIN_PREFIX));
  } catch {
    entries = []; // no workspace yet
  }
  for (const name of entries) {
    const dir = join(root, name);
    const owner = readOwner(dir);
    if (owner !== null ? !ownerAlive(owner) : ageMs(dir) > ORPHAN_FOLDER_AGE_MS) deadFolders.add(name);
  }

  const result: ReapResult = { domains: [], folders: [] };
  const connection = await LibvirtConnection.open(options.uri ?? DEFAULT_URI);
  try {
    for (const info of await connection.listQlayerDomains()) {
      if (!info.name.startsWith(TEST_DOMAIN_PREFIX)) continue;
      const folder = folderOf(info.name);
      // The folder's owner.json is exact (pid + start ticks); the domain's metadata is the fallback.
      const folderOwner = entries.includes(folder) ? readOwner(join(root, folder)) : null;
      const dead =
        deadFolders.has(folder) ||
        (folderOwner !== null ? !ownerAlive(folderOwner) : info.owner !== undefined ? !domainOwnerAlive(info.owner) : info.state === 'shutoff');
      if (!dead) continue;
      await connection.remove(info.name);
      result.domains.push(info.name);
    }
  } finally {
    await connection.close();
  }
  // Folders only after their domains are gone: QEMU may still hold the overlay open until then.
  for (const name of deadFolders) {
    rmSync(join(root, name), { recursive: true, force: true });
    result.folders.push(name);
  }
  return result;
}

function ageMs(dir: string): number {
  try {
    return Date.now() - statSync(dir).mtimeMs;
  } catch {
    return 0;
  }
}
