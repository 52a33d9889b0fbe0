/**
 * `qlayer desktop rebase` and `qlayer group rebase`: move desktops onto another base (an OS
 * update) keeping their apps and home disks. Registered on the desktop and group commands of
 * layers.ts; kept here so that file stays about the everyday commands.
 */
import type { Command } from 'commander';
import { QlayerError } from '../../errors.js';
import { defaultParallelism } from '../../layers/fleet.js';
import { groupRebase, type GroupRebaseOutcome } from '../../layers/groups.js';
import { describeLoss, rebaseDesktop, rebaseLoss, resumeRebase, type RebaseResult } from '../../layers/rebase.js';
import { openContext, stepLogger, storeOptions, type StoreCommandOptions } from '../context.js';
import { printResult } from '../output.js';

type RebaseCommandOptions = StoreCommandOptions & { base?: string; yes?: boolean; resume?: boolean; parallel?: string };

function describeResult(result: RebaseResult): string {
  if (result.unchanged && result.interrupted === 'discarded') return `${result.desktop}: the interrupted rebase was undone; it stays on ${result.from}`;
  if (result.unchanged) return `${result.desktop} is on ${result.to} already${result.interrupted === 'finished' ? ' (finished the interrupted rebase)' : ''}`;
  return [
    `rebased ${result.desktop} from ${result.from} to ${result.to}${result.interrupted === 'discarded' ? ' (an interrupted attempt was undone first)' : result.interrupted === 'finished' ? ' (finished the interrupted rebase)' : ''}`,
    `  apps placed again: ${result.apps.length ? result.apps.join(', ') : '(none)'}`,
    result.home ? `  home disk kept: ${result.home}` : '  no home disk: the user\'s files went with the old system disk',
  ].join('\n');
}

function describeGroupRebase(outcomes: GroupRebaseOutcome[], base: string): string {
  const rows = outcomes.map((o) => [o.desktop, o.status, `${(o.elapsedMs / 1000).toFixed(1)} s`, o.status === 'rebased' ? `from ${o.from}` : (o.reason ?? '')]);
  const widths = [0, 1, 2].map((i) => Math.max(...rows.map((r) => r[i]!.length), ['desktop', 'result', 'time'][i]!.length));
  const line = (cells: string[]): string => cells.map((c, i) => (i < 3 ? c.padEnd(widths[i]!) : c)).join('  ').trimEnd();
  const count = (status: GroupRebaseOutcome['status']): number => outcomes.filter((o) => o.status === status).length;
  return [
    line(['desktop', 'result', 'time', 'detail']),
    ...rows.map(line),
    `${outcomes.length} desktops onto ${base}: ${count('rebased')} rebased, ${count('unchanged')} unchanged, ${count('pending')} pending (running), ${count('failed')} failed`,
  ].join('\n');
}

export function registerRebaseCommands(desktop: Command, group: Command): void {
  storeOptions(
    desktop
      .command('rebase')
      .description(
        'move the desktop onto another base (an OS update): a new system chain on BASE with an empty user delta, its apps placed again, its home disk kept. ' +
          'Every change made in the guest outside /home is lost: without --yes this prints what would be lost and changes nothing. ' +
          'Crash-safe: the new chain is built and booted beside the old one, the switch is one state write, the old chain goes last; a rerun (or --resume) finishes or undoes an interrupted one',
      )
      .argument('<name>')
      .option('--base <base>', 'the new base (at least as large as the current one)')
      .option('--yes', 'do it: the changes outside /home are lost')
      .option('--resume', 'only finish (after the switch) or undo (before it) an interrupted rebase'),
  ).action(async (name: string, options: RebaseCommandOptions) => {
    const { store, runtime } = await openContext(options);
    const log = stepLogger(options);
    if (options.resume) {
      if (options.base !== undefined || options.yes) throw new QlayerError('cli.usage', '--resume takes only the desktop: qlayer desktop rebase --resume NAME');
      const result = await resumeRebase(store, runtime, name, log);
      printResult(options, result ?? { desktop: name, nothingToDo: true }, () => (result ? describeResult(result) : `${name} has no unfinished rebase`));
      return;
    }
    if (options.base === undefined) throw new QlayerError('cli.usage', 'name the new base: qlayer desktop rebase NAME --base BASE --yes');
    if (!options.yes) {
      const state = await store.readState();
      if (!state.desktops[name]?.rebase) {
        const loss = await rebaseLoss(store, runtime, name, options.base);
        printResult(options, { ...loss, confirmed: false }, () => `${describeLoss(loss)}\nnothing was changed; run again with --yes to rebase`);
        process.exitCode = 1;
        return;
      }
    }
    const result = await rebaseDesktop(store, runtime, name, options.base, { yes: options.yes === true, log });
    printResult(options, result, () => describeResult(result));
  });

  storeOptions(
    group
      .command('rebase')
      .description('rebase every member onto BASE (see desktop rebase), a few at a time; a running member is left pending and done by the next group rebase once stopped; members on BASE already are left alone')
      .argument('<group>')
      .requiredOption('--base <base>', 'the new base')
      .option('--yes', 'do it: each member loses its changes outside /home')
      .option('--parallel <n>', 'desktops at once (default: one per core, within free memory)'),
  ).action(async (name: string, options: RebaseCommandOptions) => {
    const { store, runtime, config } = await openContext(options);
    const parallel = options.parallel === undefined ? defaultParallelism(config.guest.memoryMiB) : Number(options.parallel);
    if (!Number.isInteger(parallel) || parallel < 1) throw new QlayerError('cli.usage', `--parallel must be a whole number of at least 1, not ${options.parallel}`);
    const step = stepLogger(options);
    if (!options.yes) {
      try {
        await groupRebase(store, runtime, name, options.base!, { yes: false });
      } catch (error) {
        if ((error as { code?: string }).code !== 'rebase.needs-yes') throw error;
        printResult(options, { group: name, base: options.base, confirmed: false, wouldLose: (error as Error).message }, () => (error as Error).message);
        process.exitCode = 1;
        return;
      }
    }
    const outcomes = await groupRebase(store, runtime, name, options.base!, { yes: true, parallel, log: (d, m) => step(`[${d}] ${m}`) });
    printResult(options, { group: name, base: options.base, parallel, desktops: outcomes }, () => describeGroupRebase(outcomes, options.base!));
    if (outcomes.some((o) => o.status === 'failed')) process.exitCode = 1;
  });
}
