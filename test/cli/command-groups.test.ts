import { Command } from 'commander';
import { describe, expect, it } from 'vitest';
import { commandGroups, groupsFor } from '../../src/cli/commands/index.js';
import { buildProgram } from '../../src/cli/main.js';

describe('lazily loaded command groups', () => {
  it('each group registers exactly the top-level names it lists', async () => {
    for (const group of commandGroups) {
      const program = new Command('qlayer');
      (await group.load())(program);
      expect(program.commands.map((command) => command.name()).sort()).toEqual([...group.names].sort());
    }
  });

  it('picks the group of the named command, none for --version, all otherwise', () => {
    const image = commandGroups.find((group) => group.names.includes('image'));
    const layers = commandGroups.find((group) => group.names.includes('desktop'));
    expect(groupsFor(['image', 'info', '--json', 'x.qcow2'])).toEqual([image]);
    expect(groupsFor(['desktop', '--help'])).toEqual([layers]);
    expect(groupsFor(['help', 'group'])).toEqual([layers]);
    expect(groupsFor(['--version'])).toEqual([]);
    expect(groupsFor(['-V'])).toEqual([]);
    expect(groupsFor([])).toBe(commandGroups);
    expect(groupsFor(['--help'])).toBe(commandGroups);
    expect(groupsFor(['--version', '--help'])).toBe(commandGroups);
    expect(groupsFor(['imgae', 'info'])).toBe(commandGroups);
  });

  it('the whole tree (root help, unknown commands) has every group in order', async () => {
    const program = await buildProgram();
    expect(program.commands.map((command) => command.name())).toEqual(commandGroups.flatMap((group) => group.names));
    const partial = await buildProgram(['image', 'info', 'x.qcow2']);
    expect(partial.commands.map((command) => command.name())).toEqual(['image']);
  });
});
