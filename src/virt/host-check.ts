import { accessSync, constants, existsSync, readFileSync, statSync } from 'node:fs';
import { loadExeca } from '../io/external-program.js';
import { kvmStatus, type KvmProbe } from './accel.js';
import { messageOf } from './errors.js';
import { DEFAULT_URI, LibvirtConnection } from './libvirt.js';

export interface HostCheckItem {
  name: string;
  ok: boolean;
  /** What was found. */
  detail: string;
  /** What to do about it, when not ok. */
  fix?: string;
  /** A failing check that only limits speed (KVM), not whether qlayer works. */
  optional?: boolean;
}

export interface HostCheckReport {
  /** Every required check passed. */
  ok: boolean;
  uri: string;
  checks: HostCheckItem[];
}

export interface HostCheckOptions {
  uri?: string;
  /** Images QEMU must open: checked for existence and access by qemu.conf's user. */
  images?: string[];
  /** Also boot a probe guest under KVM (bounded) to see whether KVM really runs guests. */
  kvmProbe?: KvmProbe;
}

async function which(tool: string): Promise<string | undefined> {
  const { execa } = await loadExeca();
  const result = await execa('sh', ['-c', `command -v ${tool}`], { reject: false });
  return result.exitCode === 0 ? result.stdout.trim() : undefined;
}

/** user/group QEMU runs as, from /etc/libvirt/qemu.conf (Debian's default: libvirt-qemu/libvirt-qemu). */
export function qemuConfUser(path = '/etc/libvirt/qemu.conf'): { user: string; group: string; dynamicOwnership: boolean } {
  let text = '';
  try {
    text = readFileSync(path, 'utf8');
  } catch {
    // Not readable: libvirt's defaults.
  }
  const value = (key: string): string | undefined => {
    let found: string | undefined;
    for (const m of text.matchAll(new RegExp(`^\\s*${key}\\s*=\\s*"?([^"\\n#]*)"?`, 'gm'))) found = m[1]?.trim();
    return found;
  };
  return { user: value('user') ?? 'libvirt-qemu', group: value('group') ?? 'libvirt-qemu', dynamicOwnership: value('dynamic_ownership') !== '0' };
}

function idOf(name: string, file: '/etc/passwd' | '/etc/group'): number | undefined {
  if (/^\+?\d+$/.test(name)) return Number(name.replace('+', ''));
  try {
    for (const line of readFileSync(file, 'utf8').split('\n')) {
      const fields = line.split(':');
      if (fields[0] === name) return Number(fields[2]);
    }
  } catch {
    // fall through
  }
  return undefined;
}

/**
 * Can `user:group` open `path` for read (and write when `write`)? By mode bits along the file
 * itself (not parent folders' search bits; those are checked as r-x for "other" below).
 */
export function accessibleBy(path: string, uid: number, gid: number, write: boolean): boolean {
  if (uid === 0) return true;
  const st = statSync(path);
  const need = write ? 0o6 : 0o4;
  let bits: number;
  if (st.uid === uid) bits = (st.mode >> 6) & 7;
  else if (st.gid === gid) bits = (st.mode >> 3) & 7;
  else bits = st.mode & 7;
  return (bits & need) === need;
}

/**
 * Say exactly what this host lacks to run qlayer's guests: libvirt reachable, the tools present,
 * /dev/kvm usable (optional: TCG works without it, slowly), images accessible to QEMU's user.
 */
export async function checkHost(options: HostCheckOptions = {}): Promise<HostCheckReport> {
  const uri = options.uri ?? DEFAULT_URI;
  const checks: HostCheckItem[] = [];

  for (const tool of ['qemu-system-x86_64', 'qemu-img', 'virsh']) {
    const path = await which(tool);
    const pkg = tool === 'virsh' ? 'libvirt-clients' : tool === 'qemu-img' ? 'qemu-utils' : 'qemu-system-x86';
    checks.push(path ? { name: tool, ok: true, detail: path } : { name: tool, ok: false, detail: `${tool} is not installed`, fix: `apt-get install ${pkg} (scripts/setup-host.sh)` });
  }

  const { execa } = await loadExeca();
  const daemons = await execa('ps', ['-eo', 'comm'], { reject: false });
  const running = new Set(daemons.stdout.split('\n').map((l) => l.trim()));
  for (const daemon of ['libvirtd', 'virtlogd']) {
    // A remote URI needs no local daemon; say what we see anyway.
    checks.push(
      running.has(daemon)
        ? { name: daemon, ok: true, detail: 'running' }
        : { name: daemon, ok: !uri.includes(':///'), detail: `${daemon} is not running`, fix: `start it: ${daemon} -d (scripts/setup-host.sh does)` },
    );
  }

  let libvirtOk = false;
  try {
    const connection = await LibvirtConnection.open(uri, 10_000);
    await connection.close();
    libvirtOk = true;
    checks.push({ name: 'libvirt connection', ok: true, detail: `connected to ${uri}` });
  } catch (error) {
    checks.push({ name: 'libvirt connection', ok: false, detail: messageOf(error), fix: 'start libvirtd (scripts/setup-host.sh), or pass the right --uri' });
  }

  const kvm = kvmStatus();
  checks.push({
    name: 'kvm',
    ok: kvm.present && kvm.accessible && !kvm.pvm,
    optional: true,
    detail: kvm.detail,
    ...(kvm.present && kvm.accessible && !kvm.pvm ? {} : { fix: "guests run under TCG (accel: 'tcg'), about 10x slower; enable VT-x/AMD-V and load kvm_intel/kvm_amd for KVM" }),
  });
  if (options.kvmProbe !== undefined && kvm.present && kvm.accessible && libvirtOk) {
    const probe = await options.kvmProbe();
    checks.push({ name: 'kvm boot probe', ok: probe.works, optional: true, detail: probe.detail, ...(probe.works ? {} : { fix: "use accel: 'tcg'" }) });
  }

  const conf = qemuConfUser();
  const uid = idOf(conf.user, '/etc/passwd');
  const gid = idOf(conf.group, '/etc/group');
  for (const image of options.images ?? []) {
    if (!existsSync(image)) {
      checks.push({ name: `image ${image}`, ok: false, detail: 'does not exist' });
      continue;
    }
    try {
      accessSync(image, constants.R_OK);
    } catch {
      checks.push({ name: `image ${image}`, ok: false, detail: 'not readable by this user', fix: 'fix its owner or mode' });
      continue;
    }
    if (uid === undefined || gid === undefined) {
      checks.push({ name: `image ${image}`, ok: false, detail: `QEMU's user ${conf.user}:${conf.group} (qemu.conf) does not exist here`, fix: 'install libvirt-daemon-system or fix qemu.conf' });
      continue;
    }
    // qlayer's domains carry <seclabel type='none'/>: libvirt does not chown, so QEMU's user needs access itself.
    const ok = accessibleBy(image, uid, gid, true) || accessibleBy(image, uid, gid, false);
    checks.push({
      name: `image ${image}`,
      ok,
      detail: ok ? `accessible to QEMU's user ${conf.user}:${conf.group}` : `QEMU runs as ${conf.user}:${conf.group} and cannot read it`,
      ...(ok ? {} : { fix: `chgrp ${conf.group} and chmod g+r (g+rw for a user delta), or set user/group in /etc/libvirt/qemu.conf` }),
    });
  }

  return { ok: checks.every((c) => c.ok || c.optional === true), uri, checks };
}
