/**
 * `--allow DIR` (repeatable) and the config key `allow`: the folders, besides the folder tree of
 * the image the user named, whose files an image may name as backing or data file. Every
 * command that opens an image takes them; nothing else widens the confinement.
 */
import { resolve } from 'node:path';
import { Option, type Command } from 'commander';
import { loadConfig } from '../config/config.js';

export interface AllowOptions {
  allow?: string[];
  config?: string;
}

/** The --allow option alone (repeatable), for commands that have --config already. */
export function allowOption(): Option {
  return new Option('--allow <dir>', 'also accept backing and data files inside DIR (repeatable; default: only the image\'s own folder tree)').argParser(
    (value: string, previous: string[] | undefined) => [...(previous ?? []), value],
  );
}

/** Add --allow (repeatable) and --config to an image-opening command. */
export function allowOptions(command: Command): Command {
  return command
    .addOption(allowOption())
    .option('--config <file>', 'config file whose `allow` list is added (default: $QLAYER_CONFIG, ./qlayer.yaml, ~/.config/qlayer/config.yaml)');
}

/** The allowed folders: --allow ones first, then the config's, absolute. */
export function allowedDirectories(options: AllowOptions): string[] {
  const config = loadConfig(options.config === undefined ? {} : { file: options.config });
  return [...(options.allow ?? []).map((dir) => resolve(dir)), ...config.allow];
}
