import { lstatSync, symlinkSync } from 'node:fs';
import { open, readlink, rename, rm, symlink } from 'node:fs/promises';
import { basename, dirname, join, relative } from 'node:path';
import { nodeFileSystem, type FileSystemAccess, type HostFile } from '../io/host-file.js';
import { punchHoles } from '../io/punch-hole.js';
import { openChain, type Chain } from '../chain/chain.js';
import { markPlaceholdersWritten } from '../fs/index.js';
import { Qcow2Image } from '../qcow2/image.js';
import { checkImage } from '../qcow2/repair.js';
import { AppBytes } from './app-bytes.js';
import { writeAppsLayer } from './apps-layer.js';
import { LayerError } from './errors.js';
import { classifyClusters } from './ranges.js';
import type { DesktopRecord, RecomposePlan } from './state.js';

/** Largest single write into an image while composing; big enough to coalesce, small enough to stream. */
const COPY_CHUNK = 8 << 20;

export interface RecomposeContext {
  /** The desktop folder, holding apps.N.qcow2 and user.qcow2. */
  desktopDir: string;
  /** The base image the apps layer sits on (absolute path). */
  basePath: string;
  /** Backing files must lie inside these folders (the store). */
  allowedDirectories: string[];
  /** The desktop's record in the store state; updated in place as phases complete. */
  record: DesktopRecord;
  /** Absolute path of an app version's payload.bin, by name@version. */
  payloadPath: (app: string) => string;
  /** Persist the store state (the record is part of it). Called after every phase. */
  persist: () => Promise<void>;
  fs?: FileSystemAccess;
  log?: (message: string) => void;
  /** Copy app bytes into the apps layer even where the store's file system could share them. */
  noClone?: boolean;
}

export interface RecomposeReport {
  appsLayer: string;
  generation: number;
  appBytesWritten: number;
  clustersDropped: number;
  bytesPatchedInUserDelta: number;
  leakedClustersReclaimed: number;
  /** User-delta bytes whose host blocks were punched out after their clusters were freed. */
  bytesReturnedToHost: number;
  /** Unwritten (fallocated) placeholder extents flipped to written in the guest filesystem. */
  extentsMarkedWritten: number;
  /** Bytes of the new apps layer that share the payloads' host blocks (reflink). */
  bytesSharedWithPayloads: number;
  /** Bytes written into the new apps layer: app bytes not shared, base bytes of partly covered clusters. */
  bytesCopiedIntoAppsLayer: number;
  /** Why app bytes were copied rather than shared (null when all were shared, or nothing was written). */
  cloneUnavailable: string | null;
  resumed: boolean;
}

export const appsLayerName = (generation: number): string => `apps.${generation}.qcow2`;
export const USER_LAYER = 'user.qcow2';

/**
 * The stable name of the desktop's apps layer: a symbolic link to apps.N.qcow2 in the same
 * folder. The domain's XML names this link in its explicit <backingStore> chain, never the
 * generation, because libvirt fixes a start's chain from the XML before its QEMU hook runs: a
 * recompose done by the hook (assign at the next boot) changes the generation after that, and
 * QEMU must open the new one. The recompose repoints the link in its relink phase (together with
 * the user delta's backing-file name) and again, idempotently, at its end.
 */
export const APPS_LINK = 'apps.qcow2';

/**
 * Point desktopDir/apps.qcow2 at apps.<generation>.qcow2, atomically (a new link renamed over
 * the old one, then the folder fsynced). Nothing to do when it already does.
 */
export async function pointAppsLink(desktopDir: string, generation: number): Promise<void> {
  const link = join(desktopDir, APPS_LINK);
  const target = appsLayerName(generation);
  if ((await readlink(link).catch(() => null)) === target) return;
  const temporary = `${link}.${process.pid}.tmp`;
  await rm(temporary, { force: true });
  await symlink(target, temporary);
  await rename(temporary, link);
  const dir = await open(desktopDir, 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}

/**
 * The link for a desktop that has none yet (one made before the link existed), created at the
 * generation its record names. An existing link is left alone: during a recompose it may point
 * at the next generation already.
 */
export function ensureAppsLinkSync(desktopDir: string, generation: number): void {
  const link = join(desktopDir, APPS_LINK);
  try {
    lstatSync(link);
    return;
  } catch {
    // absent: made below
  }
  try {
    symlinkSync(appsLayerName(generation), link);
  } catch {
    // Another process made it meanwhile, or the folder is gone (the caller's next step says so).
  }
}

/** Open every payload the plan needs once; close them all afterwards. */
async function openPayloads(plan: RecomposePlan, ctx: RecomposeContext, fs: FileSystemAccess): Promise<Map<string, HostFile>> {
  const payloads = new Map<string, HostFile>();
  for (const app of new Set(plan.files.map((f) => f.app))) payloads.set(app, await fs.open(ctx.payloadPath(app), 'read'));
  return payloads;
}

/** Write `ranges` of app bytes into an image with large coalesced writes. */
async function writeAppRanges(image: Qcow2Image, bytes: AppBytes, ranges: Array<{ offset: number; length: number }>): Promise<number> {
  let written = 0;
  const buffer = Buffer.allocUnsafe(COPY_CHUNK);
  for (const range of ranges) {
    for (let done = 0; done < range.length; ) {
      const piece = buffer.subarray(0, Math.min(COPY_CHUNK, range.length - done));
      await bytes.read(piece, range.offset + done);
      await image.write(piece, range.offset + done);
      done += piece.length;
      written += piece.length;
    }
  }
  return written;
}

/**
 * Carry out (or finish) the desktop's recorded recompose plan, in the order that keeps every
 * image readable with the same user data if it stops at any write:
 *   1. write the new apps layer completely, fsync it and its folder;
 *   2. point the user delta's backing file at it (invisible: it reads like the old chain
 *      everywhere except inside the new placeholders, which the user delta still covers);
 *   3. write the app bytes into user clusters the placeholders cover only partly (only
 *      placeholder bytes change, from zeros to the app's bytes);
 *   4. clear the L2 entries of fully covered user clusters (to 0: fall through, never the zero
 *      flag), fsync; then lower their refcounts, fsync. A stop in between only leaks clusters,
 *      which the rerun reclaims;
 *   5. mark fallocated placeholders' unwritten extents written in the guest filesystem (in the
 *      user delta), fsync. Until then those files read as zeros, as they did in the guest; the
 *      flip is idempotent, so a rerun finishes it.
 * The apps layer differs from the base only inside app extents (partly covered clusters are
 * patched in the user delta, never copied into the apps layer), so a new one is a pure function
 * of the base and the assigned files: nothing from the old one needs carrying over.
 */
export async function runRecompose(ctx: RecomposeContext): Promise<RecomposeReport> {
  const plan = ctx.record.recompose;
  if (!plan) throw new LayerError('recompose.nothing-pending', 'this desktop has no recompose to run');
  const fs = ctx.fs ?? nodeFileSystem;
  const log = ctx.log ?? (() => {});
  const resumed = plan.phase !== 'planned' || (plan.attempts ?? 0) > 0;
  plan.attempts = (plan.attempts ?? 0) + 1;
  await ctx.persist();

  const newName = appsLayerName(plan.toGeneration);
  const newPath = join(ctx.desktopDir, newName);
  const userPath = join(ctx.desktopDir, USER_LAYER);
  const report: RecomposeReport = {
    appsLayer: newPath,
    generation: plan.toGeneration,
    appBytesWritten: 0,
    clustersDropped: 0,
    bytesPatchedInUserDelta: 0,
    leakedClustersReclaimed: 0,
    bytesReturnedToHost: 0,
    extentsMarkedWritten: 0,
    bytesSharedWithPayloads: 0,
    bytesCopiedIntoAppsLayer: 0,
    cloneUnavailable: null,
    resumed,
  };
  const advance = async (phase: RecomposePlan['phase']): Promise<void> => {
    plan.phase = phase;
    await ctx.persist();
  };

  const payloads = await openPayloads(plan, ctx, fs);
  const payloadOf = (app: string): HostFile => {
    const file = payloads.get(app);
    if (!file) throw new LayerError('recompose.no-payload', `no payload open for ${app}`);
    return file;
  };
  let user: Qcow2Image | null = null;
  let chain: Chain | null = null;
  try {
    user = await Qcow2Image.open(userPath, { writable: true, fs });

    // Phase 1. If the user delta already points at the new layer, a previous run finished it.
    if (plan.phase === 'planned' && user.backingFile !== newName) {
      log(`writing ${newName} (${plan.files.length} app files)`);
      const base = await openChain(ctx.basePath, { allowedDirectories: ctx.allowedDirectories, fs });
      try {
        const written = await writeAppsLayer({
          path: newPath,
          size: user.size,
          backing: { path: relative(ctx.desktopDir, ctx.basePath), format: 'qcow2' },
          base,
          files: plan.files,
          payloadOf,
          fs,
          ...(ctx.noClone ? { noClone: true } : {}),
        });
        report.appBytesWritten = plan.files.reduce((n, f) => n + f.size, 0);
        report.bytesSharedWithPayloads = written.bytesCloned;
        report.bytesCopiedIntoAppsLayer = written.bytesCopied;
        report.cloneUnavailable = written.cloneUnavailable;
        if (written.cloneUnavailable && plan.files.length) log(`app bytes copied, not shared: ${written.cloneUnavailable}`);
      } finally {
        await base.close();
      }
    }
    if (plan.phase === 'planned') await advance('apps-written');

    // Phase 2: relink.
    if (plan.phase === 'apps-written') {
      if (user.backingFile !== newName) {
        log(`relinking ${USER_LAYER} onto ${newName}`);
        await user.setBackingFile(newName, 'qcow2');
      }
      // The link the domain's XML names follows the user delta's backing file in the same phase.
      await pointAppsLink(ctx.desktopDir, plan.toGeneration);
      await advance('relinked');
    }

    // From here on, writes to the user delta may need its (new) backing chain for copy-on-write.
    await user.close();
    user = null;
    chain = await openChain(userPath, { writableTop: true, allowedDirectories: ctx.allowedDirectories, fs });
    const userImage = chain.topImage;

    const newlyAssigned = new Set(plan.newlyAssigned);
    const newFiles = plan.files.filter((f) => newlyAssigned.has(f.path));
    const newBytes = new AppBytes(newFiles, payloadOf);
    const coverage = classifyClusters(newBytes.ranges(), userImage.clusterSize);

    // Phase 3: partly covered user clusters keep their other bytes; patch the app bytes in.
    if (plan.phase === 'relinked') {
      const patch: Array<{ offset: number; length: number }> = [];
      for (const piece of coverage.partial) {
        if ((await userImage.mappingOf(piece.offset)).kind !== 'unallocated') patch.push(piece);
      }
      report.bytesPatchedInUserDelta = await writeAppRanges(userImage, newBytes, patch);
      await userImage.flush();
      await advance('user-patched');
    }

    // Phase 4: drop fully covered clusters, then their refcounts.
    if (plan.phase === 'user-patched') {
      const freed = await userImage.detachClusters(coverage.full);
      report.clustersDropped = freed.length;
      // Fallocated placeholders wrote no data, so most of the clusters they cover hold none.
      log(`${coverage.full.length} user clusters lie wholly under placeholders; ${freed.length} of them held data and now read from the apps layer`);
      await advance('detached');
      await userImage.releaseHostClusters(freed);
      // Only clusters whose refcount is durably 0 give their blocks back to the host.
      const free: Array<{ offset: number; length: number }> = [];
      for (const offset of freed) {
        if ((await userImage.refcountOf(offset / userImage.clusterSize)) === 0) free.push({ offset, length: userImage.clusterSize });
      }
      if (free.length && (await punchHoles(userPath, free))) report.bytesReturnedToHost = free.length * userImage.clusterSize;
    }

    // Phase 5: the app bytes are in place under every placeholder; let fallocated ones read them.
    if (plan.phase === 'detached') {
      const unwritten = newFiles.filter((f) => f.unwritten && f.extents.length > 0);
      if (unwritten.length) {
        log(`marking ${unwritten.length} placeholders written in the guest filesystem`);
        const activeChain = chain;
        const disk = { size: activeChain.size, readAt: (into: Uint8Array, at: number) => activeChain.readAt(into, at), writeAt: (data: Uint8Array, at: number) => userImage.write(data, at) };
        const marked = await markPlaceholdersWritten(disk, unwritten);
        await userImage.flush();
        report.extentsMarkedWritten = marked.extentsFlipped;
      }
      await advance('marked-written');
    }
    await chain.close();
    chain = null;

    // A run that stopped between clearing L2 entries and lowering refcounts leaked clusters.
    if (resumed) {
      const check = await checkImage(userPath, { repair: 'leaks', fs });
      report.leakedClustersReclaimed = check.leaksFixed ?? 0;
    }

    // Done: the old apps layer is referenced by nothing now (the link is repointed first, again:
    // a run resumed past the relink phase may not have repointed it).
    await pointAppsLink(ctx.desktopDir, plan.toGeneration);
    if (plan.fromGeneration !== plan.toGeneration) {
      await rm(join(ctx.desktopDir, appsLayerName(plan.fromGeneration)), { force: true });
    }
    ctx.record.apps = plan.apps;
    ctx.record.files = plan.files;
    ctx.record.appsGeneration = plan.toGeneration;
    ctx.record.recompose = null;
    await ctx.persist();
    log(`recomposed: ${basename(dirname(userPath))} now has ${plan.apps.length ? plan.apps.join(', ') : 'no apps'}`);
    return report;
  } finally {
    if (user) await user.close().catch(() => {});
    if (chain) await chain.close().catch(() => {});
    for (const file of payloads.values()) await file.close().catch(() => {});
  }
}
