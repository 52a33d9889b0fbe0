/**
 * `qlayer base|app|desktop ...`: the store, its apps and its desktops.
 */
import { readFile } from 'node:fs/promises';
import { Command } from 'commander';
import { QlayerError } from '../../errors.js';
import { buildApp, listApps, resolveApp } from '../../layers/app.js';
import { importBase, removeBase } from '../../layers/bases.js';
import { adoptDesktop, releaseDesktop } from '../../layers/desktop-adopt.js';
import { assignApps, type AssignResult } from '../../layers/desktop-assign.js';
import { desktopHandle } from '../../layers/desktop-handle.js';
import { createDesktop, destroyDesktop, startDesktop, stopDesktop } from '../../layers/desktop-lifecycle.js';
import { recomposeDesktop } from '../../layers/desktop-offline.js';
import { unassignApps } from '../../layers/desktop-unassign.js';
import { abortOperation } from '../../layers/desktop-undo.js';
import { updateApp } from '../../layers/desktop-update.js';
import { verifyDesktop } from '../../layers/desktop-verify.js';
import { listDesktops, showDesktop, type DesktopView } from '../../layers/desktop-views.js';
import { desktopDomain } from '../../virt/desktop-runtime.js';
import { abortPendingAssign, assignAtNextBoot, unassignAtNextBoot, type AtNextBootResult } from '../../layers/pending-boot.js';
import { assignToDesktops, defaultParallelism, type FleetOutcome } from '../../layers/fleet.js';
import { describeUndo } from '../../layers/guest-operation.js';
import { addToGroup, createGroup, groupAssign, groupUnassign, listGroups, rollOutGroup, type RolloutOutcome } from '../../layers/groups.js';
import type { RecomposeReport } from '../../layers/recompose.js';
import type { DesktopTemplate } from '../../layers/runtime.js';
import { describeShutdown, observeShutdowns, type ShutdownResult } from '../../virt/boot.js';
import { allowOption, allowedDirectories } from '../allow.js';
import { openContext, stepLogger, storeOptions, type StoreCommandOptions } from '../context.js';
import { printResult, progressReporter } from '../output.js';
import { parseHomeSize } from '../../layers/home-disk.js';
import type { HomeSeed } from '../../layers/home-seed.js';
import { registerRebaseCommands } from './rebase.js';

const mib = (bytes: number): string => `${(bytes / 1048576).toFixed(1)} MiB`;

function parseOwner(text: string | undefined): { uid: number; gid: number } {
  if (text === undefined) return { uid: 0, gid: 0 };
  const match = /^(\d+):(\d+)$/.exec(text);
  if (!match) throw new QlayerError('app.bad-owner', `--owner must be UID:GID in numbers, not ${JSON.stringify(text)}`);
  return { uid: Number(match[1]), gid: Number(match[2]) };
}

/** The lines `desktop create` adds about the home disk's seeding from the base's /home. */
function describeHomeSeed(seed: HomeSeed): string[] {
  if (seed.notSeeded !== undefined) return [`  home disk starts empty: ${seed.notSeeded}`];
  return [
    `  home disk seeded from the base's /home: ${seed.files} file${seed.files === 1 ? '' : 's'} (${seed.bytes} bytes), ${seed.folders} folder${seed.folders === 1 ? '' : 's'}, ${seed.symlinks} symlink${seed.symlinks === 1 ? '' : 's'}`,
    ...seed.skipped.map((skipped) => `    not copied: ${skipped.path} (${skipped.reason})`),
  ];
}

function describeDesktop(view: DesktopView): string {
  return [
    `desktop ${view.name}: ${view.state}`,
    `  base: ${view.base}`,
    `  apps: ${view.apps.length ? view.apps.join(', ') : '(none)'}`,
    `  chain: ${view.paths.user}`,
    `      <- ${view.paths.apps}`,
    `      <- ${view.paths.base}`,
    ...(view.paths.home ? [`  home disk: ${view.paths.home} (mounted at /home)`] : []),
    ...(view.stagingFor !== undefined ? [`  the staging desktop of ${view.stagingFor}'s rebase: qlayer desktop rebase ${view.stagingFor} --resume finishes or removes it`] : []),
    ...(view.rebase ? [`  unfinished rebase from ${view.rebase.from} to ${view.rebase.to} (${view.rebase.phase}): run qlayer desktop rebase ${view.name} --resume`] : []),
    ...(view.pendingAtNextBoot
      ? [
          `  pending at the next start: ${view.pendingAtNextBoot.kind} of ${view.pendingAtNextBoot.apps.join(', ')} (asked ${view.pendingAtNextBoot.requestedAt})`,
          ...(view.pendingAtNextBoot.lastAttempt
            ? [`    not applied at the start of ${view.pendingAtNextBoot.lastAttempt.at} (${view.pendingAtNextBoot.lastAttempt.by}): ${view.pendingAtNextBoot.lastAttempt.reason.split('\n')[0]}`]
            : []),
        ]
      : []),
    ...(view.pendingRecompose ? [`  unfinished recompose at phase ${view.pendingRecompose.phase}: run qlayer desktop recompose ${view.name}`] : []),
    ...(view.operation
      ? [
          `  unfinished ${view.operation.kind} of ${view.operation.apps.join(', ')} (${view.operation.phase})${view.operation.failure ? `: ${view.operation.failure.message.split('\n')[0]}` : ''}`,
          `    undo what the guest got: ${view.operation.undo}`,
          `    or do it again:          ${view.operation.finish}`,
        ]
      : []),
  ].join('\n');
}

function describeAtNextBoot(result: AtNextBootResult): string {
  const done = result.kind === 'assign' ? `allocated ${result.allocation?.files ?? 0} placeholders in the guest` : `deleted the files in the guest${result.alreadyGone.length ? ` (${result.alreadyGone.length} were gone already)` : ''}`;
  return `${result.kind} of ${result.apps.join(', ')} pending for ${result.desktop}'s next start: ${done}; the guest keeps running. It lands when the domain next starts (shut it down from inside, virsh, or qlayer desktop stop; then start it). qlayer desktop show ${result.desktop} tells whether it is still pending.`;
}

function describeRecompose(report: RecomposeReport | null): string {
  if (!report) return 'nothing to recompose';
  return [
    `recomposed onto ${report.appsLayer}${report.resumed ? ' (finished an interrupted run)' : ''}`,
    `  app bytes in the apps layer: ${mib(report.appBytesWritten)} (shared with the app payloads: ${mib(report.bytesSharedWithPayloads)}, written: ${mib(report.bytesCopiedIntoAppsLayer)})`,
    ...(report.cloneUnavailable && report.appBytesWritten ? [`  not shared: ${report.cloneUnavailable}`] : []),
    ...(report.extentsMarkedWritten ? [`  placeholder extents marked written: ${report.extentsMarkedWritten}`] : []),
    `  user clusters now read from the apps layer: ${report.clustersDropped}`,
    `  app bytes patched into partly covered user clusters: ${report.bytesPatchedInUserDelta}`,
    ...(report.leakedClustersReclaimed ? [`  leaked clusters reclaimed: ${report.leakedClustersReclaimed}`] : []),
  ].join('\n');
}

function describeRollout(outcomes: RolloutOutcome[]): string {
  const detail = (o: RolloutOutcome): string =>
    o.status === 'changed'
      ? [o.added.length ? `added ${o.added.join(', ')}` : '', o.updated.length ? `updated to ${o.updated.join(', ')}` : '', o.removed.length ? `removed ${o.removed.join(', ')}` : ''].filter(Boolean).join('; ')
      : (o.reason ?? '');
  const rows = outcomes.map((o) => [o.desktop, o.status, `${(o.elapsedMs / 1000).toFixed(1)} s`, detail(o)]);
  const widths = [0, 1, 2].map((i) => Math.max(...rows.map((r) => r[i]!.length), ['desktop', 'result', 'time'][i]!.length));
  const line = (cells: string[]): string => cells.map((c, i) => (i < 3 ? c.padEnd(widths[i]!) : c)).join('  ').trimEnd();
  const count = (status: RolloutOutcome['status']): number => outcomes.filter((o) => o.status === status).length;
  const summary = `${outcomes.length} desktops: ${count('changed')} changed, ${count('unchanged')} unchanged, ${count('pending')} pending (running), ${count('failed')} failed`;
  return [line(['desktop', 'result', 'time', 'detail']), ...rows.map(line), summary].join('\n');
}

function describeFleet(outcomes: FleetOutcome[]): string {
  const seconds = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;
  const detail = (o: FleetOutcome): string => {
    if (o.status === 'assigned') {
      const r = o.result as AssignResult;
      return `${r.located} files, ${mib(r.report.bytesSharedWithPayloads)} shared, ${mib(r.report.bytesCopiedIntoAppsLayer)} written`;
    }
    return `${o.reason ?? ''}${o.resume ? ` (finish with: ${o.resume})` : ''}`;
  };
  const rows = outcomes.map((o) => [o.desktop, o.status, seconds(o.elapsedMs), detail(o)]);
  const widths = [0, 1, 2].map((i) => Math.max(...rows.map((r) => r[i]!.length), ['desktop', 'result', 'time'][i]!.length));
  const line = (cells: string[]): string => cells.map((c, i) => (i < 3 ? c.padEnd(widths[i]!) : c)).join('  ');
  const failed = outcomes.filter((o) => o.status === 'failed').length;
  return [line(['desktop', 'result', 'time', 'detail']), ...rows.map(line), `${outcomes.length - failed} of ${outcomes.length} desktops done${failed ? `, ${failed} failed` : ''}`].join('\n');
}

export function registerLayerCommands(program: Command): void {
  // ---------------------------------------------------------------- base
  const base = program.command('base').description('OS base images in the store (shared, read-only)');
  storeOptions(
    base
      .command('import')
      .description('import IMAGE (qcow2 with its backing chain, or raw) as base NAME: flattened into one qcow2 in the store, read-only from then on')
      .argument('<name>', 'base name')
      .argument('<image>', 'qcow2 or raw image')
      .option('-f, --format <fmt>', 'format of IMAGE (qcow2 or raw; default: qcow2 if it has the qcow2 magic and names no other file, raw without the magic; a qcow2 header that names a backing or data file needs -f)')
      .option('--prepare-home', `add "LABEL=qlayer-home /home ext4 defaults,nofail 0 2" to the base's /etc/fstab (offline, with debugfs), so that desktops created with --home mount their home disk at /home`)
      .addOption(allowOption()),
  ).action(async (name: string, image: string, options: StoreCommandOptions & { format?: 'qcow2' | 'raw'; allow?: string[]; prepareHome?: boolean }) => {
    const { store } = await openContext(options);
    const record = await importBase(store, name, image, {
      ...(options.format ? { format: options.format } : {}),
      ...(options.prepareHome ? { prepareHome: true, log: stepLogger(options) } : {}),
      allowedDirectories: allowedDirectories(options),
      progress: progressReporter(options, `importing ${name}`),
    });
    printResult(options, { name, ...record, path: store.path(record.file) }, () => `imported base ${name}: ${store.path(record.file)} (${mib(record.virtualSize)} virtual)`);
  });
  storeOptions(base.command('remove').description('remove base NAME from the store (refused while a desktop uses it, naming them)').argument('<name>')).action(
    async (name: string, options: StoreCommandOptions) => {
      const { store } = await openContext(options);
      const record = await removeBase(store, name);
      printResult(options, { name, removed: true, file: store.path(record.file) }, () => `removed base ${name} (${store.path(record.file)})`);
    },
  );
  storeOptions(base.command('list').description('list the bases in the store')).action(async (options: StoreCommandOptions) => {
    const { store } = await openContext(options);
    const state = await store.readState();
    const bases = Object.entries(state.bases).map(([name, record]) => ({ name, ...record, path: store.path(record.file) }));
    printResult(options, bases, () => (bases.length ? bases.map((b) => `${b.name}\t${mib(b.virtualSize)}\t${b.path}`).join('\n') : 'no bases'));
  });

  // ---------------------------------------------------------------- app
  const app = program.command('app').description('applications: immutable versions of a folder of files');
  storeOptions(
    app
      .command('build')
      .description('build app NAME from the files in DIR: a manifest (path, size, mode, owner, sha256) and a 4 KiB-aligned payload')
      .argument('<name>', 'app name')
      .argument('<dir>', 'folder whose contents the app installs')
      .option('--version <v>', 'version label (default: a hash of the content)')
      .option('--prefix <path>', 'guest folder the files go under (default /opt/NAME)')
      .option('--owner <uid:gid>', 'numeric owner of the files in the guest (default 0:0)'),
  ).action(async (name: string, dir: string, options: StoreCommandOptions & { version?: string; prefix?: string; owner?: string }) => {
    const { store } = await openContext(options);
    const owner = parseOwner(options.owner);
    const manifest = await store.withLock(() =>
      buildApp(store, {
        name,
        sourceDir: dir,
        ...(options.version ? { version: options.version } : {}),
        ...(options.prefix ? { prefix: options.prefix } : {}),
        ...owner,
      }),
    );
    printResult(options, manifest, () => `built ${manifest.name}@${manifest.version}: ${manifest.files.length} files, ${mib(manifest.payloadSize)} payload, under ${manifest.prefix}`);
  });
  storeOptions(app.command('list').description('list apps and their versions')).action(async (options: StoreCommandOptions) => {
    const { store } = await openContext(options);
    const apps = await listApps(store);
    const rows = Object.entries(apps).flatMap(([name, versions]) =>
      versions.map((m) => ({ name, version: m.version, files: m.files.length, bytes: m.files.reduce((n, f) => n + f.size, 0), prefix: m.prefix, createdAt: m.createdAt })),
    );
    printResult(options, rows, () => (rows.length ? rows.map((r) => `${r.name}@${r.version}\t${r.files} files\t${mib(r.bytes)}\t${r.prefix}`).join('\n') : 'no apps'));
  });
  storeOptions(app.command('show').description('show an app version (the newest unless @VERSION is given)').argument('<app>', 'NAME or NAME@VERSION')).action(
    async (ref: string, options: StoreCommandOptions) => {
      const { store } = await openContext(options);
      const manifest = await resolveApp(store, ref);
      printResult(options, manifest, () =>
        [`${manifest.name}@${manifest.version} under ${manifest.prefix}`, ...manifest.files.map((f) => `  ${f.mode.toString(8).padStart(4, '0')} ${f.uid}:${f.gid} ${String(f.size).padStart(10)} ${f.sha256.slice(0, 16)} ${f.path}`)].join('\n'),
      );
    },
  );

  // ---------------------------------------------------------------- desktop
  const desktop = program.command('desktop').description('desktops: base <- apps <- user chains that boot under libvirt');
  storeOptions(
    desktop
      .command('create')
      .description('create desktop NAME on a base, and define its persistent libvirt domain (virsh list --all shows it)')
      .argument('<name>')
      .requiredOption('--base <base>', 'base to build on')
      .option('--like <domain>', "copy another domain's hardware (memory, CPUs, NICs, graphics, ...); its disks are replaced by the desktop's")
      .option('--xml <file>', 'take the hardware from a libvirt domain XML file; its disks are replaced by the desktop\'s')
      .option('--home <size>', 'give the desktop a persistent home disk of this size (e.g. 20G): home.qcow2, ext4 labelled qlayer-home, a second disk kept across rebases (the base needs import --prepare-home to mount it)'),
  ).action(async (name: string, options: StoreCommandOptions & { base: string; like?: string; xml?: string; home?: string }) => {
    const { store, runtime } = await openContext(options);
    const homeBytes = options.home === undefined ? undefined : parseHomeSize(options.home);
    if (options.like !== undefined && options.xml !== undefined) throw new QlayerError('cli.usage', 'give --like or --xml, not both');
    const template: DesktopTemplate | undefined =
      options.like !== undefined ? { kind: 'domain', name: options.like } : options.xml !== undefined ? { kind: 'xml', xml: await readFile(options.xml, 'utf8'), source: options.xml } : undefined;
    // The runtime carries the config's desktop.network/graphics for every definition it makes (context.ts).
    const created = await createDesktop(store, name, options.base, { runtime, ...(template ? { template } : {}), ...(homeBytes !== undefined ? { homeBytes, log: stepLogger(options) } : {}) });
    const view = await showDesktop(store, runtime, name);
    // homeSeed: what the home disk was given from the base's /home (absent: nothing, or no home disk).
    printResult(options, created.homeSeed ? { ...view, homeSeed: created.homeSeed } : view, () => [describeDesktop(view), ...(created.homeSeed ? describeHomeSeed(created.homeSeed) : [])].join('\n'));
  });
  storeOptions(
    desktop
      .command('adopt')
      .description(
        "make a shut-off VM a desktop: its first disk's content becomes a new base (flattened, read-only), the desktop gets a fresh user delta, " +
          'and the domain is redefined on the composed chain keeping its name and every other setting. The original disk file is left untouched',
      )
      .argument('<domain>', 'the libvirt domain')
      .option('--as <name>', 'desktop (and base) name; default: the domain name')
      .addOption(allowOption()),
  ).action(async (domain: string, options: StoreCommandOptions & { as?: string; allow?: string[] }) => {
    const { store, runtime } = await openContext(options);
    const result = await adoptDesktop(store, runtime, domain, {
      ...(options.as === undefined ? {} : { as: options.as }),
      allowedDirectories: allowedDirectories(options),
      progress: progressReporter(options, `importing ${domain}'s disk`),
    });
    printResult(options, result, () => `adopted domain ${result.domain} as desktop ${result.desktop} on base ${result.base} (imported from ${result.importedFrom}, which is left as it was)`);
  });
  storeOptions(
    desktop
      .command('release')
      .description(
        'write the desktop\'s composed disk out as one image FILE, redefine its domain on it (every other setting kept), and take the desktop out of the store (its apps and user layers are deleted; the base stays)',
      )
      .argument('<name>')
      .requiredOption('--to <file>', 'the new image (must not exist)')
      .option('-O, --format <fmt>', 'qcow2 or raw (default: raw for .raw/.img, else qcow2)'),
  ).action(async (name: string, options: StoreCommandOptions & { to: string; format?: 'qcow2' | 'raw' }) => {
    const { store, runtime } = await openContext(options);
    if (options.format !== undefined && options.format !== 'qcow2' && options.format !== 'raw') throw new QlayerError('cli.usage', `--format must be qcow2 or raw, not ${options.format}`);
    const result = await releaseDesktop(store, runtime, name, options.to, { ...(options.format ? { format: options.format } : {}), progress: progressReporter(options, `writing ${options.to}`) });
    printResult(options, result, () => `released ${name}: domain ${result.domain} now runs ${result.image} (${result.format}, ${mib(result.virtualSize)} virtual)`);
  });
  storeOptions(desktop.command('start').description('boot the desktop and wait for its guest agent').argument('<name>')).action(async (name: string, options: StoreCommandOptions) => {
    const { store, runtime } = await openContext(options);
    await startDesktop(store, runtime, name);
    const view = await showDesktop(store, runtime, name);
    const handle = desktopHandle(store, await store.readState(), name);
    printResult(options, view, () => `${name} is running (domain ${handle.domain ?? desktopDomain(handle)})`);
  });
  storeOptions(desktop.command('stop').description('shut the desktop down cleanly (agent shutdown; destroy after the timeout)').argument('<name>')).action(
    async (name: string, options: StoreCommandOptions) => {
      const { store, runtime } = await openContext(options);
      // Which way the guest went down (agent, systemctl, acpi, destroyed), with each failed step's words.
      const stops: ShutdownResult[] = [];
      const unobserve = observeShutdowns((_domain, result) => stops.push(result));
      try {
        await stopDesktop(store, runtime, name);
      } finally {
        unobserve();
      }
      const view = await showDesktop(store, runtime, name);
      const stop: ShutdownResult = stops.at(-1) ?? { how: 'already-off', ms: 0, steps: [] };
      printResult(options, { ...view, stop }, () =>
        [`${name} is stopped: ${describeShutdown(stop)}`, ...(stop.steps.length > 1 ? stop.steps.map((s) => `  ${s.ok ? 'ok' : 'failed'} ${s.how}: ${s.detail}`) : [])].join('\n'),
      );
    },
  );
  for (const [verb, help] of [
    ['status', 'show whether the desktop runs, and its apps'],
    ['show', 'show the desktop: state, apps, and the absolute paths of its base, apps and user files'],
  ] as const) {
    storeOptions(desktop.command(verb).description(help).argument('<name>')).action(async (name: string, options: StoreCommandOptions) => {
      const { store, runtime } = await openContext(options);
      const view = await showDesktop(store, runtime, name);
      printResult(options, view, () => describeDesktop(view));
    });
  }
  storeOptions(desktop.command('list').description('list desktops')).action(async (options: StoreCommandOptions) => {
    const { store, runtime } = await openContext(options);
    const views = await listDesktops(store, runtime);
    printResult(options, views, () => (views.length ? views.map((v) => `${v.name}\t${v.state}${v.stagingFor !== undefined ? ` (staging for ${v.stagingFor}'s rebase)` : ''}\t${v.base}\t${v.apps.join(',') || '-'}`).join('\n') : 'no desktops'));
  });
  storeOptions(desktop.command('destroy').description('delete the desktop and its apps and user layers (refused while it runs)').argument('<name>')).action(
    async (name: string, options: StoreCommandOptions) => {
      const { store, runtime } = await openContext(options);
      await destroyDesktop(store, runtime, name);
      printResult(options, { name, destroyed: true }, () => `destroyed ${name}`);
    },
  );
  storeOptions(
    desktop
      .command('assign')
      .description(
        'assign apps: allocate their files in the running guest (started if needed), shut down, locate them offline, recompose ' +
          '(with --at-next-boot: allocate now, keep the guest running, the rest at its next start). ' +
          'With --desktops or --all, every APP argument is an app and the desktops go a few at a time; one failing leaves the others done',
      )
      .usage('[options] NAME APP[@VERSION]...  |  --desktops A,B,... APP[@VERSION]...  |  --all APP[@VERSION]...')
      .argument('<name>', 'the desktop (an app when --desktops or --all is given)')
      .argument('[apps...]', 'APP or APP@VERSION')
      .option('--desktops <list>', 'comma-separated desktops to assign to')
      .option('--all', 'every desktop in the store (those that already have the app are skipped)')
      .option('--parallel <n>', 'desktops at once (default: one per core, within free memory)')
      .option('--abort', 'undo an unfinished assign or update of NAME, or drop its pending --at-next-boot assign: delete the placeholders it left in the guest (only untouched ones) and its record')
      .option(
        '--at-next-boot',
        'for a running desktop: allocate the placeholders now and leave the guest running; the recompose runs when the domain next starts, whoever starts it (needs qlayer host install-hook, or qlayer desktop start)',
      ),
  ).action(async (name: string, apps: string[], options: StoreCommandOptions & { desktops?: string; all?: boolean; parallel?: string; abort?: boolean; atNextBoot?: boolean }) => {
    const { store, runtime, config } = await openContext(options);
    if (options.abort) {
      if (apps.length || options.desktops !== undefined || options.all) throw new QlayerError('cli.usage', '--abort takes only the desktop: qlayer desktop assign --abort NAME');
      const pendingUndone = await abortPendingAssign(store, runtime, name, stepLogger(options));
      const undone = pendingUndone !== 'nothing' ? pendingUndone : await abortOperation(store, runtime, name, stepLogger(options));
      printResult(options, { desktop: name, aborted: undone !== 'nothing', undone: undone === 'nothing' ? null : undone }, () =>
        undone === 'nothing' ? `${name} has no unfinished assign or update` : `undone: ${describeUndo(undone)}`,
      );
      return;
    }
    if (options.atNextBoot) {
      if (options.desktops !== undefined || options.all) throw new QlayerError('cli.usage', '--at-next-boot works on one desktop: qlayer desktop assign NAME APP... --at-next-boot');
      if (!apps.length) throw new QlayerError('cli.usage', 'name at least one app to assign: qlayer desktop assign NAME APP[@VERSION]... --at-next-boot');
      const result = await assignAtNextBoot(store, runtime, name, apps, stepLogger(options));
      printResult(options, result, () => describeAtNextBoot(result));
      return;
    }
    if (options.desktops === undefined && !options.all) {
      if (!apps.length) throw new QlayerError('cli.usage', 'name at least one app to assign: qlayer desktop assign NAME APP[@VERSION]...');
      const result = await assignApps(store, runtime, name, apps, stepLogger(options));
      printResult(options, result, () => `assigned ${result.apps.join(', ')} (${result.located} files)\n${describeRecompose(result.report)}`);
      return;
    }
    if (options.desktops !== undefined && options.all) throw new QlayerError('cli.usage', 'give --desktops or --all, not both');
    const names = options.all ? 'all' : options.desktops!.split(',').map((d) => d.trim()).filter(Boolean);
    const parallel = options.parallel === undefined ? defaultParallelism(config.guest.memoryMiB) : Number(options.parallel);
    const step = stepLogger(options);
    const outcomes = await assignToDesktops(store, runtime, names, [name, ...apps], { parallel, log: (desktop, message) => step(`[${desktop}] ${message}`) });
    printResult(options, { parallel, desktops: outcomes }, () => describeFleet(outcomes));
    if (outcomes.some((o) => o.status === 'failed')) process.exitCode = 1;
  });
  storeOptions(
    desktop
      .command('update')
      .description('replace an assigned app by another version in one boot: delete the old files and allocate the new ones in the same guest session, then one shutdown and one recompose')
      .argument('<name>')
      .argument('<app>', 'APP@VERSION (or APP for its newest version)'),
  ).action(async (name: string, ref: string, options: StoreCommandOptions) => {
    const { store, runtime } = await openContext(options);
    const result = await updateApp(store, runtime, name, ref, stepLogger(options));
    printResult(options, result, () => `updated ${result.replaced} to ${result.apps[0]} (${result.located} files)\n${describeRecompose(result.report)}`);
  });
  storeOptions(
    desktop
      .command('unassign')
      .description('unassign apps: delete their files in the guest, check offline they are gone, shut down, recompose')
      .argument('<name>')
      .argument('<apps...>', 'APP or APP@VERSION')
      .option('--at-next-boot', 'for a running desktop: delete the files in the guest now and leave it running; the apps leave its layers when the domain next starts'),
  ).action(async (name: string, apps: string[], options: StoreCommandOptions & { atNextBoot?: boolean }) => {
    const { store, runtime } = await openContext(options);
    if (options.atNextBoot) {
      const result = await unassignAtNextBoot(store, runtime, name, apps, stepLogger(options));
      printResult(options, result, () => describeAtNextBoot(result));
      return;
    }
    const report = await unassignApps(store, runtime, name, apps, stepLogger(options));
    printResult(options, report, () =>
      [describeRecompose(report), ...(report.alreadyGone.length ? [`  already deleted in the guest: ${report.alreadyGone.join(', ')}`] : [])].join('\n'),
    );
  });
  storeOptions(desktop.command('recompose').description('run the offline recompose; finishes an interrupted one (refused while the desktop runs)').argument('<name>')).action(
    async (name: string, options: StoreCommandOptions) => {
      const { store, runtime } = await openContext(options);
      const report = await recomposeDesktop(store, runtime, name, stepLogger(options));
      printResult(options, report ?? { nothingToDo: true }, () => describeRecompose(report));
    },
  );
  storeOptions(
    desktop
      .command('verify')
      .description('boot the desktop, hash every assigned app file in the guest, compare with the manifests')
      .argument('<name>')
      .addHelpText(
        'after',
        [
          '',
          'Each app file is one of: ok; user-changed (written or replaced in the guest after the assign: the',
          "user's edit, kept in the user delta); user-deleted; damaged (different, with no write through the",
          "guest's filesystem to explain it).",
          'Exit status: 0 every file matches, 1 only user changes, 2 a file is damaged (or an error).',
        ].join('\n'),
      ),
  ).action(
    async (name: string, options: StoreCommandOptions) => {
      const { store, runtime } = await openContext(options);
      const result = await verifyDesktop(store, runtime, name, [], stepLogger(options));
      const bad = result.files.filter((f) => !f.ok);
      const damaged = bad.filter((f) => f.status === 'damaged');
      const label: Record<string, string> = { ok: 'ok          ', 'user-changed': 'user-changed', 'user-deleted': 'user-deleted', damaged: 'DAMAGED     ' };
      printResult(options, result, () =>
        [
          ...result.files.map((f) => `${label[f.status] ?? f.status} ${f.app}\t${f.path}${f.why ? `\n             ${f.why}` : ''}`),
          result.files.length === 0
            ? `${name} has no apps assigned: nothing to verify`
            : bad.length
              ? `${bad.length} of ${result.files.length} files differ from their manifests: ${damaged.length} damaged, ${bad.length - damaged.length} changed by the user`
              : `all ${result.files.length} app files match their manifests`,
          ...(result.unknownFiles.length ? [`note: ${result.unknownFiles.length} file(s) under the apps' folders belong to no assigned app (the user's, or left by an undo): ${result.unknownFiles.join(', ')}`] : []),
          ...(result.home
            ? [result.home.mounted ? `home disk mounted at /home (${result.home.device}, ${result.home.fstype})` : `HOME NOT MOUNTED: ${name} has a home disk (${result.home.disk}) but the guest mounted nothing at /home; import its base with --prepare-home, or add "LABEL=qlayer-home /home ext4 defaults,nofail 0 2" to the guest's /etc/fstab`]
            : []),
        ].join('\n'),
      );
      if (damaged.length || (result.home && !result.home.mounted)) process.exitCode = 2;
      else if (bad.length) process.exitCode = 1;
    },
  );

  // ---------------------------------------------------------------- group
  const group = program
    .command('group')
    .description('groups of desktops that share apps: a change rolls out to every member; a running member is left pending for the next rollout');
  const rolloutOptions = (command: Command): Command => storeOptions(command.option('--parallel <n>', 'desktops at once (default: one per core, within free memory)'));
  const runRollout = async (options: StoreCommandOptions & { parallel?: string }, work: (ctx: Awaited<ReturnType<typeof openContext>>, rollout: { parallel: number; log: (d: string, m: string) => void }) => Promise<RolloutOutcome[]>): Promise<void> => {
    const ctx = await openContext(options);
    const parallel = options.parallel === undefined ? defaultParallelism(ctx.config.guest.memoryMiB) : Number(options.parallel);
    if (!Number.isInteger(parallel) || parallel < 1) throw new QlayerError('cli.usage', `--parallel must be a whole number of at least 1, not ${options.parallel}`);
    const step = stepLogger(options);
    const outcomes = await work(ctx, { parallel, log: (desktop, message) => step(`[${desktop}] ${message}`) });
    printResult(options, { parallel, desktops: outcomes }, () => describeRollout(outcomes));
    if (outcomes.some((o) => o.status === 'failed')) process.exitCode = 1;
  };
  storeOptions(group.command('create').description('create an empty group').argument('<group>')).action(async (name: string, options: StoreCommandOptions) => {
    const { store } = await openContext(options);
    const record = await createGroup(store, name);
    printResult(options, { name, ...record }, () => `created group ${name}`);
  });
  rolloutOptions(group.command('add').description('add desktops to the group; they get its apps').argument('<group>').argument('<desktops...>')).action(
    (name: string, desktops: string[], options: StoreCommandOptions & { parallel?: string }) => runRollout(options, ({ store, runtime }, rollout) => addToGroup(store, runtime, name, desktops, rollout)),
  );
  rolloutOptions(group.command('assign').description("give the group these app versions (another version of the same app is replaced) and roll out").argument('<group>').argument('<apps...>', 'APP or APP@VERSION')).action(
    (name: string, apps: string[], options: StoreCommandOptions & { parallel?: string }) => runRollout(options, ({ store, runtime }, rollout) => groupAssign(store, runtime, name, apps, rollout)),
  );
  rolloutOptions(group.command('unassign').description("take apps out of the group and roll out (members keep apps that are their own)").argument('<group>').argument('<apps...>', 'APP')).action(
    (name: string, apps: string[], options: StoreCommandOptions & { parallel?: string }) => runRollout(options, ({ store, runtime }, rollout) => groupUnassign(store, runtime, name, apps, rollout)),
  );
  rolloutOptions(group.command('rollout').description('roll the group out again: members left pending because they ran, and any that drifted; harmless when nothing changed').argument('<group>')).action(
    (name: string, options: StoreCommandOptions & { parallel?: string }) => runRollout(options, ({ store, runtime }, rollout) => rollOutGroup(store, runtime, name, rollout)),
  );
  registerRebaseCommands(desktop, group);
  storeOptions(group.command('list').description('list groups with their desktops, apps and pending members')).action(async (options: StoreCommandOptions) => {
    const { store } = await openContext(options);
    const groups = listGroups(await store.readState());
    printResult(options, groups, () =>
      groups.length
        ? groups.map((g) => `${g.name}\tdesktops: ${g.desktops.join(',') || '-'}\tapps: ${g.apps.join(',') || '-'}${g.pending.length ? `\tpending: ${g.pending.join(',')}` : ''}`).join('\n')
        : 'no groups',
    );
  });
}
