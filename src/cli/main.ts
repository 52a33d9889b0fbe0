import { Command, CommanderError } from 'commander';
import { reportError } from './output.js';
import { commandGroups } from './commands/index.js';

/** Build the whole command tree; exported so tests can drive the CLI in-process. */
export function buildProgram(): Command {
  const program = new Command('qlayer')
    .description(
      'Compose KVM desktop disks from qcow2 layers: a shared OS base, an apps delta and a user delta.\n' +
        'Every command accepts --json for machine-readable output.',
    )
    .version('0.1.0')
    // Root options only before the subcommand: `app build --version V` is the app's version.
    .enablePositionalOptions()
    .showHelpAfterError()
    .exitOverride();
  for (const register of commandGroups) register(program);
  return program;
}

/** Run the CLI; resolves to the process exit code. */
export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  const json = argv.includes('--json');
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (error) {
    if (error instanceof CommanderError) {
      // Commander already printed help or the usage error; --help and --version exit 0.
      return error.exitCode;
    }
    return reportError(error, json);
  }
}
