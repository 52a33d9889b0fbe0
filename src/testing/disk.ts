/**
 * The disk a harness VM runs on: a throwaway qcow2 overlay over the user's image. The image is
 * only ever read (the chain engine opens it read-only, QEMU sees it as a backing layer), so many
 * VMs, in one test file or in parallel files, share one image safely.
 */
import { copyFile, constants as fsConstants, open, stat } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { openChain } from '../chain/chain.js';
import { createImage } from '../qcow2/create.js';
import type { DiskLayer } from '../virt/domain-xml.js';
import { TestingError } from './errors.js';

/** qcow2 by its magic, raw otherwise: the user names this file, so this is not backing-format probing. */
async function sniffFormat(path: string): Promise<'qcow2' | 'raw'> {
  const handle = await open(path, 'r');
  try {
    const magic = Buffer.alloc(4);
    await handle.read(magic, 0, 4, 0);
    return magic.toString('latin1') === 'QFI\xfb' ? 'qcow2' : 'raw';
  } finally {
    await handle.close();
  }
}

/**
 * The image and every layer below it, top first, with formats: libvirt is then given the chain
 * explicitly (nested <backingStore>), so QEMU opens exactly these files and never probes.
 */
export async function imageChain(image: string): Promise<DiskLayer[]> {
  const path = resolve(image);
  const info = await stat(path).catch(() => null);
  if (info === null) throw new TestingError('testing.image-missing', `boot: the image ${path} does not exist`);
  if (!info.isFile()) throw new TestingError('testing.image-missing', `boot: the image ${path} is not a regular file`);
  const format = await sniffFormat(path).catch((error: unknown) => {
    throw new TestingError('testing.image-missing', `boot: the image ${path} cannot be read: ${(error as Error).message}`, { cause: error });
  });
  if (format === 'raw') return [{ path, format }];
  // The engine checks the chain the way every qlayer reader does (confinement, loops, depth).
  const chain = await openChain(path, { allowedDirectories: [dirname(path)] });
  try {
    return chain.layers.map((layer) => ({ path: layer.realPath, format: layer.format }));
  } finally {
    await chain.close();
  }
}

/** A new overlay at `path` over the image chain (absolute backing name: the overlay lives elsewhere). */
export async function createOverlay(path: string, below: DiskLayer[]): Promise<void> {
  const base = below[0];
  if (base === undefined) throw new TestingError('testing.bad-option', 'createOverlay: no image to put the overlay on');
  await createImage({ path, backing: { path: base.path, format: base.format } });
}

/** Copy a disk file, sharing blocks where the host file system can (XFS, btrfs), copying otherwise. */
export async function cloneFile(from: string, to: string): Promise<void> {
  await copyFile(from, to, fsConstants.COPYFILE_FICLONE);
}
