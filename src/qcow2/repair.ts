/**
 * Repair for `check`: `leaks` lowers refcounts that are too high; `all` also raises those that are
 * too low (rebuilding the whole refcount structure when the blocks needed are missing or
 * damaged) and then rewrites wrong COPIED flags.
 */
import { nodeFileSystem, type FileSystemAccess } from '../io/host-file.js';
import { assertNotLocked } from '../io/in-use.js';
import { analyzeImage, checkCopiedFlags, type CheckResult, type CheckState } from './check.js';
import { Incompatible } from './header.js';
import { maxRefcount, setRefcount } from './layout.js';

function setEntry(block: Uint8Array, index: number, order: number, value: number): void {
  setRefcount(block, new DataView(block.buffer, block.byteOffset, block.byteLength), index, order, value);
}


export type RepairMode = 'none' | 'leaks' | 'all';

export interface CheckOptions {
  repair?: RepairMode;
  fs?: FileSystemAccess;
}

/**
 * Check an image (and repair it when asked). With a repair, the image is checked again after
 * it and the returned counts are what remains, plus how many problems were fixed, the way
 * qemu-img reports it.
 */
export async function checkImage(path: string, options: CheckOptions = {}): Promise<CheckResult> {
  const fs = options.fs ?? nodeFileSystem;
  const mode = options.repair ?? 'none';
  if (mode !== 'none') await assertNotLocked(path);
  const file = await fs.open(path, mode === 'none' ? 'read' : 'write');
  try {
    const state = await analyzeImage(file, path);
    if (mode === 'none' || (state.result.leaks === 0 && state.result.corruptions === 0)) return state.result;
    const before = state.result;
    await repairRefcounts(state, mode);
    if (mode === 'all') {
      // Flags are judged against the repaired refcounts.
      const again = await analyzeImage(file, path);
      again.result.corruptions = 0;
      again.result.messages = [];
      await checkCopiedFlags(again, true);
      await clearCorruptAndDirtyBits(again);
    }
    await file.sync();
    const after = (await analyzeImage(file, path)).result;
    after.leaksFixed = Math.max(0, before.leaks - after.leaks);
    after.corruptionsFixed = Math.max(0, before.corruptions - after.corruptions);
    after.messages = [...before.messages, ...after.messages];
    return after;
  } finally {
    await file.close();
  }
}

/**
 * After a successful full repair the refcounts are exact: clear the corrupt bit, and the dirty
 * bit (which only says "refcounts may be stale", the lazy-refcounts promise).
 */
async function clearCorruptAndDirtyBits(state: CheckState): Promise<void> {
  const clear = Incompatible.corrupt | Incompatible.dirty;
  if ((state.header.incompatibleFeatures & clear) === 0n || state.result.corruptions > 0 || state.header.version < 3) return;
  const bytes = new Uint8Array(8);
  new DataView(bytes.buffer).setBigUint64(0, state.header.incompatibleFeatures & ~clear);
  await state.file.sync();
  await state.file.write(bytes, 72);
}

async function repairRefcounts(state: CheckState, mode: RepairMode): Promise<void> {
  const { header, clusterSize, stored, references } = state;
  const perBlock = (clusterSize * 8) >> header.refcountOrder;
  const toFix = state.mismatched.filter((c) => (stored[c] ?? 0) > (references[c] ?? 0) || mode === 'all');
  const max = maxRefcount(header.refcountOrder);
  // A damaged refcount table or block is replaced whole, even if every count read right.
  const needsRebuild =
    mode === 'all' &&
    (state.refcountStructureBroken ||
      toFix.some((c) => (state.refcountTable[Math.floor(c / perBlock)] ?? 0) === 0 || (references[c] ?? 0) > max));
  if (toFix.length === 0 && !needsRebuild) return;
  if (needsRebuild) {
    await rebuildRefcountStructure(state);
    return;
  }
  // In place: group the changes by refcount block, one read and one write per block.
  const byBlock = new Map<number, number[]>();
  for (const c of toFix) {
    const index = Math.floor(c / perBlock);
    const list = byBlock.get(index) ?? [];
    list.push(c);
    byBlock.set(index, list);
  }
  const block = new Uint8Array(clusterSize);
  for (const [index, clusters] of byBlock) {
    const offset = state.refcountTable[index] ?? 0;
    if (offset === 0) continue;
    await state.file.read(block, offset);
    for (const c of clusters) {
      setEntry(block, c - index * perBlock, header.refcountOrder, Math.min(references[c] ?? 0, max));
      stored[c] = references[c] ?? 0;
    }
    await state.file.write(block, offset);
  }
}

/**
 * Write a brand-new refcount table and blocks after the end of the file, holding the computed
 * references (plus the new structures' own), then switch the header to them. The old
 * structures become unreferenced free space. Until the header write, the image is unchanged.
 */
async function rebuildRefcountStructure(state: CheckState): Promise<void> {
  const { header, clusterSize, file } = state;
  const refs = Uint32Array.from(state.references);
  for (const c of state.refcountStructureClusters) refs[c] = Math.max(0, (refs[c] ?? 0) - 1);
  const perBlock = (clusterSize * 8) >> header.refcountOrder;
  let lastUsed = refs.length - 1;
  while (lastUsed >= 0 && refs[lastUsed] === 0) lastUsed -= 1;
  const start = Math.max(lastUsed + 1, state.fileClusters);
  let blocks = 0;
  let tableClusters = 0;
  for (;;) {
    const total = start + blocks + tableClusters;
    const needBlocks = Math.ceil(total / perBlock);
    const needTable = Math.ceil((needBlocks * 8) / clusterSize);
    if (needBlocks === blocks && needTable === tableClusters) break;
    blocks = needBlocks;
    tableClusters = needTable;
  }
  const total = start + blocks + tableClusters;
  const all = new Uint32Array(total);
  all.set(refs.subarray(0, Math.min(refs.length, total)));
  for (let c = start; c < total; c += 1) all[c] = 1;
  const blockBytes = new Uint8Array(blocks * clusterSize);
  for (let c = 0; c < total; c += 1) {
    const value = all[c] ?? 0;
    if (value === 0) continue;
    const b = Math.floor(c / perBlock);
    setEntry(blockBytes.subarray(b * clusterSize, (b + 1) * clusterSize), c - b * perBlock, header.refcountOrder, Math.min(value, maxRefcount(header.refcountOrder)));
  }
  const table = new Uint8Array(tableClusters * clusterSize);
  const tv = new DataView(table.buffer);
  for (let b = 0; b < blocks; b += 1) {
    const offset = (start + b) * clusterSize;
    tv.setUint32(b * 8, Math.floor(offset / 0x100000000));
    tv.setUint32(b * 8 + 4, offset >>> 0);
  }
  await file.write(blockBytes, start * clusterSize);
  await file.write(table, (start + blocks) * clusterSize);
  await file.sync();
  const fields = new Uint8Array(12);
  const fv = new DataView(fields.buffer);
  const tableOffset = (start + blocks) * clusterSize;
  fv.setUint32(0, Math.floor(tableOffset / 0x100000000));
  fv.setUint32(4, tableOffset >>> 0);
  fv.setUint32(8, tableClusters);
  await file.write(fields, 48);
  await file.sync();
  state.stored = all.subarray(0, state.stored.length);
}
