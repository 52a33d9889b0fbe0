/**
 * Child process for the reaper test: boot a harness VM, print its name and folder as one JSON
 * line, then wait to be killed (SIGKILL: no cleanup of any kind runs).
 */
import { boot, testGuest } from '../../../src/testing/index.js';

const guest = await testGuest();
const vm = await boot({ ...guest, memoryMiB: 256, timeoutSec: 180 });
process.stdout.write(`${JSON.stringify({ name: vm.name, dir: vm.dir, overlay: vm.overlay })}\n`);
setInterval(() => undefined, 60_000);
