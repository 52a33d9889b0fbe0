/**
 * `qlayer host check`: what this machine lacks to run qlayer's guests, each item with its fix.
 * `qlayer host install-hook|remove-hook|run-hook`: libvirt's QEMU hook for --at-next-boot.
 */
import { realpathSync } from 'node:fs';
import type { Command } from 'commander';
import { printResult, type CommonOptions } from '../output.js';

export function registerHostCommands(program: Command): void {
  const host = program.command('host').description("this KVM host: readiness for qlayer, and libvirt's QEMU hook for --at-next-boot");
  host
    .command('check')
    .description('check libvirtd, QEMU, KVM and (with --image) access to images; exit 1 if a required item fails')
    .option('--uri <uri>', 'libvirt URI', 'qemu:///system')
    .option('--image <path...>', "images QEMU must open (checked against qemu.conf's user)")
    .option('--probe-kvm', 'also boot the test guest under KVM for a few seconds to see whether KVM really runs guests')
    .option('--json', 'print the result as JSON')
    .action(async (options: CommonOptions & { uri: string; image?: string[]; probeKvm?: boolean }) => {
      // Loaded here: `host run-hook` (every domain start) must not pay for libvirt and the guest code.
      const { checkHost } = await import('../../virt/host-check.js');
      const { fixtureKvmProbe } = await import('../../virt/kvm-probe.js');
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
  host
    .command('install-hook')
    .description(
      "install libvirt's QEMU hook (/etc/libvirt/hooks/qemu) that applies desktops' --at-next-boot changes when a domain starts; " +
        "refuses to overwrite another hook; says whether libvirtd must restart (or reload) to see it",
    )
    .option('--path <file>', 'where the hook goes (libvirt 6.5+ also runs executables in /etc/libvirt/hooks/qemu.d/)', '/etc/libvirt/hooks/qemu')
    .option('--reload-daemon', 'if the running libvirtd has not seen the hook yet, send it SIGHUP (a reload: running guests are not touched)')
    .option('--json', 'print the result as JSON')
    .action(async (options: CommonOptions & { path: string; reloadDaemon?: boolean }) => {
      const { installHook } = await import('../../virt/hook.js');
      const bin = realpathSync(process.argv[1] ?? '');
      const result = await installHook({ node: process.execPath, bin, path: options.path, ...(options.reloadDaemon ? { reloadDaemon: true } : {}) });
      printResult(options, result, () =>
        [`${result.replaced === 'unchanged' ? 'already installed' : 'installed'} ${result.path}${result.replaced === 'qlayer-hook' ? ' (replacing the earlier qlayer hook)' : ''}: runs ${result.runs}`, `${result.daemonMustReload ? 'libvirtd must reload: ' : ''}${result.daemonNote}`].join('\n'),
      );
    });
  host
    .command('remove-hook')
    .description("remove qlayer's libvirt QEMU hook (a hook that is not qlayer's is left alone)")
    .option('--path <file>', 'where the hook is', '/etc/libvirt/hooks/qemu')
    .option('--json', 'print the result as JSON')
    .action(async (options: CommonOptions & { path: string }) => {
      const { removeHook } = await import('../../virt/hook.js');
      const result = await removeHook({ path: options.path });
      printResult(options, result, () => (result.removed ? `removed ${result.path}` : `no hook at ${result.path}`));
    });
  host
    .command('run-hook')
    .description("what libvirt's hook runs: DOMAIN OPERATION SUB-OPERATION EXTRA, the domain's XML on stdin; always exits 0")
    .argument('[args...]')
    .option('--json', 'print what it did as JSON (libvirt ignores it)')
    .action(async (args: string[], options: CommonOptions) => {
      // Never fails: a hook's failure would stop the domain's start.
      try {
        const xml = await readStdin();
        // The fast path for every domain that is not a qlayer desktop: nothing else is loaded.
        if (args[1] !== 'prepare' || args[2] !== 'begin' || !xml.includes('qlayer.invalid/xmlns/desktop/1')) return;
        const { runHook } = await import('../../virt/hook.js');
        const run = await runHook(args, xml);
        if (options.json) process.stdout.write(`${JSON.stringify(run)}\n`);
      } catch {
        // nothing: the start goes on
      }
      process.exitCode = 0;
    });
}

async function readStdin(): Promise<string> {
  if (process.stdin.isTTY) return '';
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}
