/**
 * After the whole run: e2e tests define persistent domains for their desktops and then delete
 * their temporary folders, which leaves shut-off domains whose disks are gone. Remove those (what
 * `qlayer vm cleanup` removes: never a running domain, nor one whose disk still exists, so a
 * concurrent run on the same host keeps its own).
 */
import { existsSync } from 'node:fs';

export async function teardown(): Promise<void> {
  if (!existsSync('/var/run/libvirt/libvirt-sock') && !existsSync('/run/libvirt/libvirt-sock')) return;
  try {
    const { withConnection } = await import('../src/virt/libvirt.js');
    const removed = await Promise.race([
      withConnection(undefined, (connection) => connection.cleanupStale()),
      new Promise<string[]>((resolve) => setTimeout(() => resolve([]), 30_000).unref()),
    ]);
    if (removed.length) console.log(`removed ${removed.length} shut-off test domains whose disks are gone: ${removed.join(', ')}`);
  } catch (error) {
    console.log(`could not tidy up test domains: ${(error as Error).message}`);
  }
}
