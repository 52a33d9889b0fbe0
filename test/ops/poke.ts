/**
 * Damage for check tests, made by poking the raw file bytes (never through the engine's writer),
 * so that what qlayer and qemu-img then report is about the file, not about our own writer.
 */
import { open, truncate } from 'node:fs/promises';
import { parseHeader } from '../../src/qcow2/header.js';
import { entryOffset, geometry, getRefcount, setRefcount } from '../../src/qcow2/layout.js';

/** The header, geometry and first refcount block of an image; the caller closes the handle. */
export async function layoutOf(path: string) {
  const handle = await open(path, 'r+');
  const length = (await handle.stat()).size;
  const first = Buffer.alloc(Math.min(length, 2 * 1024 * 1024));
  await handle.read(first, 0, first.length, 0);
  const header = parseHeader(first, length);
  const g = geometry(header.clusterBits, false, header.refcountOrder);
  const reftable = Buffer.alloc(8);
  await handle.read(reftable, 0, 8, header.refcountTableOffset);
  const block0 = entryOffset(reftable.readUInt32BE(0), reftable.readUInt32BE(4));
  return { handle, header, g, block0, length };
}

export async function setStoredRefcount(path: string, cluster: number, value: number): Promise<number> {
  const { handle, g, block0 } = await layoutOf(path);
  try {
    const block = Buffer.alloc(g.clusterSize);
    await handle.read(block, 0, block.length, block0);
    const view = new DataView(block.buffer, block.byteOffset, block.byteLength);
    const before = getRefcount(block, view, cluster, g.refcountOrder);
    setRefcount(block, view, cluster, g.refcountOrder, value);
    await handle.write(block, 0, block.length, block0);
    return before;
  } finally {
    await handle.close();
  }
}

/** Leak one cluster: append it to the file and count it in the refcounts, with nothing using it. */
export async function pokeLeak(path: string): Promise<number> {
  const { g, length, handle } = await layoutOf(path);
  await handle.close();
  const cluster = Math.ceil(length / g.clusterSize);
  await truncate(path, (cluster + 1) * g.clusterSize);
  await setStoredRefcount(path, cluster, 1);
  return cluster;
}
