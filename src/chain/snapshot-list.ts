/**
 * `snapshot -l`: the internal snapshots of a qcow2 image, in qemu-img's table and in the JSON
 * shape of `qemu-img info --output=json`'s "snapshots" (qemu-img 7.2's `snapshot` has no JSON
 * output of its own, so scripts get the shape they already parse from info).
 */
import type { FileSystemAccess } from '../io/host-file.js';
import { infoImage, type QemuSnapshotInfo } from './info.js';

export interface SnapshotListOptions {
  fs?: FileSystemAccess;
  allowedDirectories?: string[];
}

/**
 * Through infoImage, so the image is opened under the same named-file policy as every command
 * (the header's backing and data file names are checked, though only the image is read).
 */
export async function listSnapshots(path: string, options: SnapshotListOptions = {}): Promise<QemuSnapshotInfo[]> {
  const [info] = await infoImage(path, { fs: options.fs, format: 'qcow2', allowedDirectories: options.allowedDirectories });
  return info?.snapshots ?? [];
}

/** qemu's size_to_str: three significant digits and a binary unit ("0 B", "1.5 MiB"). */
export function sizeToString(bytes: number): string {
  const units = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];
  // frexp(val / (1000 / 1024)) in qemu: switch units from 1000 of the smaller one on.
  const exponent = bytes <= 0 ? 0 : Math.floor(Math.log2(bytes / (1000 / 1024))) + 1;
  const i = Math.max(0, Math.min(units.length - 1, Math.floor((exponent - 1) / 10)));
  const value = bytes / 2 ** (i * 10);
  return `${Number(value.toPrecision(3))} ${units[i]}B`;
}

const pad2 = (n: number) => String(n).padStart(2, '0');

/** qemu-img snapshot -l's text: nothing at all when there are no snapshots, as qemu-img prints. */
export function formatSnapshotList(snapshots: QemuSnapshotInfo[]): string {
  if (snapshots.length === 0) return '';
  const lines = ['Snapshot list:', `${'ID'.padEnd(10)}${'TAG'.padEnd(17)}${'VM SIZE'.padStart(8)}${'DATE'.padStart(20)}${'VM CLOCK'.padStart(13)}${'ICOUNT'.padStart(11)}`];
  for (const s of snapshots) {
    // Local time, like qemu-img (localtime_r + strftime).
    const d = new Date(s['date-sec'] * 1000);
    const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
    const secs = s['vm-clock-sec'];
    const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(Math.floor(s['vm-clock-nsec'] / 1e6)).padStart(3, '0')}`;
    const icount = s.icount === undefined ? '' : String(s.icount);
    lines.push(`${s.id.padEnd(9)} ${s.name.padEnd(16)} ${sizeToString(s['vm-state-size']).padStart(8)}${date.padStart(20)}${clock.padStart(13)}${icount.padStart(11)}`);
  }
  return lines.join('\n');
}
