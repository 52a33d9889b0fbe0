import { isAbsolute } from 'node:path';
import { VirtError } from './errors.js';

/** libvirt's domain type: 'kvm' (hardware virtualization) or 'qemu' (TCG, pure emulation). */
export type DomainType = 'kvm' | 'qemu';

export type ImageFormat = 'qcow2' | 'raw';

/** One image of a backing chain, with its format stated (never probed). */
export interface DiskLayer {
  path: string;
  format: ImageFormat;
}

export interface DiskSpec extends DiskLayer {
  /**
   * The layers below `path`, top-down (its backing file first, the base last).
   * Given: written as explicit nested <backingStore> elements, and QEMU opens exactly this chain
   * (libvirt 9 passes each layer's `backing` to -blockdev, so the header's backing name is not
   * followed). Omitted: libvirt reads the chain from the image headers itself, which requires
   * every layer to record its backing format (libvirt refuses to probe one).
   */
  backingChain?: DiskLayer[];
  /** Guest device name; vda, vdb, ... in order by default. */
  target?: string;
  readOnly?: boolean;
  /** QEMU cache mode; libvirt's default (writeback) when omitted. */
  cache?: 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';
  /**
   * What the guest's discards (fstrim, `discard` mounts) do: 'unmap' passes them to the top image,
   * where qcow2 turns freed clusters into zero clusters and gives their host space back;
   * libvirt's default ('ignore') drops them.
   */
  discard?: 'unmap' | 'ignore';
}

/**
 * Direct kernel boot (the test guest) or firmware boot from the disk (a real desktop image).
 * UEFI (`firmware: 'efi'`): OVMF, chosen by libvirt from the firmware descriptors the ovmf package
 * installs (/usr/share/qemu/firmware), with secure boot off; `nvram` names the domain's own
 * variable store, which libvirt creates from the firmware's template at the first start when it
 * is missing (libvirt's own place, /var/lib/libvirt/qemu/nvram/NAME_VARS.fd, when omitted).
 */
export type BootSpec =
  | { kind: 'kernel'; kernel: string; initrd?: string; cmdline?: string }
  | { kind: 'firmware'; firmware: 'bios' | 'efi'; nvram?: string };

export interface DomainSpec {
  /** Domain name; qlayer's domains start with `qlayer-`. */
  name: string;
  uuid?: string;
  type: DomainType;
  memoryMiB: number;
  vcpus: number;
  boot: BootSpec;
  disks: DiskSpec[];
  /** Host file that receives the first serial port's output (the guest's console). */
  serialLog?: string;
  /** Add the virtio-serial channel org.qemu.guest_agent.0 (default true). */
  guestAgent?: boolean;
  /** Machine type; default 'pc' (i440fx: the fastest to start under TCG), 'q35' for UEFI (what OVMF is built and tested on). */
  machine?: string;
  /** What a guest reboot does; default 'destroy' for kernel boot (a test guest never reboots on purpose), 'restart' for firmware boot. */
  onReboot?: 'destroy' | 'restart';
  /** A libvirt network to attach one virtio NIC to; none by default. */
  network?: string;
  /** Add a VNC display (firmware-booted desktops); none by default. */
  vnc?: boolean;
  /** A graphical display (desktops: config desktop.graphics); none by default. `vnc: true` is the same as 'vnc'. */
  graphics?: 'vnc' | 'spice';
  /** Recorded in <metadata> so that a later run can tell a stale qlayer domain from a live one. */
  owner?: { pid: number; host: string; started: string };
  /** A desktop's domain: which store and desktop it is, in <metadata>, for libvirt's QEMU hook. */
  desktop?: DesktopMetadata;
  /** Keep libvirt from relabelling (chowning) the images: default true, see README. */
  noSecurityLabel?: boolean;
}

/** The XML namespace of qlayer's <metadata> element. */
export const QLAYER_METADATA_NS = 'https://qlayer.invalid/xmlns/domain/1';

/**
 * A desktop domain's own record in <metadata>: its store (root folder and id) and desktop name.
 * libvirt's QEMU hook gets only the domain's XML, and must not call libvirt, so this is how it
 * finds the store and the desktop (and tells a qlayer desktop from any other domain). Its own
 * namespace: libvirt keeps one metadata element per namespace.
 */
export const QLAYER_DESKTOP_NS = 'https://qlayer.invalid/xmlns/desktop/1';

export interface DesktopMetadata {
  /** The store's root folder (absolute). */
  store: string;
  storeId?: string;
  name: string;
}

/** The metadata element for a desktop (one line, libvirt's own quoting style does not matter). */
export function desktopMetadataElement(meta: DesktopMetadata): string {
  const id = meta.storeId === undefined ? '' : ` store-id='${xmlEscape(meta.storeId)}'`;
  return `<qlayer:desktop xmlns:qlayer='${QLAYER_DESKTOP_NS}' store='${xmlEscape(meta.store)}'${id} name='${xmlEscape(meta.name)}'/>`;
}

/** The desktop recorded in a domain's XML (as libvirt formats it, or as qlayer wrote it); undefined when absent or incomplete. */
export function parseDesktopMetadata(xml: string): DesktopMetadata | undefined {
  const metadata = /<metadata>([\s\S]*?)<\/metadata>/.exec(xml)?.[1];
  if (metadata === undefined) return undefined;
  for (const element of metadata.matchAll(/<(?:[\w.-]+:)?desktop\b[^>]*>/g)) {
    const text = element[0];
    if (!/\bxmlns(?::[\w.-]+)?=(['"])https:\/\/qlayer\.invalid\/xmlns\/desktop\/1\1/.test(text)) continue;
    const attr = (name: string): string | undefined => {
      const value = new RegExp(`\\s${name}=(['"])(.*?)\\1`).exec(text)?.[2];
      return value === undefined ? undefined : unescapeXml(value);
    };
    const store = attr('store');
    const name = attr('name');
    const storeId = attr('store-id');
    if (store === undefined || name === undefined || !store.startsWith('/')) return undefined;
    return { store, name, ...(storeId === undefined ? {} : { storeId }) };
  }
  return undefined;
}

const unescapeXml = (s: string): string => s.replace(/&(amp|lt|gt|quot|apos);/g, (_, e: string) => ({ amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" })[e] ?? _);

export const DOMAIN_NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9_.+-]{0,62}$/;

/** Escape for XML text and attribute values (both quote styles). */
export function xmlEscape(value: string): string {
  return value.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&apos;' })[c] ?? c);
}

function invalid(field: string, message: string): never {
  throw new VirtError('virt.invalid-spec', `domain spec ${field}: ${message}`);
}

function checkPath(field: string, path: string): void {
  if (!isAbsolute(path)) invalid(field, `${JSON.stringify(path)} must be an absolute path (libvirt resolves nothing relative)`);
  // libvirt stores paths in XML; a NUL or newline cannot be represented faithfully.
  if (/[\0\n\r]/.test(path)) invalid(field, 'contains a NUL or line break');
}

function checkSpec(spec: DomainSpec): void {
  if (!DOMAIN_NAME_PATTERN.test(spec.name)) invalid('name', `${JSON.stringify(spec.name)} must match ${DOMAIN_NAME_PATTERN}`);
  if (spec.uuid !== undefined && !/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(spec.uuid)) invalid('uuid', `${spec.uuid} is not a UUID`);
  if (!Number.isInteger(spec.memoryMiB) || spec.memoryMiB < 16 || spec.memoryMiB > 4 * 1024 * 1024) invalid('memoryMiB', `${spec.memoryMiB} is not an integer in 16..4194304`);
  if (!Number.isInteger(spec.vcpus) || spec.vcpus < 1 || spec.vcpus > 256) invalid('vcpus', `${spec.vcpus} is not an integer in 1..256`);
  if (spec.type !== 'kvm' && spec.type !== 'qemu') invalid('type', `${String(spec.type)} is neither kvm nor qemu`);
  if (spec.disks.length === 0 && spec.boot.kind === 'firmware') invalid('disks', 'a firmware boot needs a disk to boot from');
  if (spec.boot.kind === 'kernel') {
    checkPath('boot.kernel', spec.boot.kernel);
    if (spec.boot.initrd !== undefined) checkPath('boot.initrd', spec.boot.initrd);
  } else if (spec.boot.nvram !== undefined) {
    if (spec.boot.firmware !== 'efi') invalid('boot.nvram', 'only a UEFI boot (firmware efi) has an NVRAM file');
    checkPath('boot.nvram', spec.boot.nvram);
  }
  const targets = new Set<string>();
  spec.disks.forEach((disk, i) => {
    checkPath(`disks[${i}].path`, disk.path);
    if (disk.format !== 'qcow2' && disk.format !== 'raw') invalid(`disks[${i}].format`, `${String(disk.format)} is neither qcow2 nor raw`);
    disk.backingChain?.forEach((layer, j) => {
      checkPath(`disks[${i}].backingChain[${j}].path`, layer.path);
      if (layer.format !== 'qcow2' && layer.format !== 'raw') invalid(`disks[${i}].backingChain[${j}].format`, `${String(layer.format)} is neither qcow2 nor raw`);
      if (layer.format === 'raw' && j < (disk.backingChain?.length ?? 0) - 1) invalid(`disks[${i}].backingChain[${j}]`, 'a raw image cannot have a backing file');
    });
    if (disk.format === 'raw' && (disk.backingChain?.length ?? 0) > 0) invalid(`disks[${i}]`, 'a raw image cannot have a backing file');
    const target = disk.target ?? `vd${String.fromCharCode(97 + i)}`;
    if (!/^vd[a-z]{1,2}$/.test(target)) invalid(`disks[${i}].target`, `${target} is not a virtio disk name (vda, vdb, ...)`);
    if (targets.has(target)) invalid(`disks[${i}].target`, `${target} is used twice`);
    targets.add(target);
  });
  if (spec.serialLog !== undefined) checkPath('serialLog', spec.serialLog);
}

function backingStoreXml(chain: DiskLayer[], indent: string): string {
  const [layer, ...rest] = chain;
  if (layer === undefined) return `${indent}<backingStore/>`; // the end of the chain: nothing below
  return [
    `${indent}<backingStore type='file'>`,
    `${indent}  <format type='${layer.format}'/>`,
    `${indent}  <source file='${xmlEscape(layer.path)}'/>`,
    backingStoreXml(rest, `${indent}  `),
    `${indent}</backingStore>`,
  ].join('\n');
}

function diskXml(disk: DiskSpec, index: number): string {
  const target = disk.target ?? `vd${String.fromCharCode(97 + index)}`;
  const driver = [`name='qemu'`, `type='${disk.format}'`];
  if (disk.cache !== undefined) driver.push(`cache='${disk.cache}'`);
  if (disk.discard !== undefined) driver.push(`discard='${disk.discard}'`);
  const lines = [
    `    <disk type='file' device='disk'>`,
    `      <driver ${driver.join(' ')}/>`,
    `      <source file='${xmlEscape(disk.path)}'/>`,
  ];
  if (disk.backingChain !== undefined) lines.push(backingStoreXml(disk.backingChain, '      '));
  lines.push(`      <target dev='${target}' bus='virtio'/>`);
  if (disk.readOnly) lines.push('      <readonly/>');
  lines.push('    </disk>');
  return lines.join('\n');
}

/**
 * The libvirt domain XML for a spec. The output passes `virt-xml-validate` (tested). Choices:
 * - <acpi/>: without it the guest cannot power itself off (poweroff -f only halts).
 * - on_poweroff/on_crash destroy: a transient domain then disappears when the guest stops, which
 *   is how callers see "shut off"; a panicking test guest (panic=-1) stops instead of looping.
 * - no USB controller, balloon or video: nothing the guest needs, each costs start-up time under TCG.
 * - <seclabel type='none'/>: libvirt neither chowns the images (a shared base must keep its owner
 *   and mode) nor confines QEMU; the images must then be accessible to qemu.conf's user.
 */
export function buildDomainXml(spec: DomainSpec): string {
  checkSpec(spec);
  const lines: string[] = [`<domain type='${spec.type}'>`, `  <name>${xmlEscape(spec.name)}</name>`];
  if (spec.uuid !== undefined) lines.push(`  <uuid>${spec.uuid}</uuid>`);
  if (spec.owner !== undefined || spec.desktop !== undefined) {
    lines.push('  <metadata>');
    if (spec.owner !== undefined) {
      lines.push(`    <qlayer:owner xmlns:qlayer='${QLAYER_METADATA_NS}' pid='${spec.owner.pid}' host='${xmlEscape(spec.owner.host)}' started='${xmlEscape(spec.owner.started)}'/>`);
    }
    if (spec.desktop !== undefined) lines.push(`    ${desktopMetadataElement(spec.desktop)}`);
    lines.push('  </metadata>');
  }
  lines.push(`  <memory unit='MiB'>${spec.memoryMiB}</memory>`, `  <vcpu>${spec.vcpus}</vcpu>`);

  const machine = spec.machine ?? (spec.boot.kind === 'firmware' && spec.boot.firmware === 'efi' ? 'q35' : 'pc');
  if (spec.boot.kind === 'kernel') {
    lines.push('  <os>', `    <type arch='x86_64' machine='${xmlEscape(machine)}'>hvm</type>`);
    lines.push(`    <kernel>${xmlEscape(spec.boot.kernel)}</kernel>`);
    if (spec.boot.initrd !== undefined) lines.push(`    <initrd>${xmlEscape(spec.boot.initrd)}</initrd>`);
    if (spec.boot.cmdline !== undefined) lines.push(`    <cmdline>${xmlEscape(spec.boot.cmdline)}</cmdline>`);
    lines.push('  </os>');
  } else {
    // libvirt 9 picks the firmware image from the installed descriptors (OVMF for efi), so no
    // distribution's file names are written here. Secure boot off: the guest's grub is unsigned,
    // and the secure-boot builds need SMM, which is slow under TCG.
    lines.push(spec.boot.firmware === 'efi' ? `  <os firmware='efi'>` : '  <os>');
    lines.push(`    <type arch='x86_64' machine='${xmlEscape(machine)}'>hvm</type>`);
    if (spec.boot.firmware === 'efi') {
      lines.push('    <firmware>', `      <feature enabled='no' name='secure-boot'/>`, `      <feature enabled='no' name='enrolled-keys'/>`, '    </firmware>');
      if (spec.boot.nvram !== undefined) lines.push(`    <nvram>${xmlEscape(spec.boot.nvram)}</nvram>`);
    }
    lines.push(`    <boot dev='hd'/>`);
    // SeaBIOS prints to the serial port too, so a desktop that never reaches its bootloader says why.
    if (spec.boot.firmware === 'bios' && spec.serialLog !== undefined) lines.push(`    <bios useserial='yes'/>`);
    lines.push('  </os>');
  }
  lines.push('  <features>', '    <acpi/>', '    <apic/>', '  </features>');
  // Under KVM give the guest the host's CPU; under TCG QEMU's default model is the fast one.
  if (spec.type === 'kvm') lines.push(`  <cpu mode='host-passthrough'/>`);
  lines.push(`  <clock offset='utc'/>`);
  const onReboot = spec.onReboot ?? (spec.boot.kind === 'kernel' ? 'destroy' : 'restart');
  lines.push('  <on_poweroff>destroy</on_poweroff>', `  <on_reboot>${onReboot}</on_reboot>`, '  <on_crash>destroy</on_crash>');

  lines.push('  <devices>');
  spec.disks.forEach((disk, i) => lines.push(diskXml(disk, i)));
  lines.push(`    <controller type='usb' model='none'/>`);
  if (spec.serialLog !== undefined) {
    lines.push(
      `    <serial type='file'>`,
      `      <source path='${xmlEscape(spec.serialLog)}' append='off'/>`,
      `      <target port='0'/>`,
      '    </serial>',
    );
  }
  if (spec.guestAgent ?? true) {
    // libvirt adds the virtio-serial controller and owns the socket; we reach the agent through it.
    lines.push(`    <channel type='unix'>`, `      <target type='virtio' name='org.qemu.guest_agent.0'/>`, '    </channel>');
  }
  if (spec.network !== undefined) {
    lines.push(`    <interface type='network'>`, `      <source network='${xmlEscape(spec.network)}'/>`, `      <model type='virtio'/>`, '    </interface>');
  }
  const graphics = spec.graphics ?? (spec.vnc ? 'vnc' : undefined);
  // Local-only listening: a desktop's screen is reached through virt-manager or an SSH tunnel.
  if (graphics !== undefined) lines.push(`    <graphics type='${graphics}' autoport='yes' listen='127.0.0.1'/>`, '    <video>', `      <model type='virtio'/>`, '    </video>');
  lines.push(`    <memballoon model='none'/>`, '  </devices>');
  if (spec.noSecurityLabel ?? true) lines.push(`  <seclabel type='none'/>`);
  lines.push('</domain>');
  return `${lines.join('\n')}\n`;
}

/** Whether a domain boots through UEFI: `<os firmware='efi'>`, or a pflash `<loader>` (OVMF named by hand). */
export function bootsUefi(xml: string): boolean {
  const os = /<os\b([^>]*)>([\s\S]*?)<\/os>/.exec(xml);
  if (os === null) return false;
  return /\bfirmware=['"]efi['"]/.test(os[1]!) || /<loader\b[^>]*\btype=['"]pflash['"]/.test(os[2]!);
}

/** The NVRAM file a domain's XML names (undefined when it names none). */
export function nvramPath(xml: string): string | undefined {
  const file = /<nvram\b[^>]*>([^<]+)<\/nvram>/.exec(xml)?.[1]?.trim();
  return file === undefined ? undefined : file.replace(/&(amp|lt|gt|quot|apos);/g, (_, e: string) => ({ amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" })[e] ?? _);
}

/**
 * The domain XML with its NVRAM file at `path`: an existing <nvram> element's file is replaced
 * (its template attribute kept), or one is added to a UEFI domain's <os>. A domain that does not
 * boot through UEFI is returned unchanged.
 */
export function withNvram(xml: string, path: string): string {
  if (!bootsUefi(xml)) return xml;
  const element = `<nvram>${xmlEscape(path)}</nvram>`;
  const existing = /<nvram\b([^>]*?)(\/>|>[\s\S]*?<\/nvram>)/.exec(xml);
  if (existing !== null) return xml.slice(0, existing.index) + `<nvram${existing[1]!.replace(/\s+$/, '')}>${xmlEscape(path)}</nvram>` + xml.slice(existing.index + existing[0].length);
  return xml.replace(/([ \t]*)<\/os>/, (_, indent: string) => `${indent}  ${element}\n${indent}</os>`);
}

/** Read the owner recorded by buildDomainXml back out of a domain's XML (undefined when absent). */
export function parseOwner(xml: string): { pid: number; host: string; started: string } | undefined {
  const element = /<(?:\w+:)?owner\b[^>]*xmlns(?::\w+)?=['"]https:\/\/qlayer\.invalid\/xmlns\/domain\/1['"][^>]*>/.exec(xml)?.[0];
  if (element === undefined) return undefined;
  const attr = (name: string): string | undefined => new RegExp(`\\b${name}=['"]([^'"]*)['"]`).exec(element)?.[1];
  const pid = Number(attr('pid'));
  const host = attr('host');
  const started = attr('started');
  if (!Number.isInteger(pid) || host === undefined || started === undefined) return undefined;
  const unescape = (s: string): string => s.replace(/&(amp|lt|gt|quot|apos);/g, (_, e: string) => ({ amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" })[e] ?? _);
  return { pid, host: unescape(host), started: unescape(started) };
}

/**
 * Whether a domain's XML has the guest-agent channel. Without it no agent can answer, so a stop
 * goes straight to ACPI. (The target's live state='connected|disconnected' attribute is not used:
 * libvirt 9 here still showed 'disconnected' while the fixture's agent answered pings.)
 */
export function hasAgentChannel(xml: string): boolean {
  return /<target\b[^>]*\bname=['"]org\.qemu\.guest_agent\.0['"]/.test(xml);
}

/**
 * The image each disk of a domain opens (its top <source file>, not its <backingStore>s), from
 * live XML (libvirt adds attributes such as index='1'); device='disk' only, in order.
 */
export function diskSources(xml: string): string[] {
  const unescape = (s: string): string => s.replace(/&(amp|lt|gt|quot|apos);/g, (_, e: string) => ({ amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" })[e] ?? _);
  const sources: string[] = [];
  for (const disk of xml.matchAll(/<disk\b([^>]*)>([\s\S]*?)<\/disk>/g)) {
    if (!/\bdevice=['"]disk['"]/.test(disk[1]!)) continue;
    // Backing stores nest <source> elements of their own: look only outside them.
    const own = disk[2]!.replace(/<backingStore\b[\s\S]*<\/backingStore>/g, '');
    const file = /<source\b[^>]*\bfile=(['"])(.*?)\1/.exec(own)?.[2];
    if (file !== undefined) sources.push(unescape(file));
  }
  return sources;
}

/**
 * The domain XML with the desktop's home disk (issue 13) among its disks: unchanged when a disk
 * opens `path` already; otherwise a virtio disk (qcow2, no backing file, not relabelled) is
 * inserted after the first disk, on the first free vdX name. The first disk stays the system
 * chain (ownDomain and diskSources look at it).
 */
export function withHomeDisk(xml: string, path: string): string {
  checkPath('home disk', path);
  const disks = [...xml.matchAll(/<disk\b([^>]*)>([\s\S]*?)<\/disk>/g)].filter((m) => /\bdevice=['"]disk['"]/.test(m[1]!));
  if (diskSources(xml).includes(path)) return xml;
  const first = disks[0];
  if (first === undefined) throw new VirtError('virt.invalid-spec', 'the domain has no system disk to put the home disk beside');
  const used = new Set([...xml.matchAll(/<target\b[^>]*\bdev=['"]([^'"]+)['"]/g)].map((m) => m[1]!));
  let target = 'vdb';
  for (let i = 1; used.has(target); i++) target = `vd${String.fromCharCode(97 + i)}`;
  const element = [
    `<disk type='file' device='disk'>`,
    `      <driver name='qemu' type='qcow2'/>`,
    `      <source file='${xmlEscape(path)}'>`,
    `        <seclabel model='dac' relabel='no'/>`,
    `      </source>`,
    `      <backingStore/>`,
    `      <target dev='${target}' bus='virtio'/>`,
    '    </disk>',
  ].join('\n');
  const end = first.index + first[0].length;
  return `${xml.slice(0, end)}\n    ${element}${xml.slice(end)}`;
}
