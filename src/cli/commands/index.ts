import type { Command } from 'commander';
import { registerDemoCommand } from './demo.js';
import { registerFsCommands } from './fs.js';
import { registerImageCommands } from './image.js';
import { registerLayerCommands } from './layers.js';
import { registerHostCommands } from './host.js';
import { registerVmCommands } from './vm.js';

/**
 * Each command group registers its subcommands on the root program. One line per group keeps
 * the tree in one place: image (the qcow2 engine), fs (guest filesystems), vm and host
 * (libvirt), base/app/desktop/demo (the layers).
 */
export const commandGroups: Array<(program: Command) => void> = [registerImageCommands, registerFsCommands, registerLayerCommands, registerDemoCommand, registerVmCommands, registerHostCommands];
