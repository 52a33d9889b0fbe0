/**
 * `qlayer fs ...`: read a guest's filesystem from a disk image (raw or a qcow2 chain), offline
 * and read-only: ls, stat, cat, extents, partitions.
 */
import { InvalidArgumentError, type Command } from 'commander';
import { printResult, type CommonOptions } from '../output.js';
import { openDiskImage, type OpenedDisk } from '../../fs/image.js';
import { openGuestFilesystem, parsePartitionSelector, readVolumes, type DirEntry, type GuestFilesystem, type PartitionSelector } from '../../fs/index.js';

interface FsOptions extends CommonOptions {
  partition?: PartitionSelector;
  follow?: boolean;
}

function parsePartition(value: string): PartitionSelector {
  const selector = parsePartitionSelector(value);
  if (selector === undefined) throw new InvalidArgumentError('a partition number (0 = the whole disk, 1, 2, ...) or an LVM logical volume as VG/LV');
  return selector;
}

async function withFilesystem<T>(image: string, options: FsOptions, job: (fs: GuestFilesystem, disk: OpenedDisk) => Promise<T>): Promise<T> {
  const disk = await openDiskImage(image);
  try {
    const fs = await openGuestFilesystem(disk.source, options.partition === undefined ? {} : { partition: options.partition });
    return await job(fs, disk);
  } finally {
    await disk.close();
  }
}

function modeString(type: string, mode: number): string {
  const letter: Record<string, string> = { dir: 'd', symlink: 'l', char: 'c', block: 'b', fifo: 'p', socket: 's', file: '-' };
  let out = letter[type] ?? '?';
  const bits = 'rwxrwxrwx';
  for (let i = 0; i < 9; i += 1) out += (mode >> (8 - i)) & 1 ? bits[i] : '-';
  return out;
}

function withCommon(command: Command): Command {
  return command
    .option(
      '--partition <n|VG/LV>',
      'partition number, or an LVM logical volume as VG/LV (default: the only Linux partition or LV holding an ext filesystem, or the whole disk)',
      parsePartition,
    )
    .option('--json', 'machine-readable output');
}

export function registerFsCommands(program: Command): void {
  const fs = program.command('fs').description('read a guest filesystem (ext2/3/4) from a raw or qcow2 disk image, read-only');

  withCommon(fs.command('ls').argument('<image>').argument('<path>').description('list a directory (symlinks followed)'))
    .option('-l, --long', 'show type, mode, owner, size and mtime')
    .action(async (image: string, path: string, options: FsOptions & { long?: boolean }) => {
      await withFilesystem(image, options, async (guest) => {
        const entries = await guest.readdir(path);
        const long = options.long || options.json;
        const rows: Array<DirEntry & { mode?: number; uid?: number; gid?: number; size?: number; mtime?: number }> = [];
        for (const entry of entries) {
          if (!long) {
            rows.push({ ...entry });
            continue;
          }
          const child = entry.name === '.' || entry.name === '..' ? `${path}/${entry.name}` : `${path.replace(/\/+$/, '')}/${entry.name}`;
          const info = await guest.lookup(child);
          rows.push({ ...entry, mode: info.mode, uid: info.uid, gid: info.gid, size: info.size, mtime: info.mtime });
        }
        printResult(options, rows, () =>
          rows
            .map((r) =>
              r.mode !== undefined
                ? `${modeString(r.type, r.mode)} ${String(r.uid).padStart(5)} ${String(r.gid).padStart(5)} ${String(r.size).padStart(12)} ${new Date((r.mtime ?? 0) * 1000).toISOString()} ${r.name}`
                : r.name,
            )
            .join('\n'),
        );
      });
    });

  withCommon(fs.command('stat').argument('<image>').argument('<path>').description('inode metadata and extents of a path'))
    .option('-L, --follow', 'follow a symlink in the last component')
    .action(async (image: string, path: string, options: FsOptions) => {
      await withFilesystem(image, options, async (guest) => {
        const stat = await guest.stat(path, { follow: options.follow ?? false });
        const target = stat.type === 'symlink' ? await guest.readlink(path) : undefined;
        const value = { path, partition: guest.partition, blockSize: guest.blockSize, ...stat, ...(target === undefined ? {} : { target }) };
        printResult(options, value, () =>
          [
            `path:      ${path}${target === undefined ? '' : ` -> ${target}`}`,
            `inode:     ${stat.inode}   type: ${stat.type}   mode: ${modeString(stat.type, stat.mode)} (0${(stat.mode & 0o7777).toString(8)})`,
            `size:      ${stat.size}   links: ${stat.links}   uid: ${stat.uid}   gid: ${stat.gid}`,
            `mtime:     ${new Date(stat.mtime * 1000).toISOString()}`,
            guest.partition.scheme === 'lvm'
              ? `partition: LV ${guest.partition.name} (${guest.partition.lvm?.pieces?.length ?? 0} pieces on partition ${guest.partition.index})   block size: ${guest.blockSize}`
              : `partition: ${guest.partition.index} (${guest.partition.scheme}, offset ${guest.partition.offset})   block size: ${guest.blockSize}`,
            stat.inline ? 'data:      inside the inode (no blocks)' : `extents:   ${stat.extents.length}`,
            ...stat.extents.map((e) => `  file ${e.fileOffset}  disk ${e.diskOffset}  length ${e.length}${e.unwritten ? '  unwritten' : ''}`),
          ].join('\n'),
        );
      });
    });

  withCommon(fs.command('cat').argument('<image>').argument('<path>').description('write a file\'s bytes to stdout (symlinks followed); --json: base64'))
    .action(async (image: string, path: string, options: FsOptions) => {
      await withFilesystem(image, options, async (guest) => {
        if (options.json) {
          const data = await guest.readFile(path);
          printResult(options, { path, size: data.length, base64: data.toString('base64') }, () => '');
          return;
        }
        // A reader that goes away (`| head`) ends the copy quietly, as cat does.
        let closed = false;
        const onError = (error: NodeJS.ErrnoException): void => {
          if (error.code === 'EPIPE') closed = true;
          else throw error;
        };
        process.stdout.on('error', onError);
        try {
          for await (const chunk of guest.readFileChunks(path)) {
            if (closed) break;
            if (!process.stdout.write(chunk)) {
              await new Promise<void>((resolve) => {
                const done = (): void => {
                  process.stdout.off('drain', done);
                  process.stdout.off('close', done);
                  process.stdout.off('error', done);
                  resolve();
                };
                process.stdout.once('drain', done);
                process.stdout.once('close', done);
                process.stdout.once('error', done);
              });
            }
          }
        } finally {
          process.stdout.off('error', onError);
        }
      });
    });

  withCommon(
    fs
      .command('extents')
      .argument('<image>')
      .argument('<path>')
      .description('byte ranges of a file on the virtual disk: [{fileOffset, diskOffset, length, unwritten}]'),
  )
    .option('-L, --follow', 'follow a symlink in the last component')
    .action(async (image: string, path: string, options: FsOptions) => {
      await withFilesystem(image, options, async (guest) => {
        const extents = await guest.extents(path, { follow: options.follow ?? false });
        const plain = extents.map(({ fileOffset, diskOffset, length, unwritten }) => ({ fileOffset, diskOffset, length, unwritten }));
        printResult(options, plain, () =>
          plain.map((e) => `${e.fileOffset}\t${e.diskOffset}\t${e.length}${e.unwritten ? '\tunwritten' : ''}`).join('\n'),
        );
      });
    });

  fs.command('partitions')
    .argument('<image>')
    .description(
      'the partition table (MBR or GPT) of a disk image, then the LVM logical volumes on it (scheme "lvm", named VG/LV, ' +
        'with where their pieces lie on the disk, or why they cannot be read)',
    )
    .option('--json', 'machine-readable output')
    .action(async (image: string, options: CommonOptions) => {
      const disk = await openDiskImage(image);
      try {
        const { volumes, lvm } = await readVolumes(disk.source);
        const pvOf = new Map(lvm.pvs.map((pv) => [pv.partition, pv] as const));
        printResult(options, volumes, () =>
          [
            ...volumes.map((p) => {
              if (p.scheme === 'lvm') {
                const where = p.lvm?.pieces ? `${p.lvm.pieces.length} piece${p.lvm.pieces.length === 1 ? '' : 's'}` : `cannot be read: ${p.lvm?.refused}`;
                return `${p.name}\tlvm\t${p.type}\t${p.offset}\t${p.length}${p.linux ? '\tlinux' : ''}\t${where}`;
              }
              const pv = pvOf.get(p.index);
              const lvmNote = pv ? `\tLVM PV${pv.vg ? ` of VG ${pv.vg}` : ''}` : '';
              return `${p.index}\t${p.scheme}\t${p.type}\t${p.offset}\t${p.length}${p.linux ? '\tlinux' : ''}${p.name ? `\t${p.name}` : ''}${lvmNote}`;
            }),
            ...lvm.problems.map((problem) => `warning: ${problem.message}`),
          ].join('\n'),
        );
      } finally {
        await disk.close();
      }
    });
}
