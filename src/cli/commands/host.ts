/**
 * `qlayer host check`: what this machine lacks to run qlayer's guests, each item with its fix.
 */
import type { Command } from 'commander';
import { checkHost } from '../../virt/host-check.js';
import { fixtureKvmProbe } from '../../virt/kvm-probe.js';
import { DEFAULT_URI } from '../../virt/libvirt.js';
import { printResult, type CommonOptions } from '../output.js';

export function registerHostCommands(program: Command): void {
  const host = program.command('host').description('this KVM host: readiness for qlayer');
  host
    .command('check')
    .description('check libvirtd, QEMU, KVM and (with --image) access to images; exit 1 if a required item fails')
    .option('--uri <uri>', 'libvirt URI', DEFAULT_URI)
    .option('--image <path...>', "images QEMU must open (checked against qemu.conf's user)")
    .option('--probe-kvm', 'also boot the test guest under KVM for a few seconds to see whether KVM really runs guests')
    .option('--json', 'print the result as JSON')
    .action(async (options: CommonOptions & { uri: string; image?: string[]; probeKvm?: boolean }) => {
      const report = await checkHost({
        uri: options.uri,
        ...(options.image ? { images: options.image } : {}),
        ...(options.probeKvm ? { kvmProbe: fixtureKvmProbe(options.uri) } : {}),
      });
      printResult(options, report, () =>
        [
          ...report.checks.map((c) => `${c.ok ? 'ok  ' : c.optional ? 'warn' : 'FAIL'}  ${c.name}: ${c.detail}${!c.ok && c.fix ? `\n      fix: ${c.fix}` : ''}`),
          report.ok ? 'host ready' : 'host NOT ready',
        ].join('\n'),
      );
      if (!report.ok) process.exitCode = 1;
    });
}
