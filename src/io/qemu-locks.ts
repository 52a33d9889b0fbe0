/**
 * QEMU's image locks, held while qlayer writes an image: the same bytes a QEMU writer holds
 * (block/file-posix.c), so that a guest started meanwhile (`virsh start`, virt-manager, the
 * libvirt hook's start) or a `qemu-img` run refuses the image, as it would refuse one a running
 * guest writes ("Failed to get "write" lock"). Without them a start during a recompose would open
 * a user delta whose header and tables qlayer is rewriting.
 *
 * The protocol: an open image holds a shared (read) OFD lock on byte 100 + b for each permission
 * bit b it uses, and on byte 200 + b for each permission it does not let others have. Before
 * using a permission, a process asks (F_OFD_GETLK) whether anyone else holds 200 + b; before
 * denying one, whether anyone holds 100 + b. OFD locks belong to the open file description: a
 * test through the descriptor that holds them does not see them, and closing it drops them.
 * So qlayer's own checks (in-use.ts) ask through that descriptor, found here by inode.
 */
import { fstatSync, statSync } from 'node:fs';
import { QlayerError } from '../errors.js';
import { nativeBinding } from './native.js';

const PERMISSION_BASE = 100;
const SHARED_BASE = 200;
/** QEMU's permission bits (include/block/block-common.h). */
const Permission = { consistentRead: 0, write: 1, writeUnchanged: 2, resize: 3 } as const;
const NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];

/** What qlayer uses while it writes an image, and what it lets nobody else have (as a guest's QEMU). */
const USED = [Permission.consistentRead, Permission.write, Permission.resize];
const NOT_SHARED = [Permission.write, Permission.resize];

/** The descriptor holding QEMU locks for each inode ("dev:ino") this process writes. */
const holders = new Map<string, number>();

const inodeKey = (info: { dev: number; ino: number }): string => `${info.dev}:${info.ino}`;

/** The descriptor through which this process holds QEMU locks on `path`'s inode, if any. */
export function ownLockDescriptor(path: string): number | undefined {
  if (holders.size === 0) return undefined;
  try {
    return holders.get(inodeKey(statSync(path)));
  } catch {
    return undefined;
  }
}

/**
 * Take QEMU's writer locks on the open file `fd` (of `path`), then refuse (`image.in-use`) if
 * another process uses or denies what a writer needs. Returns the release, to be called before
 * the descriptor is closed (closing drops the locks themselves). Without the native helper, or on
 * a file system without OFD locks, nothing is held (QEMU's locking=auto does the same) and the
 * release does nothing.
 */
export function holdWriteLocks(fd: number, path: string): () => void {
  const binding = nativeBinding();
  const { lockShared, lockTest } = binding ?? {};
  if (lockShared === undefined || lockTest === undefined) return () => {};
  const bytes = [...USED.map((b) => PERMISSION_BASE + b), ...NOT_SHARED.map((b) => SHARED_BASE + b)];
  for (const byte of bytes) {
    // Unsupported here (EINVAL, ENOLCK...): hold none. Partial locks vanish with the descriptor.
    if (lockShared(fd, byte, 1) !== null) return () => {};
  }
  const conflicts: string[] = [];
  for (const b of USED) if (lockTest(fd, SHARED_BASE + b, 1) !== null) conflicts.push(`another process does not share "${NAMES[b]}"`);
  for (const b of NOT_SHARED) if (lockTest(fd, PERMISSION_BASE + b, 1) !== null) conflicts.push(`another process has "${NAMES[b]}"`);
  if (conflicts.length) {
    throw new QlayerError('image.in-use', `${path} is in use: ${conflicts.join(' and ')} (a running guest, qemu-img, qemu-nbd...); stop it first`);
  }
  const key = inodeKey(fstatSync(fd));
  holders.set(key, fd);
  return () => {
    if (holders.get(key) === fd) holders.delete(key);
  };
}
