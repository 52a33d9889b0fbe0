/**
 * Images for the ops tests, built by qemu-img and qemu-io only (the oracle), across the
 * features the engine must agree on. Each fixture is a top image path (chains included).
 */
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { qemuCreate, qemuImg, qemuIo, seededRandom } from '../helpers/qemu.js';

export interface Fixture {
  name: string;
  path: string;
  /** Images whose host files have holes inside allocated data (qemu reports zero there). */
  sparseData?: boolean;
}

/** A fully written (non-sparse) raw file with pseudo-random content. */
export async function writeRandomRaw(path: string, size: number, seed: number): Promise<void> {
  const random = seededRandom(seed);
  const data = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) data.writeUInt32LE(Math.floor(random() * 2 ** 32) >>> 0, i);
  await writeFile(path, data);
}

export async function buildFixtures(dir: string): Promise<Fixture[]> {
  const f = (name: string) => join(dir, name);
  const out: Fixture[] = [];

  // v3 default, with data, zero clusters and a discarded range.
  await qemuCreate(f('v3.qcow2'), '64M');
  await qemuIo(f('v3.qcow2'), ['write -P 1 0 1M', 'write -z 2M 1M', 'write -P 2 5M 64k', 'write -P 3 40M 3M', 'discard 40M 1M']);
  out.push({ name: 'v3', path: f('v3.qcow2') });

  // v2 (compat=0.10): no zero flag, zeros are written as data or left unallocated.
  await qemuCreate(f('v2.qcow2'), '16M', { compat: '0.10' });
  await qemuIo(f('v2.qcow2'), ['write -P 5 64k 192k', 'write -P 6 8M 1M']);
  out.push({ name: 'v2', path: f('v2.qcow2') });

  // Small and large clusters, narrow and wide refcounts.
  await qemuCreate(f('c4k-r1.qcow2'), '8M', { cluster_size: 4096, refcount_bits: 1 });
  await qemuIo(f('c4k-r1.qcow2'), ['write -P 7 4k 12k', 'write -P 8 1M 300k']);
  out.push({ name: 'cluster 4k, refcount 1', path: f('c4k-r1.qcow2') });

  await qemuCreate(f('c2m-r64.qcow2'), '20M', { cluster_size: '2M', refcount_bits: 64 });
  await qemuIo(f('c2m-r64.qcow2'), ['write -P 9 0 100k', 'write -P 10 6M 2M']);
  out.push({ name: 'cluster 2M, refcount 64', path: f('c2m-r64.qcow2') });

  await qemuCreate(f('c512-r8.qcow2'), '2M', { cluster_size: 512, refcount_bits: 8 });
  await qemuIo(f('c512-r8.qcow2'), ['write -P 11 0 4k', 'write -P 12 100k 10k']);
  out.push({ name: 'cluster 512, refcount 8', path: f('c512-r8.qcow2') });

  // Extended L2 with subcluster writes and zeroes.
  await qemuCreate(f('xl2.qcow2'), '16M', { cluster_size: '128k', extended_l2: true });
  await qemuIo(f('xl2.qcow2'), ['write -P 13 4k 4k', 'write -z 64k 8k', 'write -P 14 1M 200k', 'write -z 4M 128k']);
  out.push({ name: 'extended L2', path: f('xl2.qcow2') });

  // Lazy refcounts (clean shutdown), zstd compressed clusters.
  await qemuCreate(f('lazy.qcow2'), '8M', { lazy_refcounts: true });
  await qemuIo(f('lazy.qcow2'), ['write -P 15 0 2M']);
  out.push({ name: 'lazy refcounts', path: f('lazy.qcow2') });

  await qemuCreate(f('zstd.qcow2'), '8M', { compression_type: 'zstd' });
  await qemuIo(f('zstd.qcow2'), ['write -c -P 16 0 64k', 'write -c -P 17 192k 128k', 'write -P 18 1M 64k']);
  out.push({ name: 'zstd compressed', path: f('zstd.qcow2') });

  // Deflate compressed by qemu-img convert -c from a chain-free image.
  await writeRandomRaw(f('src.raw'), 2 * 1024 * 1024, 1);
  await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', '-c', f('src.raw'), f('zlib.qcow2')]);
  out.push({ name: 'zlib compressed', path: f('zlib.qcow2') });

  // Internal snapshots: data shared between the snapshot and the active table.
  await qemuCreate(f('snap.qcow2'), '8M');
  await qemuIo(f('snap.qcow2'), ['write -P 19 0 1M']);
  await qemuImg(['snapshot', '-c', 'first', f('snap.qcow2')]);
  await qemuIo(f('snap.qcow2'), ['write -P 20 512k 1M']);
  await qemuImg(['snapshot', '-c', 'second', f('snap.qcow2')]);
  out.push({ name: 'snapshots', path: f('snap.qcow2') });

  // Persistent bitmap.
  await qemuCreate(f('bitmap.qcow2'), '8M');
  await qemuIo(f('bitmap.qcow2'), ['write -P 21 0 64k']);
  await qemuImg(['bitmap', '--add', f('bitmap.qcow2'), 'b0']);
  out.push({ name: 'bitmap', path: f('bitmap.qcow2') });

  // External data file (raw): guest data at host offset == guest offset.
  await qemuCreate(f('df.qcow2'), '4M', { data_file: f('df.data'), data_file_raw: true });
  await qemuIo(f('df.qcow2'), ['write -P 22 64k 128k']);
  out.push({ name: 'external data file', path: f('df.qcow2'), sparseData: true });

  // A depth-3 chain over a fully written raw base, layers of different sizes.
  await writeRandomRaw(f('base.raw'), 4 * 1024 * 1024, 2);
  await qemuCreate(f('l1.qcow2'), '6M', {}, { backing: 'base.raw', backingFormat: 'raw' });
  await qemuIo(f('l1.qcow2'), ['write -P 23 1M 256k', 'write -z 3M 64k', 'write -P 24 5M 64k']);
  await qemuCreate(f('l2.qcow2'), '', {}, { backing: 'l1.qcow2', backingFormat: 'qcow2' });
  await qemuIo(f('l2.qcow2'), ['write -P 25 1088k 64k', 'write -P 26 2M 32k']);
  await qemuCreate(f('l3.qcow2'), '8M', {}, { backing: 'l2.qcow2', backingFormat: 'qcow2' });
  await qemuIo(f('l3.qcow2'), ['write -P 27 0 64k', 'write -z 1M 64k', 'write -P 28 7M 64k']);
  out.push({ name: 'chain depth 3 over raw', path: f('l3.qcow2') });

  return out;
}
