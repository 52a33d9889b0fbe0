/**
 * `qlayer image ...`: the qcow2 engine on the command line. Flags and meanings follow qemu-img
 * where it has the same operation, and `--json` prints the same JSON shapes as qemu-img's
 * `--output=json`, so scripts can switch between the two.
 */
import { Option, type Command } from 'commander';
import type { MeasureResult } from '../../chain/measure.js';
import { QlayerError } from '../../errors.js';
import { printResult, progressReporter, reportError, type CommonOptions } from '../output.js';
import { allowedDirectories, allowOptions, type AllowOptions } from '../allow.js';

/** A usage mistake on the image command line (exit 1, like qemu-img). */
export class ImageCommandError extends QlayerError {
  constructor(message: string) {
    super('image.bad-argument', message);
  }
}

const SUFFIXES: Record<string, number> = { '': 1, b: 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4, p: 1024 ** 5, e: 1024 ** 6 };

/** Parse "10G", "512M", "65536", "1.5G" (binary suffixes, like qemu-img). */
export function parseSize(text: string, what = 'size'): number {
  const match = /^(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?$/i.exec(text.trim());
  if (!match) throw new ImageCommandError(`invalid ${what} "${text}" (use bytes or a K, M, G or T suffix)`);
  const value = Math.round(Number(match[1]) * (SUFFIXES[(match[2] ?? '').toLowerCase()] ?? 1));
  if (!Number.isSafeInteger(value)) throw new ImageCommandError(`${what} "${text}" is too large`);
  return value;
}

/** Parse "-o key=value,key=value" into a map (commas inside values are not supported). */
export function parseCreateOptions(text: string | undefined): Map<string, string> {
  const out = new Map<string, string>();
  if (!text) return out;
  for (const part of text.split(',')) {
    if (part.trim() === '') continue;
    const eq = part.indexOf('=');
    const key = (eq < 0 ? part : part.slice(0, eq)).trim();
    const value = eq < 0 ? 'on' : part.slice(eq + 1).trim();
    out.set(key, value);
  }
  return out;
}

function onOff(value: string, key: string): boolean {
  if (value === 'on' || value === 'true' || value === 'yes') return true;
  if (value === 'off' || value === 'false' || value === 'no') return false;
  throw new ImageCommandError(`-o ${key}: expected on or off, got "${value}"`);
}

function format(value: string | undefined, flag: string, fallback?: 'qcow2' | 'raw'): 'qcow2' | 'raw' {
  const f = value ?? fallback;
  if (f === 'qcow2' || f === 'raw') return f;
  throw new ImageCommandError(`${flag}: format "${String(value)}" is not supported (qcow2 or raw)`);
}

const KNOWN_CREATE_OPTIONS = new Set(['cluster_size', 'refcount_bits', 'extended_l2', 'compat', 'preallocation', 'lazy_refcounts', 'backing_file', 'backing_fmt', 'size']);

interface CreateFlags extends CommonOptions {
  f?: string;
  o?: string;
  b?: string;
  F?: string;
}

/** -U, --force-share: qemu-img's flag for reading an image another process writes. */
const FORCE_SHARE_HELP = 'force-share: read an image a running guest (or any QEMU) has open for writing';

interface ForceShareFlags {
  forceShare?: boolean;
}

/**
 * info, map and check of an image a QEMU writes still run, with a warning on stderr (qemu-img
 * 7.2 refuses them without -U: "Failed to get shared "write" lock"). Reading is harmless to the
 * guest; only the answer may be out of date, which the user should know.
 */
async function warnIfBeingWritten(file: string, flags: ForceShareFlags): Promise<void> {
  if (flags.forceShare) return;
  const { beingWrittenWarning } = await import('../../io/in-use.js');
  const warning = await beingWrittenWarning(file).catch(() => null);
  if (warning !== null) process.stderr.write(`qlayer: ${warning}\n`);
}

async function runCreate(file: string, sizeText: string | undefined, flags: CreateFlags): Promise<void> {
  const { assertNotLocked } = await import('../../io/in-use.js');
  const { createImage } = await import('../../qcow2/create.js');
  const { nodeFileSystem } = await import('../../io/host-file.js');
  // Replacing a file a guest (or any QEMU) has open would pull the disk from under it.
  await assertNotLocked(file).catch((error: NodeJS.ErrnoException) => {
    if (error.code !== 'ENOENT') throw error;
  });
  const fmt = format(flags.f, '-f', 'qcow2');
  const opts = parseCreateOptions(flags.o);
  for (const key of opts.keys()) if (!KNOWN_CREATE_OPTIONS.has(key)) throw new ImageCommandError(`-o: unknown option "${key}" (known: ${[...KNOWN_CREATE_OPTIONS].join(', ')})`);
  const sizeOption = sizeText ?? opts.get('size');
  const size = sizeOption === undefined ? undefined : parseSize(sizeOption);
  if (fmt === 'raw') {
    if (size === undefined) throw new ImageCommandError('create: a size is required for a raw image');
    const out = await nodeFileSystem.open(file, 'create');
    try {
      await out.truncate(Math.ceil(size / 512) * 512);
    } finally {
      await out.close();
    }
    printResult(flags, { filename: file, format: 'raw', 'virtual-size': Math.ceil(size / 512) * 512 }, () => `Formatting '${file}', fmt=raw size=${size}`);
    return;
  }
  const backingName = flags.b ?? opts.get('backing_file');
  const backingFormat = flags.F ?? opts.get('backing_fmt');
  if (backingName !== undefined && backingFormat === undefined) throw new ImageCommandError('create: -F (backing format) is required with -b; formats are never probed');
  const clusterSize = opts.has('cluster_size') ? parseSize(opts.get('cluster_size')!, 'cluster_size') : 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits)) throw new ImageCommandError(`-o cluster_size=${clusterSize} is not a power of two`);
  const compat = opts.get('compat') ?? '1.1';
  if (compat !== '0.10' && compat !== '1.1' && compat !== 'v2' && compat !== 'v3') throw new ImageCommandError(`-o compat=${compat}: expected 0.10 or 1.1`);
  const preallocation = opts.get('preallocation') ?? 'off';
  if (preallocation !== 'off' && preallocation !== 'metadata') throw new ImageCommandError(`-o preallocation=${preallocation}: supported values are off and metadata`);
  const header = await createImage({
    path: file,
    size,
    version: compat === '0.10' || compat === 'v2' ? 2 : 3,
    clusterBits,
    refcountBits: opts.has('refcount_bits') ? Number(opts.get('refcount_bits')) : 16,
    extendedL2: opts.has('extended_l2') ? onOff(opts.get('extended_l2')!, 'extended_l2') : false,
    lazyRefcounts: opts.has('lazy_refcounts') ? onOff(opts.get('lazy_refcounts')!, 'lazy_refcounts') : false,
    preallocation,
    backing: backingName === undefined ? undefined : { path: backingName, format: format(backingFormat, '-F') },
    exclusive: false,
  });
  printResult(
    flags,
    { filename: file, format: 'qcow2', 'virtual-size': header.size, 'cluster-size': 2 ** header.clusterBits, 'backing-filename': header.backingFile ?? undefined },
    () => `Formatting '${file}', fmt=qcow2 cluster_size=${2 ** header.clusterBits} size=${header.size}${header.backingFile ? ` backing_file=${header.backingFile}` : ''}`,
  );
}

/**
 * The subcommands, each registered by its own function: a command line that names one
 * (`image info ...`) builds only that one's commander tree. Each action imports the engine code
 * it runs when it runs (the bundle keeps those modules unevaluated until then), so `image info`
 * does not evaluate convert, commit or rebase.
 */
const SUBCOMMANDS: Record<string, (image: Command) => void> = {
  create: (image) => {
    image
      .command('create')
      .summary('create a qcow2 (or raw) image, optionally over a backing file')
      .description(
        'Create a new image. SIZE takes K, M, G, T suffixes; with -b it defaults to the backing file\'s size.\n' +
          'Options (-o key=value,...): cluster_size (512..2M), refcount_bits (1..64), extended_l2=on|off,\n' +
          'compat=0.10|1.1, preallocation=off|metadata, lazy_refcounts=on|off.',
      )
      .argument('<file>', 'image to create (replaced if it exists)')
      .argument('[size]', 'virtual size, e.g. 10G')
      .option('-f <fmt>', 'image format: qcow2 (default) or raw')
      .option('-o <options>', 'format options, comma separated key=value')
      .option('-b <backing>', 'backing file, stored as given (relative names are relative to the new image)')
      .option('-F <fmt>', 'backing file format (qcow2 or raw); required with -b')
      .option('--json', 'print JSON')
      .action((file: string, size: string | undefined, flags: CreateFlags) => runCreate(file, size, flags));
  },
  info: (image) => {
    allowOptions(image
      .command('info')
      .summary("show an image's format, features, snapshots and backing chain")
      .description('Show an image\'s header, format features and snapshots (JSON like qemu-img info --output=json)')
      .argument('<file>')
      .option('-f <fmt>', 'image format: qcow2 (default) or raw')
      .option('--backing-chain', 'also show every backing file, top first (JSON: an array)')
      .option('-U, --force-share', FORCE_SHARE_HELP)
      .option('--json', 'print JSON'))
      .action(async (file: string, flags: CommonOptions & AllowOptions & ForceShareFlags & { f?: string; backingChain?: boolean }) => {
        await warnIfBeingWritten(file, flags);
        const { formatInfoText, infoImage } = await import('../../chain/info.js');
        const infos = await infoImage(file, { format: format(flags.f, '-f', 'qcow2'), backingChain: flags.backingChain === true, allowedDirectories: allowedDirectories(flags) });
        printResult(flags, flags.backingChain ? infos : infos[0], () => formatInfoText(infos));
      });
  },
  map: (image) => {
    allowOptions(image
      .command('map')
      .summary('show which chain layer holds each range of the virtual disk')
      .description(
        'Show which layer of the backing chain holds each range of the virtual disk\n' +
          '(JSON like qemu-img map --output=json: start, length, depth, present, zero, data, offset).',
      )
      .argument('<file>')
      .option('-f <fmt>', 'image format: qcow2 (default) or raw')
      .option('--start-offset <offset>', 'first byte to map')
      .option('--max-length <length>', 'bytes to map')
      .option('-U, --force-share', FORCE_SHARE_HELP)
      .option('--json', 'print JSON'))
      .action(async (file: string, flags: CommonOptions & AllowOptions & ForceShareFlags & { f?: string; startOffset?: string; maxLength?: string }) => {
        await warnIfBeingWritten(file, flags);
        const { mapImage } = await import('../../chain/map.js');
        const options = {
          format: format(flags.f, '-f', 'qcow2'),
          allowedDirectories: allowedDirectories(flags),
          start: flags.startOffset === undefined ? undefined : parseSize(flags.startOffset, '--start-offset'),
          length: flags.maxLength === undefined ? undefined : parseSize(flags.maxLength, '--max-length'),
        };
        if (flags.json) {
          // Written as it is walked, in large chunks: qemu-img's exact bytes. Writes to a file or a
          // pipe are synchronous on Linux (nothing left buffered), and the buffer is reused then.
          const { mapImageJson } = await import('../../chain/map-json.js');
          await mapImageJson(file, options, (chunk) => {
            process.stdout.write(chunk);
            return process.stdout.writableLength === 0;
          });
          return;
        }
        const entries = await mapImage(file, options);
        const lines = ['Offset          Length          Depth  Mapped to       Kind'];
        for (const e of entries) {
          if (!e.present) continue;
          const hex = (n: number) => `0x${n.toString(16)}`.padEnd(16);
          lines.push(`${hex(e.start)}${hex(e.length)}${String(e.depth).padEnd(7)}${e.offset === undefined ? '-'.padEnd(16) : hex(e.offset)}${e.data ? 'data' : 'zero'}`);
        }
        printResult(flags, entries, () => lines.join('\n'));
      });
  },
  check: (image) => {
    image
      .command('check')
      .summary('check refcounts and COPIED flags, optionally repair')
      .description(
        'Check refcounts and COPIED flags against the metadata (all tables, snapshots, bitmaps).\n' +
          'Exit codes like qemu-img: 0 clean, 1 could not check, 2 corruptions, 3 leaks only.\n' +
          '-r leaks lowers refcounts that are too high; -r all also fixes low refcounts and flags.',
      )
      .argument('<file>')
      .option('-f <fmt>', 'image format (qcow2)')
      .addOption(new Option('-r, --repair <what>', 'repair leaks or all').choices(['leaks', 'all']))
      .option('-U, --force-share', `${FORCE_SHARE_HELP} (never with -r: a repair is refused while it is open)`)
      .option('--json', 'print JSON (like qemu-img check --output=json)')
      .action(async (file: string, flags: CommonOptions & ForceShareFlags & { f?: string; repair?: 'leaks' | 'all' }) => {
        if (format(flags.f, '-f', 'qcow2') !== 'qcow2') throw new ImageCommandError('check: only qcow2 images can be checked');
        if (flags.forceShare && flags.repair) throw new ImageCommandError('check: -U and -r cannot be combined (an image is never repaired while another process has it open)');
        if (!flags.repair) await warnIfBeingWritten(file, flags);
        const { checkImage } = await import('../../qcow2/repair.js');
        const { checkExitCode, toQemuJson } = await import('../../qcow2/check.js');
        const result = await checkImage(file, { repair: flags.repair ?? 'none' });
        printResult(flags, toQemuJson(result), () => {
          const lines = [...result.messages];
          if (result.leaksFixed) lines.push(`The following inconsistencies were found and repaired:\n    ${result.leaksFixed} leaked clusters\n    ${result.corruptionsFixed} corruptions`);
          else if (result.corruptionsFixed) lines.push(`The following inconsistencies were found and repaired:\n    0 leaked clusters\n    ${result.corruptionsFixed} corruptions`);
          if (result.corruptions) lines.push(`${result.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.`);
          if (result.leaks) lines.push(`${result.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.`);
          if (!result.corruptions && !result.leaks) lines.push('No errors were found on the image.');
          const pct = (n: number) => (result.totalClusters ? ((n * 100) / result.totalClusters).toFixed(2) : '0.00');
          lines.push(`${result.allocatedClusters}/${result.totalClusters} = ${pct(result.allocatedClusters)}% allocated, ${pct(result.fragmentedClusters)}% fragmented, ${pct(result.compressedClusters)}% compressed clusters`);
          lines.push(`Image end offset: ${result.imageEndOffset}`);
          return lines.join('\n');
        });
        process.exitCode = checkExitCode(result);
      });
  },
  convert: (image) => {
    allowOptions(image
      .command('convert')
      .summary('flatten an image or chain into a new raw or qcow2 file')
      .description(
        'Copy the virtual disk of an image (its whole backing chain, flattened) into a new file:\n' +
          'qcow2/chain -> raw, raw -> qcow2 (zero clusters left out), qcow2 -> flat qcow2, -c to compress.\n' +
          'Zero runs of 4 KiB (-S SIZE) stay holes in a raw output, whole zero clusters stay unallocated in a qcow2 one, as with qemu-img.',
      )
      .argument('<source>')
      .argument('<output>')
      .option('-f <fmt>', 'source format: qcow2 (default) or raw')
      .option('-O <fmt>', 'output format: qcow2 (default) or raw')
      .option('-o <options>', 'output options: cluster_size=SIZE')
      .option('-c', 'compress data clusters (deflate); qcow2 output only')
      .option('-S <size>', 'leave zero runs of SIZE bytes out of the output (holes, unallocated clusters); a multiple of 512, default 4k; 0 writes everything')
      .option('-p', 'show progress (on a terminal)')
      .option('--sync', 'fsync the output before exiting')
      .option('-U, --force-share', `${FORCE_SHARE_HELP}; without it such a source is refused (the copy could be torn)`)
      .option('--json', 'print JSON'))
      .action(async (source: string, output: string, flags: CommonOptions & AllowOptions & ForceShareFlags & { f?: string; O?: string; o?: string; c?: boolean; S?: string; p?: boolean; sync?: boolean }) => {
        const opts = parseCreateOptions(flags.o);
        const sparseSize = flags.S === undefined ? undefined : parseSize(flags.S, '-S');
        for (const key of opts.keys()) if (key !== 'cluster_size') throw new ImageCommandError(`convert -o: unsupported option "${key}" (only cluster_size)`);
        const { convertImage } = await import('../../chain/convert.js');
        const result = await convertImage(source, output, {
          sourceFormat: format(flags.f, '-f', 'qcow2'),
          outputFormat: format(flags.O, '-O', 'qcow2'),
          clusterSize: opts.has('cluster_size') ? parseSize(opts.get('cluster_size')!, 'cluster_size') : undefined,
          compress: flags.c === true,
          sparseSize,
          sync: flags.sync === true,
          forceShare: flags.forceShare === true,
          allowedDirectories: allowedDirectories(flags),
          progress: flags.p ? progressReporter(flags, 'converting') : undefined,
        });
        printResult(flags, { source, output, 'virtual-size': result.virtualSize, 'data-bytes': result.dataBytes, 'output-length': result.outputLength }, () => '');
      });
  },
  rebase: (image) => {
    allowOptions(image
      .command('rebase')
      .summary("change an image's backing file (safe or -u unsafe)")
      .description(
        'Change the backing file of an image. By default the content is kept: clusters where the old\n' +
          'and new backing files differ are copied into the image first. -u only rewrites the header.\n' +
          'Use -b "" to remove the backing file (its content is copied in).',
      )
      .argument('<file>')
      .requiredOption('-b <backing>', 'new backing file, stored as given ("" for none)')
      .option('-F <fmt>', 'new backing format (qcow2 or raw); required unless -b ""')
      .option('-u', 'unsafe: change only the header')
      .option('-p', 'show progress (on a terminal)')
      .option('--json', 'print JSON'))
      .action(async (file: string, flags: CommonOptions & AllowOptions & { b: string; F?: string; u?: boolean; p?: boolean }) => {
        const backing = flags.b === '' ? null : flags.b;
        const { rebaseImage } = await import('../../chain/rebase.js');
        const result = await rebaseImage(file, {
          backing,
          backingFormat: backing === null ? undefined : format(flags.F, '-F'),
          unsafe: flags.u === true,
          allowedDirectories: allowedDirectories(flags),
          progress: flags.p ? progressReporter(flags, 'rebasing') : undefined,
        });
        printResult(flags, { filename: file, 'backing-filename': backing, 'copied-bytes': result.copiedBytes }, () => '');
      });
  },
  commit: (image) => {
    allowOptions(image
      .command('commit')
      .summary("write an image's content into its backing file")
      .description(
        'Write the content of an image into its backing file, then empty the image (unless -d).\n' +
          'The backing file must be writable.',
      )
      .argument('<file>')
      .option('-d', 'do not empty the image after the commit')
      .option('-p', 'show progress (on a terminal)')
      .option('--json', 'print JSON'))
      .action(async (file: string, flags: CommonOptions & AllowOptions & { d?: boolean; p?: boolean }) => {
        const { commitImage } = await import('../../chain/commit.js');
        const result = await commitImage(file, { keepTop: flags.d === true, allowedDirectories: allowedDirectories(flags), progress: flags.p ? progressReporter(flags, 'committing') : undefined });
        printResult(flags, { filename: file, backing: result.backing, 'committed-bytes': result.committedBytes }, () => 'Image committed.');
      });
  },
  compare: (image) => {
    allowOptions(image
      .command('compare')
      .summary('do two images (with their backing chains) show the same disk?')
      .description(
        'Compare the virtual disks of two images, like qemu-img compare. Exit codes: 0 identical,\n' +
          '1 different (the first differing offset is printed), 2 error. Images of different sizes are\n' +
          "equal when the larger one's extra part reads as zeros; -s (strict) also requires the same size\n" +
          'and the same block status (allocated, zero, data) everywhere.',
      )
      .argument('<file1>')
      .argument('<file2>')
      .option('-f <fmt>', 'format of file1: qcow2 (default) or raw')
      .option('-F <fmt>', 'format of file2: qcow2 (default) or raw')
      .option('-s', 'strict: different sizes or block status are differences')
      .option('-q', 'quiet: print nothing, only the exit code')
      .option('--json', 'print JSON: {identical, size-mismatch, reason?, offset?}'))
      .action(async (file1: string, file2: string, flags: CommonOptions & AllowOptions & { f?: string; F?: string; s?: boolean; q?: boolean }) => {
        try {
          const { compareImages, formatCompareText } = await import('../../chain/compare.js');
          const result = await compareImages(file1, file2, {
            formatA: format(flags.f, '-f', 'qcow2'),
            formatB: format(flags.F, '-F', 'qcow2'),
            strict: flags.s === true,
            allowedDirectories: allowedDirectories(flags),
          });
          const json: Record<string, unknown> = { identical: result.identical, 'size-mismatch': result.sizeMismatch };
          if (!result.identical) {
            json.reason = result.reason;
            if (result.offset !== undefined) json.offset = result.offset;
          }
          if (flags.json || !flags.q) printResult(flags, json, () => formatCompareText(result, flags.s === true));
          process.exitCode = result.identical ? 0 : 1;
        } catch (error) {
          // qemu-img compare: 2 when it could not compare (1 already means "different").
          reportError(error, flags.json === true);
          process.exitCode = 2;
        }
      });
  },
  measure: (image) => {
    allowOptions(image
      .command('measure')
      .summary('how large a converted (or new) image would be')
      .description(
        'Measure the file size a conversion of FILE (or a new image of --size) needs, like qemu-img\n' +
          'measure: "required" for the data it holds, "fully-allocated" if every cluster were written.\n' +
          'Output options (-o): cluster_size, refcount_bits, extended_l2 (qcow2 output).',
      )
      .argument('[file]')
      .option('--size <size>', 'measure a new, empty image of this size instead of FILE')
      .option('-f <fmt>', 'format of FILE: qcow2 (default) or raw')
      .option('-O <fmt>', 'output format: raw (default, as in qemu-img) or qcow2')
      .option('-o <options>', 'output options: cluster_size=SIZE,refcount_bits=N,extended_l2=on|off')
      .option('--output <ofmt>', 'human (default) or json (same as --json)')
      .option('--json', 'print JSON like qemu-img measure --output=json'))
      .action(async (file: string | undefined, flags: CommonOptions & AllowOptions & { size?: string; f?: string; O?: string; o?: string; output?: string }) => {
        if (flags.output !== undefined && flags.output !== 'json' && flags.output !== 'human') throw new ImageCommandError(`--output: expected human or json, got "${flags.output}"`);
        const json = flags.json === true || flags.output === 'json';
        try {
          if (flags.size !== undefined && file !== undefined) throw new ImageCommandError('measure: --size N cannot be used together with a filename');
          if (flags.size === undefined && file === undefined) throw new ImageCommandError('measure: either --size N or one filename must be specified');
          const opts = parseCreateOptions(flags.o);
          for (const key of opts.keys()) if (!['cluster_size', 'refcount_bits', 'extended_l2'].includes(key)) throw new ImageCommandError(`measure -o: unsupported option "${key}" (cluster_size, refcount_bits, extended_l2)`);
          const options = {
            outputFormat: format(flags.O, '-O', 'raw'),
            clusterSize: opts.has('cluster_size') ? parseSize(opts.get('cluster_size')!, 'cluster_size') : undefined,
            refcountBits: opts.has('refcount_bits') ? Number(opts.get('refcount_bits')) : undefined,
            extendedL2: opts.has('extended_l2') ? onOff(opts.get('extended_l2')!, 'extended_l2') : undefined,
          };
          const { measureImage, measureSize } = await import('../../chain/measure.js');
          const result: MeasureResult =
            flags.size !== undefined
              ? measureSize(parseSize(flags.size, '--size'), options)
              : await measureImage(file!, { ...options, sourceFormat: format(flags.f, '-f', 'qcow2'), allowedDirectories: allowedDirectories(flags) });
          printResult({ json }, result, () =>
            [`required size: ${result.required}`, `fully allocated size: ${result['fully-allocated']}`, ...(result.bitmaps === undefined ? [] : [`bitmaps size: ${result.bitmaps}`])].join('\n'),
          );
        } catch (error) {
          // --output=json is this command's own spelling: errors must be JSON then too.
          process.exitCode = reportError(error, json);
        }
      });
  },
  snapshot: (image) => {
    allowOptions(image
      .command('snapshot')
      .summary("list an image's internal snapshots (-l)")
      .description('List the internal snapshots of a qcow2 image, like qemu-img snapshot -l (JSON: the "snapshots" array of image info --json).')
      .argument('<file>')
      .option('-l', 'list the snapshots')
      .option('-U, --force-share', FORCE_SHARE_HELP)
      .option('--json', 'print JSON'))
      .action(async (file: string, flags: CommonOptions & AllowOptions & ForceShareFlags & { l?: boolean }) => {
        if (!flags.l) throw new ImageCommandError('snapshot: only -l (list) is supported; snapshots are created and applied by QEMU');
        await warnIfBeingWritten(file, flags);
        const { formatSnapshotList, listSnapshots } = await import('../../chain/snapshot-list.js');
        const snapshots = await listSnapshots(file, { allowedDirectories: allowedDirectories(flags) });
        printResult(flags, snapshots, () => formatSnapshotList(snapshots));
      });
  },
  resize: (image) => {
    image
      .command('resize')
      .summary("grow (or with --shrink, shrink) an image's virtual disk")
      .description(
        'Set the virtual disk of a qcow2 image to SIZE, or change it by +SIZE or -SIZE (after --, as in\n' +
          '`resize img -- -1G`). Shrinking deletes the data past the new end, so it is refused without\n' +
          '--shrink (like qemu-img); the refusal says how many allocated bytes would be lost.',
      )
      .argument('<file>')
      .argument('<size>', 'new size (10G), growth (+1G) or, after --, reduction (-1G)')
      .option('--shrink', 'allow a smaller size: data past the new end is deleted')
      .option('--json', 'print JSON')
      .action(async (file: string, sizeText: string, flags: CommonOptions & { shrink?: boolean }) => {
        const sign = sizeText.startsWith('+') ? 1 : sizeText.startsWith('-') ? -1 : 0;
        const size = parseSize(sign === 0 ? sizeText : sizeText.slice(1));
        const { resizeImage } = await import('../../qcow2/resize.js');
        const result = await resizeImage(file, sign === 0 ? size : sign * size, { relative: sign !== 0, shrink: flags.shrink === true });
        printResult(flags, { filename: file, 'old-size': result.oldSize, 'virtual-size': result.newSize, 'discarded-bytes': result.discardedBytes }, () => 'Image resized.');
      });
  },
};

/**
 * The subcommand a command line (user arguments, without node and the script) names: the word
 * right after `image` (which takes no options of its own before it), when it is one of ours.
 */
function namedSubcommand(args: readonly string[]): string | undefined {
  const at = args.indexOf('image');
  const name = at < 0 ? undefined : args[at + 1];
  return name !== undefined && Object.hasOwn(SUBCOMMANDS, name) ? name : undefined;
}

/**
 * Register `image` and its subcommands: with `args`, only the one the line names (all of them
 * when it names none or an unknown one, so that help lists them and commander suggests the
 * nearest name).
 */
export function registerImageCommands(program: Command, args?: readonly string[]): void {
  const image = program
    .command('image')
    .description('Create, inspect, check and transform qcow2 images (qemu-img compatible flags and JSON)');
  const named = args === undefined ? undefined : namedSubcommand(args);
  for (const [name, register] of Object.entries(SUBCOMMANDS)) if (named === undefined || name === named) register(image);
}
