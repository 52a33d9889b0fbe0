import type { Command } from 'commander';

/**
 * The command tree, one entry per group: the top-level command names it registers, and a loader
 * that imports its module. Modules are imported only when needed, so `qlayer image info` does not
 * load (and evaluate) the layers, libvirt and guest-filesystem code, and `qlayer --version` loads
 * no command module at all. The order here is the order of `qlayer --help`: image (the qcow2
 * engine), fs (guest filesystems), base/app/desktop/group (the layers), demo, vm and host
 * (libvirt).
 *
 * A group that adds a top-level command must list its name here, or the command is reachable
 * only when every group is loaded (a test checks each group's names against what it registers).
 */
export interface CommandGroup {
  /** Top-level command names the group registers on the root program. */
  names: readonly string[];
  /** The group's register function; `args` (the command line) lets it build only what the line names. */
  load(): Promise<(program: Command, args?: readonly string[]) => void>;
}

export const commandGroups: readonly CommandGroup[] = [
  { names: ['image'], load: async () => (await import('./image.js')).registerImageCommands },
  { names: ['fs'], load: async () => (await import('./fs.js')).registerFsCommands },
  { names: ['base', 'app', 'desktop', 'group'], load: async () => (await import('./layers.js')).registerLayerCommands },
  { names: ['demo'], load: async () => (await import('./demo.js')).registerDemoCommand },
  { names: ['vm'], load: async () => (await import('./vm.js')).registerVmCommands },
  { names: ['host'], load: async () => (await import('./host.js')).registerHostCommands },
];

/** Root options that take no value (the root has only these; enablePositionalOptions keeps the rest). */
const VERSION_FLAGS = new Set(['-V', '--version']);
const HELP_FLAGS = new Set(['-h', '--help']);

/**
 * The groups a command line needs (user arguments, without node and the script): the one group
 * that owns the named command (also for `help NAME`); none for a bare `--version`; all of them
 * otherwise (root help, no command, an unknown command, so that commander lists every command
 * and suggests the nearest name as before).
 */
export function groupsFor(args: readonly string[]): readonly CommandGroup[] {
  const words = args.filter((arg) => !arg.startsWith('-'));
  let name = words[0];
  if (name === 'help') name = words[1];
  if (name === undefined) {
    const versionOnly = args.some((arg) => VERSION_FLAGS.has(arg)) && !args.some((arg) => HELP_FLAGS.has(arg));
    return versionOnly ? [] : commandGroups;
  }
  // Root options come before the command (enablePositionalOptions), so the first word is it.
  const group = commandGroups.find((candidate) => candidate.names.includes(name));
  return group ? [group] : commandGroups;
}

/** Register the groups a command line needs (all of them when args is omitted). */
export async function registerCommands(program: Command, args?: readonly string[]): Promise<void> {
  const groups = args === undefined ? commandGroups : groupsFor(args);
  const registers = await Promise.all(groups.map((group) => group.load()));
  for (const register of registers) register(program, args);
}
