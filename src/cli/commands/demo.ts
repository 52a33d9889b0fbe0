import { InvalidArgumentError, type Command } from 'commander';
import { openContext, storeOptions, type StoreCommandOptions } from '../context.js';
import { DemoFailed, runDemo, type DemoGuest } from '../demo.js';
import { printResult } from '../output.js';

function parseGuest(value: string): DemoGuest {
  if (value !== 'tiny' && value !== 'debian' && value !== 'debian-uefi') throw new InvalidArgumentError('the guest is tiny, debian or debian-uefi');
  return value;
}

export function registerDemoCommand(program: Command): void {
  storeOptions(
    program
      .command('demo')
      .description(
        "the main job on the test guest: compose a desktop from base + apps + user, boot it, and prove the apps are there and the user's file is intact; then unassign one app and prove it again. The desktop stays in the store.",
      ),
  )
    .option('--guest <guest>', 'tiny: the busybox test guest (seconds per boot); debian: the Debian 12 guest (grub, systemd, qemu-ga; built on first use, about 20 s per boot under TCG); debian-uefi: the same system booting through OVMF on q35 (grub-efi on an EFI system partition; needs the ovmf package)', parseGuest, 'tiny' as DemoGuest)
    .action(async (options: StoreCommandOptions & { guest: DemoGuest }) => {
    const context = await openContext(options);
    const started = Date.now();
    const steps = await runDemo(context, (line) => (options.json ? process.stderr : process.stdout).write(`${line}\n`), { guest: options.guest });
    const failed = steps.filter((s) => !s.ok);
    printResult(options, { ok: failed.length === 0, seconds: (Date.now() - started) / 1000, steps }, () =>
      failed.length ? '' : `demo passed in ${((Date.now() - started) / 1000).toFixed(1)} s: every proof holds`,
    );
    if (failed.length) throw new DemoFailed(failed);
  });
}
