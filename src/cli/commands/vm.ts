/**
 * `qlayer vm ...`: boot a guest through libvirt and watch its serial console; hash files in a
 * guest; list, stop and clean up qlayer's domains. Works for any guest; the kernel and initrd
 * default to the test guest's (vm-fixtures/build.sh).
 */
import { InvalidArgumentError, Option, type Command } from 'commander';
import type { Accel } from '../../virt/accel.js';
import { bootGuest, describeShutdown, destroyAllGuests, stopDomain, type BootOptions, type RunningGuest } from '../../virt/boot.js';
import { VirtError } from '../../virt/errors.js';
import { loadFixture, type Fixture } from '../../virt/fixture.js';
import { DEFAULT_URI, withConnection } from '../../virt/libvirt.js';
import { parseSerialEvents, parseSha256Events } from '../../virt/serial.js';
import { printResult, type CommonOptions } from '../output.js';

interface VmOptions extends CommonOptions {
  kernel?: string;
  initrd?: string;
  cmdline?: string;
  firmware?: 'bios' | 'efi';
  accel: Accel;
  memory: number;
  vcpus: number;
  timeout: number;
  uri: string;
  name?: string;
  serialLog?: string;
}

function positiveInt(what: string): (value: string) => number {
  return (value) => {
    const n = Number(value);
    if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError(`${what} must be a positive integer`);
    return n;
  };
}

function positiveSeconds(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError('seconds must be a positive number');
  return n;
}

function guestOptions(command: Command): Command {
  return command
    .option('--kernel <file>', "kernel for a direct kernel boot (default: the test guest's)")
    .option('--initrd <file>', "initrd (default: the test guest's, with the default kernel)")
    .option('--cmdline <text>', "kernel command line (default: the test guest's: console=ttyS0 ...)")
    .addOption(new Option('--firmware <kind>', 'boot the disk with firmware instead of a kernel').choices(['bios', 'efi']))
    .addOption(new Option('--accel <mode>', 'kvm, tcg, or auto (kvm only if it runs guests here)').choices(['auto', 'kvm', 'tcg']).default('auto'))
    .option('--memory <MiB>', 'guest memory', positiveInt('--memory'), 256)
    .option('--vcpus <n>', 'virtual CPUs', positiveInt('--vcpus'), 1)
    .option('--timeout <seconds>', 'give up after this long', positiveSeconds, 60)
    .option('--uri <uri>', 'libvirt URI', DEFAULT_URI)
    .option('--name <name>', 'domain name (qlayer- is prepended; random by default)')
    .option('--serial-log <file>', 'where the serial console goes (default: a temp file)')
    .option('--json', 'print the result as JSON');
}

/** Kernel boot settings: the given ones, or the test guest's; none for --firmware. */
function bootSettings(options: VmOptions, extraCmdline: string[]): { boot: Partial<BootOptions>; fixture?: Fixture } {
  if (options.firmware !== undefined) {
    if (options.kernel !== undefined) throw new VirtError('virt.invalid-spec', '--firmware and --kernel exclude each other');
    return { boot: { firmware: options.firmware } };
  }
  let fixture: Fixture | undefined;
  try {
    fixture = loadFixture();
  } catch (error) {
    if (options.kernel === undefined) throw error; // the default kernel is the test guest's
  }
  const kernel = options.kernel ?? fixture?.kernel;
  const initrd = options.initrd ?? (options.kernel === undefined ? fixture?.initrd : undefined);
  const cmdline = [options.cmdline ?? fixture?.cmdline ?? 'console=ttyS0', ...extraCmdline].join(' ');
  return {
    boot: { ...(kernel ? { kernel } : {}), ...(initrd ? { initrd } : {}), cmdline },
    ...(fixture ? { fixture } : {}),
  };
}

function common(image: string, options: VmOptions): BootOptions {
  return {
    disk: image,
    accel: options.accel,
    memoryMiB: options.memory,
    vcpus: options.vcpus,
    timeoutMs: Math.round(options.timeout * 1000),
    uri: options.uri,
    ...(options.name === undefined ? {} : { name: options.name }),
    ...(options.serialLog === undefined ? {} : { serialLog: options.serialLog }),
  };
}

/** Destroy our guests if the user interrupts us: never leave a domain behind. */
function guardSignals(): () => void {
  const handler = (signal: NodeJS.Signals): void => {
    void destroyAllGuests().finally(() => process.exit(signal === 'SIGINT' ? 130 : 143));
  };
  process.once('SIGINT', handler);
  process.once('SIGTERM', handler);
  return () => {
    process.off('SIGINT', handler);
    process.off('SIGTERM', handler);
  };
}

/**
 * Wait for the marker or for the guest to power off, whichever comes first. Returns the marker
 * line, or null when the guest powered off without showing it.
 */
async function markerOrPoweroff(guest: RunningGuest, until: string | RegExp, timeoutMs: number): Promise<string | null> {
  try {
    return await guest.waitFor(until, timeoutMs);
  } catch (error) {
    if (error instanceof VirtError && error.code === 'virt.guest-stopped') return null;
    throw error;
  }
}

export function registerVmCommands(program: Command): void {
  const vm = program.command('vm').description('boot guests through libvirt and watch them (serial console, guest agent)');

  guestOptions(
    vm
      .command('boot')
      .argument('<image>', 'the disk: top of a qcow2 chain (backing formats must be recorded)')
      .description('boot IMAGE; exit 0 once the serial shows --until or the guest powers off, non-zero (with the serial so far) on timeout'),
  )
    .option('--until <text>', "serial marker to wait for (default: the test guest's boot marker)")
    .option('--keep', 'leave the guest running (detached) instead of shutting it down')
    .action(async (image: string, options: VmOptions & { until?: string; keep?: boolean }) => {
      const { boot, fixture } = bootSettings(options, []);
      const until = options.until ?? fixture?.bootMarker ?? 'QLAYER: booted';
      const started = Date.now();
      const release = guardSignals();
      try {
        const guest = await bootGuest({ ...common(image, options), ...boot });
        let line: string | null;
        try {
          line = await markerOrPoweroff(guest, until, Math.max(1, options.timeout * 1000 - (Date.now() - started)));
        } catch (error) {
          await guest.destroy();
          throw error;
        }
        const ms = Date.now() - started;
        const serial = guest.serial;
        let stopped: string;
        if (line === null) {
          stopped = 'powered off';
          await guest.destroy();
        } else if (options.keep) {
          stopped = 'left running';
          await guest.detach();
        } else {
          stopped = (await guest.shutdown({ timeoutMs: 30_000 })).how;
        }
        const result = { name: guest.name, domainType: guest.domainType, matched: line, poweredOff: line === null, ms, stop: stopped, serialLog: guest.serialLog, events: parseSerialEvents(serial), serial };
        printResult(options, result, () =>
          line === null
            ? `${guest.name}: powered off after ${ms} ms without showing ${JSON.stringify(until)}\n${serial.trimEnd()}`
            : `${guest.name}: ${JSON.stringify(line)} after ${ms} ms (${guest.domainType === 'kvm' ? 'KVM' : 'TCG'}); ${stopped === 'left running' ? 'left running' : `stopped (${stopped})`}`,
        );
      } finally {
        release();
      }
    });

  guestOptions(
    vm
      .command('check')
      .argument('<image>', 'the disk: top of a qcow2 chain')
      .description('boot IMAGE, print the sha256 of each --file as the guest reads it, stop the guest'),
  )
    .requiredOption('--file <path...>', 'absolute guest path(s) to hash')
    .addOption(new Option('--via <channel>', 'serial: the test guest hashes at boot (qlayer.sha256=); agent: sha256sum through the guest agent (any guest)').choices(['serial', 'agent']))
    .action(async (image: string, options: VmOptions & { file: string[]; via?: 'serial' | 'agent' }) => {
      for (const path of options.file) {
        if (!path.startsWith('/') || /[\s,]/.test(path)) throw new VirtError('virt.invalid-spec', `--file ${JSON.stringify(path)} must be an absolute guest path without spaces or commas`);
      }
      const via = options.via ?? (options.kernel === undefined && options.firmware === undefined ? 'serial' : 'agent');
      const extra = via === 'serial' ? [`qlayer.sha256=${options.file.join(',')}`, 'qlayer.then=poweroff'] : [];
      const { boot } = bootSettings(options, extra);
      const started = Date.now();
      const release = guardSignals();
      const files: Record<string, string | null> = {};
      let name = '';
      try {
        const guest = await bootGuest({ ...common(image, options), ...boot, ...(via === 'agent' ? { waitForAgent: true } : {}) });
        name = guest.name;
        try {
          if (via === 'serial') {
            await markerOrPoweroff(guest, 'QLAYER: poweroff', options.timeout * 1000 - (Date.now() - started));
            const hashes = parseSha256Events(guest.serial);
            for (const path of options.file) {
              if (!hashes.has(path)) throw new VirtError('virt.agent-error', `the guest reported nothing for ${path}${guest.serialTail()}`);
              files[path] = hashes.get(path) ?? null;
            }
            await guest.destroy();
          } else {
            for (const path of options.file) {
              const test = await guest.agent.exec('/bin/sh', ['-c', 'test -e "$1"', 'sh', path]);
              files[path] = test.exitCode === 0 ? await guest.agent.sha256(path) : null;
            }
            await guest.shutdown({ timeoutMs: 30_000 });
          }
        } finally {
          await guest.destroy();
        }
      } finally {
        release();
      }
      const missing = Object.entries(files).filter(([, sha]) => sha === null).map(([path]) => path);
      printResult(options, { name, files, missing, ms: Date.now() - started }, () =>
        Object.entries(files)
          .map(([path, sha]) => `${sha ?? 'MISSING'.padEnd(64)}  ${path}`)
          .join('\n'),
      );
      if (missing.length > 0) process.exitCode = 1;
    });

  vm.command('list')
    .description("qlayer's domains (named qlayer-...) and who started them")
    .option('--uri <uri>', 'libvirt URI', DEFAULT_URI)
    .option('--json', 'print the result as JSON')
    .action(async (options: CommonOptions & { uri: string }) => {
      const domains = await withConnection(options.uri, (c) => c.listQlayerDomains());
      printResult(options, domains, () =>
        domains.length === 0
          ? 'no qlayer domains'
          : domains.map((d) => `${d.name}\t${d.state}\t${d.persistent ? 'persistent' : 'transient'}\t${d.owner ? `pid ${d.owner.pid}@${d.owner.host} since ${d.owner.started}` : '-'}`).join('\n'),
      );
    });

  vm.command('stop')
    .argument('<name>', 'domain name (qlayer- is prepended if missing)')
    .description('stop a qlayer domain cleanly (agent shutdown; fsfreeze + destroy as the last resort)')
    .option('--timeout <seconds>', 'how long the guest gets to power off', positiveSeconds, 30)
    .option('--uri <uri>', 'libvirt URI', DEFAULT_URI)
    .option('--json', 'print the result as JSON')
    .action(async (name: string, options: CommonOptions & { uri: string; timeout: number }) => {
      const full = name.startsWith('qlayer-') ? name : `qlayer-${name}`;
      const result = await withConnection(options.uri, async (c) => {
        const stopped = await stopDomain(c, full, options.timeout * 1000);
        await c.remove(full);
        return stopped;
      });
      printResult(options, { name: full, ...result }, () =>
        [`${full}: ${describeShutdown(result)}`, ...(result.steps.length > 1 ? result.steps.map((s) => `  ${s.ok ? 'ok' : 'failed'} ${s.how}: ${s.detail}`) : [])].join('\n'),
      );
    });

  vm.command('cleanup')
    .description('remove qlayer domains left by processes that died (with --all: every qlayer domain)')
    .option('--all', 'remove every qlayer- domain, running desktops included')
    .option('--uri <uri>', 'libvirt URI', DEFAULT_URI)
    .option('--json', 'print the result as JSON')
    .action(async (options: CommonOptions & { uri: string; all?: boolean }) => {
      const removed = await withConnection(options.uri, (c) => c.cleanupStale({ all: options.all ?? false }));
      printResult(options, { removed }, () => (removed.length === 0 ? 'nothing to clean up' : `removed ${removed.join(', ')}`));
    });
}
