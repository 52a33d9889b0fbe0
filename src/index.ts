/**
 * qlayer as a library: the functions behind every command. The CLI (src/cli) is a thin layer
 * over these; the test harness is a separate entry point, qlayer/testing.
 *
 *   import { openChain, openGuestFilesystem, Store, importBase, assignApps } from 'qlayer';
 *
 * - the qcow2 engine (src/qcow2): Qcow2Image, createImage, header and table layouts, errors;
 * - backing chains (src/chain): openChain, info, map, convert, rebase, commit, check;
 * - guest filesystems (src/fs): openGuestFilesystem over any ByteSource (a chain, a raw file);
 * - layers (src/layers): the store, apps, desktops, assign/unassign/update, recompose;
 * - virt (src/virt): libvirt boots, the guest agent, the test guest, the desktop runtime;
 * - the config file (src/config).
 * Internals (table caches, the guest-side scripts, fault injection) stay private: exports here
 * are what we keep stable.
 */
export { QlayerError, isQlayerError } from './errors.js';
export type { ByteSource, WritableByteSource } from './io/byte-source.js';
export { readBytes, windowOf, bufferSource } from './io/byte-source.js';

export * from './qcow2/index.js';
export { checkImage, type CheckOptions, type RepairMode } from './qcow2/repair.js';
export { checkExitCode, toQemuJson, type CheckResult } from './qcow2/check.js';
export { resizeImage, type ResizeOptions } from './qcow2/resize.js';
export * from './chain/index.js';
export { convertImage, type ConvertOptions, type ConvertResult } from './chain/convert.js';
export { infoImage, formatInfoText, type ImageInfo, type InfoOptions } from './chain/info.js';
export { mapImage, type MapEntry, type MapOptions } from './chain/map.js';
export { mapImageJson, formatMapJson } from './chain/map-json.js';
export type { ExtentKind } from './chain/map-layer.js';
export { rebaseImage, type RebaseOptions, type RebaseResult } from './chain/rebase.js';
export { commitImage, type CommitOptions, type CommitResult } from './chain/commit.js';
export * from './fs/index.js';
export { openDiskImage } from './fs/image.js';

// Layers: the store and everything a desktop goes through.
export { Store } from './layers/store.js';
export { LayerError } from './layers/errors.js';
export { buildApp, listApps, listAppVersions, resolveApp, appKey, payloadPath, type AppManifest, type AppFile, type AppDirectory, type BuildAppOptions } from './layers/app.js';
export type { Log } from './layers/log.js';
export { importBase, removeBase } from './layers/bases.js';
export { desktopRecord, desktopHandle } from './layers/desktop-handle.js';
export { createDesktop, startDesktop, stopDesktop, destroyDesktop } from './layers/desktop-lifecycle.js';
export { showDesktop, listDesktops, type DesktopView } from './layers/desktop-views.js';
export { recomposeDesktop, recomposeRecorded, locateOffline, assertGoneOffline } from './layers/desktop-offline.js';
export { abortOperation, undoContext } from './layers/desktop-undo.js';
export type { AssignHooks } from './layers/desktop-guest-side.js';
export { assignApps, assignLocked, type AssignResult } from './layers/desktop-assign.js';
export { updateApp, updateLocked, type UpdateResult } from './layers/desktop-update.js';
export { unassignApps, unassignLocked, type UnassignResult } from './layers/desktop-unassign.js';
export { verifyDesktop, verifyLocked, type VerifiedStatus, type VerifiedFile, type VerifyResult } from './layers/desktop-verify.js';
export { adoptDesktop, releaseDesktop, type AdoptResult, type ReleaseResult } from './layers/desktop-adopt.js';
export { assignToDesktops, defaultParallelism, type FleetOutcome, type FleetOptions } from './layers/fleet.js';
export { DelegatingRuntime, type DesktopHandle, type DesktopRuntime } from './layers/runtime.js';
export type { GuestShell } from './layers/guest-script.js';
export type { StoreState, BaseRecord, DesktopRecord, LocatedFile, RecomposePlan } from './layers/state.js';
export type { RecomposeReport } from './layers/recompose.js';

export * from './virt/index.js';
export { loadConfig, parseConfig, defaultConfigValues, ConfigError, type QlayerConfig, type LoadConfigOptions } from './config/config.js';
