/**
 * The store's one state file, as JSON. App versions are not in it: each is an immutable folder
 * (apps/NAME/VERSION/manifest.json), so listing them needs no state and no lock.
 * Paths inside it are relative to the store root so the
 * whole store can be moved or rsynced to another host.
 */
export interface StoreState {
  format: 'qlayer-store/1';
  bases: Record<string, BaseRecord>;
  desktops: Record<string, DesktopRecord>;
  /** Groups of desktops that share apps (absent in stores made before groups). */
  groups?: Record<string, GroupRecord>;
}

/**
 * A group: desktops that get the group's apps on top of their own. A change rolls out to the
 * members; a member that is running when the rollout reaches it is left pending (the user is
 * working there) and done by the next rollout of the group.
 */
export interface GroupRecord {
  desktops: string[];
  /** name@version, one version per app. */
  apps: string[];
  /** Members a rollout skipped because they ran: the next rollout does them. */
  pending: string[];
  /** The last `group rebase`: its base, and the members it left because they ran (the next `group rebase` does them). */
  rebase?: { base: string; pending: string[] };
  createdAt: string;
}

export interface BaseRecord {
  /** Relative to the store root, e.g. bases/debian.qcow2. */
  file: string;
  virtualSize: number;
  importedFrom: string;
  importedAt: string;
}

/** One placeholder located on the virtual disk: where the guest put an app file. */
export interface LocatedFile {
  app: string; // name@version
  path: string;
  size: number;
  /** Offset of this file's bytes inside the app's payload.bin. */
  payloadOffset: number;
  /** Virtual-disk byte ranges, in file order; each length a whole number of fs blocks. */
  extents: Array<{ fileOffset: number; diskOffset: number; length: number }>;
  /**
   * The placeholder was allocated with fallocate: its extents are unwritten (read as zeros) until
   * the recompose marks them written, its last step. Absent or false: written zeros.
   */
  unwritten?: boolean;
  /**
   * The placeholder's inode number and mtime (seconds) when it was located. A later verify that
   * finds the file changed tells a user's edit (new inode or mtime) from damage (neither moved).
   * Absent in records made before they were kept.
   */
  inode?: number;
  mtime?: number;
}

export type RecomposePhase =
  | 'planned' // plan recorded; nothing written yet
  | 'apps-written' // new apps layer complete and durable
  | 'relinked' // user delta's backing file points at the new apps layer
  | 'user-patched' // app bytes written into partly covered user clusters
  | 'detached' // fully covered user clusters cleared (read from apps layer)
  | 'marked-written' // unwritten placeholders' extents flipped to written in the guest filesystem
  | 'done';

/** An interrupted or pending recompose, recorded before the first write so a rerun finishes it. */
export interface RecomposePlan {
  phase: RecomposePhase;
  /** Apps after this recompose (name@version), in assignment order. */
  apps: string[];
  /** Files of apps that stay assigned or are newly assigned, with their extents. */
  files: LocatedFile[];
  /** Extents of the files of apps being removed (their blocks were freed by the guest). */
  removedExtents: Array<{ diskOffset: number; length: number }>;
  /** Names of the files just assigned: their user-delta clusters get dropped or patched. */
  newlyAssigned: string[];
  fromGeneration: number;
  toGeneration: number;
  startedAt: string;
  /** Runs started on this plan; more than one means an earlier run stopped part-way. */
  attempts?: number;
  /**
   * The plan of a change made `--at-next-boot`: a start (libvirt's hook) finishes it if a run
   * stopped part-way. Absent: qlayer's own, which only `desktop recompose` finishes.
   */
  atNextBoot?: boolean;
}

/**
 * The guest-side half of an assign or update, recorded before the guest is touched and cleared
 * once the recompose plan takes over (or once it is undone). While it is set, the guest may hold
 * placeholders the store does not know as apps: the next command on the desktop, or
 * `desktop assign --abort`, removes them.
 */
export interface GuestOperation {
  kind: 'assign' | 'update';
  /** Apps whose placeholders the guest gets (name@version). */
  apps: string[];
  /** Apps an update replaces; their files were deleted in the guest first. */
  replacing: string[];
  phase: 'allocating' | 'allocated' | 'rolling-back';
  /** What the guest got from this operation: null while unknown (then every app path is checked). */
  created: { files: Array<{ path: string; size: number }>; dirs: string[] } | null;
  /** The desktop ran before the operation: an undo leaves it running, else stopped. */
  wasRunning: boolean;
  startedAt: string;
  /** Why it is being undone. */
  failure: { code: string; message: string } | null;
}

/**
 * The host half of an assign or unassign `--at-next-boot`: the guest half (placeholders
 * allocated, or the app's files deleted) is done; locating and recomposing wait for the next
 * start. Why the last attempt did not run is not kept here: the hook may find the store locked,
 * so it writes that beside the desktop (src/layers/pending-boot-status.ts).
 */
export interface PendingBootChange {
  kind: 'assign' | 'unassign';
  /** name@version. */
  refs: string[];
  requestedAt: string;
  /** What the allocation made in the guest (assign), for `desktop assign --abort`. */
  created: { files: Array<{ path: string; size: number }>; dirs: string[] } | null;
}

export interface DesktopRecord {
  base: string;
  /** Relative to the store root. */
  dir: string;
  /** The apps layer in use is apps.<generation>.qcow2 in the desktop's folder. */
  appsGeneration: number;
  /** Composed apps with their located files, in assignment order. */
  apps: string[];
  /**
   * The apps assigned to this desktop itself, as opposed to through its groups (absent in
   * stores made before groups: then every app is its own).
   */
  directApps?: string[];
  files: LocatedFile[];
  recompose: RecomposePlan | null;
  /** The libvirt domain of an adopted VM, which keeps its own name (absent: qlayer's name). */
  domain?: string;
  /** An assign or update whose guest side has not finished or not been undone (absent: none). */
  operation?: GuestOperation | null;
  /**
   * An assign or unassign done in the running guest whose recompose waits for the desktop's next
   * start (`--at-next-boot`): libvirt's QEMU hook runs it before QEMU opens the disk (absent: none).
   */
  pendingBoot?: PendingBootChange | null;
  /**
   * The desktop's persistent home disk (absent: none): its own qcow2 with no backing file,
   * never recomposed and never part of the system chain; a rebase keeps it.
   */
  home?: HomeDisk;
  /** A rebase onto another base that has not finished (absent or null: none). See rebase.ts. */
  rebase?: RebaseOperation | null;
  /** Set on the staging desktop a rebase builds its new system chain in: the desktop it is for. */
  stagingFor?: string;
  createdAt: string;
}

export interface HomeDisk {
  /** Relative to the store root, e.g. desktops/NAME/home.qcow2. */
  file: string;
  /** Virtual size in bytes. */
  size: number;
  /** The ext4 label the guest's fstab names it by. */
  label: string;
  createdAt: string;
}

/**
 * The steps of a rebase, each recorded once durable:
 * planned -> staged (new chain and the staging desktop made) -> assigned (apps placed and
 * recomposed in the new chain) -> verified (booted, app files hashed) -> switched (the desktop's
 * record points at the new chain: from here the old chain is garbage) -> done.
 */
export type RebasePhase = 'planned' | 'staged' | 'assigned' | 'verified' | 'switched';

export interface RebaseOperation {
  phase: RebasePhase;
  from: string;
  to: string;
  /** The staging desktop (a record of its own in `desktops`) that holds the new chain until the switch. */
  staging: string;
  /** The old chain's folder (relative), removed last. */
  oldDir: string;
  /** The new chain's folder (relative): the staging desktop's, the desktop's after the switch. */
  newDir: string;
  /** Apps the desktop had, placed again in the new chain. */
  apps: string[];
  startedAt: string;
}

export function emptyState(): StoreState {
  return { format: 'qlayer-store/1', bases: {}, desktops: {} };
}

/** A new desktop on `base`, with no apps yet: apps.0.qcow2 is an empty layer over the base. */
export function newDesktopRecord(base: string, dir: string): DesktopRecord {
  return { base, dir, appsGeneration: 0, apps: [], files: [], recompose: null, createdAt: new Date().toISOString() };
}
