/**
 * ext4 feature bits (superblock s_feature_compat / incompat / ro_compat) and the subset this
 * read-only reader understands. Compatible features never change how data is found, so all of
 * them are accepted; an incompatible or read-only-compatible bit outside the known sets is
 * refused, because it may change the on-disk layout.
 */

export const INCOMPAT = {
  COMPRESSION: 0x1,
  FILETYPE: 0x2,
  RECOVER: 0x4,
  JOURNAL_DEV: 0x8,
  META_BG: 0x10,
  EXTENTS: 0x40,
  BIT64: 0x80,
  MMP: 0x100,
  FLEX_BG: 0x200,
  EA_INODE: 0x400,
  DIRDATA: 0x1000,
  CSUM_SEED: 0x2000,
  LARGEDIR: 0x4000,
  INLINE_DATA: 0x8000,
  ENCRYPT: 0x10000,
  CASEFOLD: 0x20000,
} as const;

export const RO_COMPAT = {
  SPARSE_SUPER: 0x1,
  LARGE_FILE: 0x2,
  BTREE_DIR: 0x4,
  HUGE_FILE: 0x8,
  GDT_CSUM: 0x10,
  DIR_NLINK: 0x20,
  EXTRA_ISIZE: 0x40,
  HAS_SNAPSHOT: 0x80,
  QUOTA: 0x100,
  BIGALLOC: 0x200,
  METADATA_CSUM: 0x400,
  REPLICA: 0x800,
  READONLY: 0x1000,
  PROJECT: 0x2000,
  SHARED_BLOCKS: 0x4000,
  VERITY: 0x8000,
  ORPHAN_PRESENT: 0x10000,
} as const;

export const COMPAT_HAS_JOURNAL = 0x4;

/** Incompatible features this reader handles (RECOVER is handled by refusing, separately). */
export const SUPPORTED_INCOMPAT =
  INCOMPAT.FILETYPE |
  INCOMPAT.RECOVER |
  INCOMPAT.META_BG |
  INCOMPAT.EXTENTS |
  INCOMPAT.BIT64 |
  INCOMPAT.MMP |
  INCOMPAT.FLEX_BG |
  INCOMPAT.EA_INODE |
  INCOMPAT.CSUM_SEED |
  INCOMPAT.LARGEDIR |
  INCOMPAT.INLINE_DATA |
  // Encryption is per inode: plain files on such a filesystem read fine, encrypted inodes are refused.
  INCOMPAT.ENCRYPT;

/** Read-only-compatible features that do not change where a file's bytes are. */
export const SUPPORTED_RO_COMPAT =
  RO_COMPAT.SPARSE_SUPER |
  RO_COMPAT.LARGE_FILE |
  RO_COMPAT.BTREE_DIR |
  RO_COMPAT.HUGE_FILE |
  RO_COMPAT.GDT_CSUM |
  RO_COMPAT.DIR_NLINK |
  RO_COMPAT.EXTRA_ISIZE |
  RO_COMPAT.QUOTA |
  RO_COMPAT.BIGALLOC |
  RO_COMPAT.METADATA_CSUM |
  RO_COMPAT.READONLY |
  RO_COMPAT.PROJECT |
  RO_COMPAT.SHARED_BLOCKS |
  RO_COMPAT.VERITY |
  RO_COMPAT.ORPHAN_PRESENT;

const INCOMPAT_NAMES: Record<number, string> = {
  [INCOMPAT.COMPRESSION]: 'compression',
  [INCOMPAT.JOURNAL_DEV]: 'journal_dev (this is an external journal device, not a filesystem)',
  [INCOMPAT.DIRDATA]: 'dirdata',
  [INCOMPAT.CASEFOLD]: 'casefold',
};

const RO_COMPAT_NAMES: Record<number, string> = {
  [RO_COMPAT.HAS_SNAPSHOT]: 'snapshot',
  [RO_COMPAT.REPLICA]: 'replica',
};

/** Names of the bits set in `value` and not in `supported` (unknown bits as hex). */
export function unsupportedBits(value: number, supported: number, names: Record<number, string>): string[] {
  const out: string[] = [];
  for (let bit = 0; bit < 32; bit += 1) {
    const mask = 2 ** bit;
    if (Math.floor(value / mask) % 2 === 1 && Math.floor(supported / mask) % 2 === 0) {
      out.push(names[mask] ?? `unknown bit 0x${mask.toString(16)}`);
    }
  }
  return out;
}

export function unsupportedIncompat(value: number): string[] {
  return unsupportedBits(value, SUPPORTED_INCOMPAT, INCOMPAT_NAMES);
}

export function unsupportedRoCompat(value: number): string[] {
  return unsupportedBits(value, SUPPORTED_RO_COMPAT, RO_COMPAT_NAMES);
}
