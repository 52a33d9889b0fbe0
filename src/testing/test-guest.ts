/**
 * The small test guest (vm-fixtures/: a Debian cloud kernel, a busybox root disk with
 * qemu-guest-agent) as boot() options. It is built on first use and cached the way the repo's
 * own tests cache it (src/virt/fixture.ts: $QLAYER_FIXTURES_CACHE, else .cache/vm-fixtures in
 * the package); later calls take seconds. It boots in a few seconds under TCG.
 */
import { ensureFixture } from '../virt/fixture.js';
import type { BootMode } from './options.js';

export interface TestGuest {
  /** The root disk (qcow2, ext4 on the whole disk). boot() never writes it. */
  image: string;
  boot: BootMode & { mode: 'kernel' };
  /** What the guest prints on its console once it is up (for waitForConsole). */
  readyMarker: string;
  kernelRelease: string;
}

export async function testGuest(options: { cacheDir?: string } = {}): Promise<TestGuest> {
  const fixture = await ensureFixture(options.cacheDir === undefined ? {} : { cacheDir: options.cacheDir });
  const image = fixture.images.base;
  return {
    image: image.path,
    boot: { mode: 'kernel', kernel: fixture.kernel, initrd: fixture.initrd, cmdline: image.cmdline },
    readyMarker: fixture.readyMarker,
    kernelRelease: fixture.kernelRelease,
  };
}
