import { Command, CommanderError } from 'commander';
import { QlayerError } from '../errors.js';
import { reportError, writeStdout } from './output.js';
import { registerCommands } from './commands/index.js';

/**
 * Build the command tree; exported so tests can drive the CLI in-process. With `args` (the user
 * arguments, without node and the script) only the command groups that line needs are imported
 * and registered (see commands/index.ts); without, the whole tree.
 */
export async function buildProgram(args?: readonly string[]): Promise<Command> {
  const program = new Command('qlayer')
    .description(
      'Compose KVM desktop disks from qcow2 layers: a shared OS base, an apps delta and a user delta.\n' +
        'Every command accepts --json for machine-readable output.',
    )
    .version('0.1.0')
    // Root options only before the subcommand: `app build --version V` is the app's version.
    .enablePositionalOptions()
    // Usage errors are printed by main() like every other error (one line, or JSON with
    // --json), not by commander with its help text; subcommands inherit this.
    .configureOutput({ outputError: () => {}, writeOut: writeStdout })
    .exitOverride();
  await registerCommands(program, args);
  return program;
}

/** Run the CLI; resolves to the process exit code. */
export async function main(argv: string[]): Promise<number> {
  const json = argv.includes('--json');
  try {
    const program = await buildProgram(argv.slice(2));
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (error) {
    if (error instanceof CommanderError) {
      // Help and version were printed as asked (a group without its subcommand prints its help).
      if (SHOWN_BY_COMMANDER.has(error.code)) return error.exitCode;
      return reportError(usageError(error), json);
    }
    return reportError(error, json);
  }
}

const SHOWN_BY_COMMANDER = new Set(['commander.helpDisplayed', 'commander.help', 'commander.version', 'commander.executeSubCommandAsync']);

/**
 * A command-line mistake as a QlayerError: code `usage.<commander's code>` in kebab case
 * (usage.unknown-option, usage.missing-argument, usage.invalid-argument...), and commander's
 * own sentence without its "error: " prefix.
 */
function usageError(error: CommanderError): QlayerError {
  const kind = error.code.replace(/^commander\./, '').replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
  const message = error.message.replace(/^error: /, '').trim();
  return new QlayerError(`usage.${kind}`, `${message} (see --help)`, { exitCode: error.exitCode });
}
