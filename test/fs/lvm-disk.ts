/**
 * Real LVM2 disks for the LVM reader's tests, written by lvm2's own tools (pvcreate, vgcreate,
 * lvcreate, lvextend, vgcfgrestore) on loop devices over raw files, and lvm2's own report of
 * where each LV's extents are (`lvs --segments`, `pvs`): the oracle the reader's mapping must
 * agree with.
 *
 * This machine's kernel has no device-mapper, so LVs cannot be activated: lvm runs with
 * --driverloaded n (metadata only). LV types that lvm will only create through device-mapper
 * (thin pool, thin, snapshot) are written the way lvm itself would store them, by editing a
 * vgcfgbackup and restoring it with vgcfgrestore, which parses and validates the result.
 *
 * Isolation from the host's LVM: LVM_SYSTEM_DIR points at a private lvm.conf whose device filter
 * accepts only this run's loop devices, so no other PV or VG is ever scanned or touched, and
 * nothing is written to /etc/lvm (backups and archives are off).
 */
import { execa } from 'execa';
import { mkdir, readFile, writeFile, truncate } from 'node:fs/promises';
import { join } from 'node:path';

export interface LoopDevice {
  device: string;
  /** Which image and where in it (bytes). */
  image: string;
  offset: number;
  length: number;
  /** Partition index on that image (0 = whole disk). */
  partition: number;
}

export interface LvmReportSegment {
  lv: string;
  segtype: string;
  /** First LV extent of the segment, and its length in extents. */
  startExtent: number;
  extents: number;
  /** "loopdev:first-last" for each stripe (lvs seg_pe_ranges), split. */
  peRanges: Array<{ device: string; first: number; last: number }>;
}

export interface LvmDisk {
  vg: string;
  loops: LoopDevice[];
  extentSize: number;
  /** PV device -> pe_start (bytes) and UUID (as lvm prints it). */
  pvs: Map<string, { peStart: number; uuid: string }>;
  segments: LvmReportSegment[];
  /** Run an lvm command in this isolated configuration. */
  lvm(args: string[]): Promise<string>;
  /** Detach the loop devices (safe to call twice). */
  release(): Promise<void>;
}

const SECTOR = 512;

async function losetup(image: string, offset: number, length: number): Promise<string> {
  const { stdout } = await execa('losetup', ['--find', '--show', '--offset', String(offset), '--sizelimit', String(length), image]);
  return stdout.trim();
}

/** GPT partitions of `image` as (index, offset, length) from sgdisk, the tool that wrote them. */
async function gptPartitions(image: string): Promise<Array<{ index: number; offset: number; length: number }>> {
  const { stdout } = await execa('sgdisk', ['-p', image]);
  const out: Array<{ index: number; offset: number; length: number }> = [];
  for (const m of stdout.matchAll(/^\s+(\d+)\s+(\d+)\s+(\d+)\s/gm)) {
    const first = Number(m[2]);
    const last = Number(m[3]);
    out.push({ index: Number(m[1]), offset: first * SECTOR, length: (last - first + 1) * SECTOR });
  }
  return out;
}

/** An lvm runner confined to `devices` by a private LVM_SYSTEM_DIR. */
async function isolatedLvm(dir: string, devices: () => string[]): Promise<(args: string[]) => Promise<string>> {
  const confDir = join(dir, 'lvm-etc');
  await mkdir(confDir, { recursive: true });
  return async (args) => {
    const accept = devices().map((d) => `"a|^${d}$|"`);
    await writeFile(
      join(confDir, 'lvm.conf'),
      [
        `devices { filter = [ ${[...accept, '"r|.*|"'].join(', ')} ] global_filter = [ ${[...accept, '"r|.*|"'].join(', ')} ]`,
        '  obtain_device_list_from_udev = 0 use_devicesfile = 0 write_cache_state = 0 }',
        'activation { udev_sync = 0 udev_rules = 0 }',
        'backup { backup = 0 archive = 0 }',
        '',
      ].join('\n'),
    );
    const [command, ...rest] = args;
    const result = await execa('lvm', [command!, '--driverloaded', 'n', ...rest], {
      env: { LVM_SYSTEM_DIR: confDir, LVM_SUPPRESS_FD_WARNINGS: '1' },
      reject: false,
    });
    if (result.exitCode !== 0) throw new Error(`lvm ${args.join(' ')} failed (${result.exitCode}): ${result.stderr}`);
    return result.stdout;
  };
}

/** An LVM UUID in lvm's printed form (6-4-4-4-4-4-6 characters). */
export function lvmUuid(seed: number): string {
  const chars = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';
  let x = seed * 2654435761 + 12345;
  let s = '';
  for (let i = 0; i < 32; i += 1) {
    x = (x * 1103515245 + 12345) % 2 ** 31;
    s += chars[x % chars.length];
  }
  return [s.slice(0, 6), s.slice(6, 10), s.slice(10, 14), s.slice(14, 18), s.slice(18, 22), s.slice(22, 26), s.slice(26)].join('-');
}

/** Replace the LV section `name { ... }` (matched by brace depth) in a vgcfgbackup text. */
function lvSectionRange(text: string, name: string): [number, number] {
  const start = text.search(new RegExp(`^\\s*${name} \\{`, 'm'));
  if (start < 0) throw new Error(`no LV section ${name} in the backup`);
  let depth = 0;
  for (let i = text.indexOf('{', start); i < text.length; i += 1) {
    if (text[i] === '{') depth += 1;
    if (text[i] === '}') {
      depth -= 1;
      if (depth === 0) return [start, i + 1];
    }
  }
  throw new Error(`unbalanced LV section ${name}`);
}

/** Rename an LV and drop VISIBLE from its status (a sub-LV of a thin pool is hidden). */
export function hideAndRename(text: string, from: string, to: string): string {
  const [start, end] = lvSectionRange(text, from);
  const section = text
    .slice(start, end)
    .replace(new RegExp(`^(\\s*)${from} \\{`), `$1${to} {`)
    .replace(/status = \[([^\]]*)\]/, (_m, list: string) => `status = [${list.split(',').filter((s) => !s.includes('VISIBLE')).join(',')}]`);
  return text.slice(0, start) + section + text.slice(end);
}

/** Add LV sections at the start of logical_volumes. */
export function addLvSections(text: string, sections: string): string {
  const at = text.indexOf('logical_volumes {');
  if (at < 0) throw new Error('no logical_volumes section in the backup');
  const insert = at + 'logical_volumes {'.length;
  return `${text.slice(0, insert)}\n${sections}\n${text.slice(insert)}`;
}

export interface LvmDiskPlan {
  dir: string;
  vg: string;
  /** Images with their partitions: sgdisk -n arguments (GPT), or undefined for a whole-disk PV. */
  images: Array<{ name: string; size: number; gpt?: string[]; pvPartitions: number[] }>;
  /** Commands run after the VG exists; each is an lvm command line ($PV{image:partition} -> loop device). */
  steps: string[][];
  /** Edit the vgcfgbackup text before it is restored (optional). */
  editMetadata?: (text: string) => string;
}

/** Build the disks, the VG and its LVs; read back lvm's segment report. */
export async function buildLvmDisk(plan: LvmDiskPlan): Promise<LvmDisk> {
  const loops: LoopDevice[] = [];
  const lvm = await isolatedLvm(plan.dir, () => loops.map((l) => l.device));
  const release = async (): Promise<void> => {
    while (loops.length > 0) {
      const loop = loops.pop()!;
      await execa('losetup', ['-d', loop.device], { reject: false });
    }
  };
  try {
    for (const image of plan.images) {
      const path = join(plan.dir, image.name);
      await writeFile(path, '');
      await truncate(path, image.size);
      if (image.gpt) {
        await execa('sgdisk', [...image.gpt, path]);
        const parts = await gptPartitions(path);
        for (const index of image.pvPartitions) {
          const part = parts.find((p) => p.index === index);
          if (!part) throw new Error(`sgdisk made no partition ${index} on ${image.name}`);
          loops.push({ device: await losetup(path, part.offset, part.length), image: path, offset: part.offset, length: part.length, partition: index });
        }
      } else {
        loops.push({ device: await losetup(path, 0, image.size), image: path, offset: 0, length: image.size, partition: 0 });
      }
    }
    const pvName = (ref: string): string => {
      const [image, partition] = ref.split(':') as [string, string];
      const loop = loops.find((l) => l.image === join(plan.dir, image) && l.partition === Number(partition));
      if (!loop) throw new Error(`no PV ${ref}`);
      return loop.device;
    };
    const expand = (args: string[]): string[] => args.map((a) => a.replace(/\$PV\{([^}]+)\}/g, (_m, ref: string) => pvName(ref)));
    await lvm(['pvcreate', '-q', ...loops.map((l) => l.device)]);
    await lvm(['vgcreate', '-q', '-s', '1M', plan.vg, ...loops.map((l) => l.device)]);
    for (const step of plan.steps) await lvm(expand(step));
    if (plan.editMetadata) {
      const backup = join(plan.dir, 'vg-backup.txt');
      await lvm(['vgcfgbackup', '-q', '-f', backup, plan.vg]);
      const edited = join(plan.dir, 'vg-edited.txt');
      await writeFile(edited, plan.editMetadata(await readFile(backup, 'utf8')));
      await lvm(['vgcfgrestore', '-q', '--force', '-f', edited, plan.vg]);
    }
    const report = await readLvmReport(lvm, plan.vg);
    return { vg: plan.vg, loops, ...report, lvm, release };
  } catch (error) {
    await release();
    throw error;
  }
}

/** lvm's own account of the VG: extent size, PV data starts and UUIDs, and every LV segment. */
export async function readLvmReport(lvm: (args: string[]) => Promise<string>, vg: string): Promise<Pick<LvmDisk, 'extentSize' | 'pvs' | 'segments'>> {
  const pvJson = JSON.parse(await lvm(['pvs', '--reportformat', 'json', '--units', 'b', '--nosuffix', '-o', 'pv_name,pe_start,pv_uuid,vg_extent_size', '--select', `vg_name=${vg}`])) as {
    report: Array<{ pv: Array<{ pv_name: string; pe_start: string; pv_uuid: string; vg_extent_size: string }> }>;
  };
  const pvs = new Map<string, { peStart: number; uuid: string }>();
  let extentSize = 0;
  for (const pv of pvJson.report[0]!.pv) {
    pvs.set(pv.pv_name, { peStart: Number(pv.pe_start), uuid: pv.pv_uuid });
    extentSize = Number(pv.vg_extent_size);
  }
  const segJson = JSON.parse(await lvm(['lvs', '-a', '--segments', '--reportformat', 'json', '-o', 'lv_name,segtype,seg_start_pe,seg_size_pe,seg_pe_ranges', vg])) as {
    report: Array<{ seg: Array<{ lv_name: string; segtype: string; seg_start_pe: string; seg_size_pe: string; seg_pe_ranges: string }> }>;
  };
  const segments: LvmReportSegment[] = segJson.report[0]!.seg.map((s) => ({
    lv: s.lv_name.replace(/^\[|\]$/g, ''),
    segtype: s.segtype,
    startExtent: Number(s.seg_start_pe),
    extents: Number(s.seg_size_pe),
    peRanges: s.seg_pe_ranges
      .split(/\s+/)
      .filter(Boolean)
      .map((r) => {
        const m = /^(.*):(\d+)-(\d+)$/.exec(r);
        if (!m) throw new Error(`unexpected seg_pe_ranges ${r}`);
        return { device: m[1]!, first: Number(m[2]), last: Number(m[3]) };
      }),
  }));
  return { extentSize, pvs, segments };
}

/**
 * Where lvm says an LV's bytes are, on the image each PV lives on: for each linear segment,
 * image offset = partition offset + pe_start + first PE * extent size.
 */
export function expectedPieces(disk: LvmDisk, lv: string): Array<{ image: string; offset: number; diskOffset: number; length: number }> {
  return disk.segments
    .filter((s) => s.lv === lv)
    .sort((a, b) => a.startExtent - b.startExtent)
    .map((s) => {
      if (s.peRanges.length !== 1) throw new Error(`${lv} segment at ${s.startExtent} is not linear`);
      const range = s.peRanges[0]!;
      const loop = disk.loops.find((l) => l.device === range.device);
      const pv = disk.pvs.get(range.device);
      if (!loop || !pv) throw new Error(`lvm names ${range.device}, which is not one of ours`);
      return {
        image: loop.image,
        offset: s.startExtent * disk.extentSize,
        diskOffset: loop.offset + pv.peStart + range.first * disk.extentSize,
        length: s.extents * disk.extentSize,
      };
    });
}
