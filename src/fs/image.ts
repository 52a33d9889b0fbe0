/**
 * Opening a disk image file for the guest-filesystem reader: a qcow2 image (with its whole
 * backing chain, through src/chain) or a raw file, told apart by the qcow2 magic "QFI\xfb".
 * The format is detected only to choose between these two readers; a qcow2's backing files are
 * still opened with their recorded formats, never probed.
 */
import type { ByteSource } from '../io/byte-source.js';
import { nodeFileSystem, rawFileSource, type FileSystemAccess } from '../io/host-file.js';
import { openChain, type OpenChainOptions } from '../chain/index.js';

export const QCOW2_MAGIC = Buffer.from([0x51, 0x46, 0x49, 0xfb]);

export interface OpenedDisk {
  format: 'qcow2' | 'raw';
  source: ByteSource;
  close(): Promise<void>;
}

export async function openDiskImage(
  path: string,
  options: { fs?: FileSystemAccess; chain?: Omit<OpenChainOptions, 'fs' | 'writableTop'> } = {},
): Promise<OpenedDisk> {
  const fs = options.fs ?? nodeFileSystem;
  const file = await fs.open(path, 'read');
  const head = Buffer.alloc(4);
  await file.read(head, 0);
  if (head.equals(QCOW2_MAGIC)) {
    await file.close();
    const chain = await openChain(path, { ...options.chain, fs, writableTop: false });
    return { format: 'qcow2', source: chain, close: () => chain.close() };
  }
  return { format: 'raw', source: await rawFileSource(file), close: () => file.close() };
}
