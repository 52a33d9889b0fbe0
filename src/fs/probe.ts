/**
 * Names the filesystem in a partition that is not ext2/3/4, so that the error says what was
 * found ("an XFS filesystem") instead of only what was not.
 */
import { readBytes, type ByteSource } from '../io/byte-source.js';

export async function identifyNonExt(part: ByteSource): Promise<string> {
  const head = await readBytes(part, 0, Math.min(part.size, 0x10100));
  const text = (at: number, length: number): string => head.toString('latin1', at, at + length);
  if (text(0, 4) === 'XFSB') return 'an XFS filesystem';
  if (head.length >= 0x10048 && text(0x10040, 8) === '_BHRfS_M') return 'a btrfs filesystem';
  if (text(3, 8) === 'NTFS    ') return 'an NTFS filesystem';
  if (text(3, 8) === 'EXFAT   ') return 'an exFAT filesystem';
  if (text(0x52, 5) === 'FAT32' || text(0x36, 3) === 'FAT') return 'a FAT filesystem';
  for (const page of [4096, 8192, 16384, 65536]) {
    if (head.length >= page && /SWAP(SPACE2|-SPACE)/.test(text(page - 10, 10))) return 'Linux swap space';
  }
  if (text(0x8001, 5) === 'CD001') return 'an ISO 9660 filesystem';
  if (text(0, 4) === 'LUKS') return 'a LUKS encrypted volume';
  if (text(512, 8) === 'LABELONE') return 'an LVM physical volume';
  if (head.every((b) => b === 0)) return 'nothing (the first 64 KiB are all zeros)';
  return 'no filesystem this reader knows';
}
