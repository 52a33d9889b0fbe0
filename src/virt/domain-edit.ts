/**
 * Edits of domain XML that libvirt (or an administrator) wrote: a desktop's persistent
 * definition belongs to the administrator once it exists (memory, NICs, graphics, channels,
 * metadata), so qlayer changes only the one thing it owns, the first disk's image chain, and
 * leaves every other byte of the document as it was.
 *
 * No XML library: libvirt formats its XML canonically (one element per line, attributes in
 * quotes, no CDATA in <devices>), and these edits are textual replacements inside one <disk>
 * element, which keeps whatever qlayer does not understand untouched by construction.
 */
import { VirtError } from './errors.js';
import { desktopMetadataElement, xmlEscape, type DesktopMetadata, type DiskLayer } from './domain-xml.js';

const unescape = (s: string): string => s.replace(/&(amp|lt|gt|quot|apos);/g, (_, e: string) => ({ amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" })[e] ?? _);

/** One <disk device='disk'> element of a domain's XML, with where it sits. */
interface DiskElement {
  start: number;
  end: number;
  text: string;
  type: string | undefined;
  /** The image the disk opens (its own <source file>), when type is file. */
  file: string | undefined;
  /** The <driver type>: qcow2, raw, ... */
  format: string | undefined;
}

/** The device='disk' disks (cdroms and floppies skipped), in document order. */
function diskElements(xml: string): DiskElement[] {
  const disks: DiskElement[] = [];
  for (const match of xml.matchAll(/<disk\b([^>]*)>([\s\S]*?)<\/disk>/g)) {
    const attrs = match[1]!;
    if (!/\bdevice=['"]disk['"]/.test(attrs)) continue;
    const own = withoutBackingStores(match[2]!);
    const file = /<source\b[^>]*\bfile=(['"])(.*?)\1/.exec(own)?.[2];
    const format = /<driver\b[^>]*\btype=(['"])(.*?)\1/.exec(own)?.[2];
    disks.push({
      start: match.index,
      end: match.index + match[0].length,
      text: match[0],
      type: /\btype=(['"])(.*?)\1/.exec(attrs)?.[2],
      file: file === undefined ? undefined : unescape(file),
      format,
    });
  }
  return disks;
}

/** A disk's content without its (nested) <backingStore> elements, self-closing or not. */
function withoutBackingStores(content: string): string {
  return content.replace(/[ \t]*<backingStore\b[\s\S]*<\/backingStore>[ \t]*\n?/g, '').replace(/[ \t]*<backingStore\s*\/>[ \t]*\n?/g, '');
}

export interface FirstDisk {
  /** libvirt's disk type: file, block, network, volume, ... */
  type: string | undefined;
  /** The image it opens, when the disk is a file. */
  file: string | undefined;
  /** The driver's format (qcow2, raw, ...), when stated. */
  format: string | undefined;
}

/** The first disk (device='disk') of a domain, or undefined when it has none. */
export function firstDisk(xml: string): FirstDisk | undefined {
  const disk = diskElements(xml)[0];
  return disk === undefined ? undefined : { type: disk.type, file: disk.file, format: disk.format };
}

/**
 * A <source> that libvirt must not relabel (chown): the store's images keep their owner and
 * mode, and a base shared by many desktops must never change hands when one of them starts.
 * Per source, so that the rest of an administrator's domain keeps its own security settings.
 */
function sourceXml(path: string, indent: string): string {
  return [`${indent}<source file='${xmlEscape(path)}'>`, `${indent}  <seclabel model='dac' relabel='no'/>`, `${indent}</source>`].join('\n');
}

function backingStoreXml(chain: DiskLayer[], indent: string): string {
  const [layer, ...rest] = chain;
  if (layer === undefined) return `${indent}<backingStore/>`;
  return [
    `${indent}<backingStore type='file'>`,
    `${indent}  <format type='${layer.format}'/>`,
    sourceXml(layer.path, `${indent}  `),
    backingStoreXml(rest, `${indent}  `),
    `${indent}</backingStore>`,
  ].join('\n');
}

/**
 * The disk element rewritten onto `chain` (top first): type='file', the driver's format, the
 * top image as <source>, the rest as explicit nested <backingStore>s. The target, bus, address,
 * cache mode, boot order and everything else inside the element stay.
 */
function rewriteDisk(text: string, chain: DiskLayer[]): string {
  const [top, ...below] = chain;
  if (top === undefined) throw new VirtError('virt.invalid-spec', 'a disk chain needs at least one image');
  const indent = /\n([ \t]*)<(?:source|target|driver)\b/.exec(text)?.[1] ?? '      ';
  let disk = text.replace(/^<disk\b[^>]*>/, (open) => (/\btype=/.test(open) ? open.replace(/\btype=(['"])[^'"]*\1/, "type='file'") : open.replace('<disk', "<disk type='file'")));
  // The element's content between its open and close tags: edits stay inside it.
  const open = /^<disk\b[^>]*>/.exec(disk)![0];
  let content = withoutBackingStores(disk.slice(open.length, disk.length - '</disk>'.length));
  const source = `${sourceXml(top.path, indent)}\n${backingStoreXml(below, indent)}\n`;
  // The top's own <source> (self-closing, or with children such as <seclabel>): replaced whole.
  const sourcePattern = /[ \t]*<source\b[^>]*\/>[ \t]*\n?|[ \t]*<source\b[^>]*>[\s\S]*?<\/source>[ \t]*\n?/;
  if (sourcePattern.test(content)) content = content.replace(sourcePattern, source);
  else content = content.replace(/([ \t]*<target\b)/, `${source}$1`);
  if (/<driver\b/.test(content)) {
    content = content.replace(/<driver\b[^>]*?(\/?)>/, (driver, selfClose: string) =>
      /\btype=/.test(driver) ? driver.replace(/\btype=(['"])[^'"]*\1/, `type='${top.format}'`) : driver.replace(/\s*\/?>$/, ` type='${top.format}'${selfClose}>`),
    );
  } else {
    content = content.replace(/^\n?/, `\n${indent}<driver name='qemu' type='${top.format}'/>\n`);
  }
  disk = `${open}${content}</disk>`;
  return disk;
}

/**
 * The domain XML with its first disk (device='disk') opening `chain` instead of what it
 * opened; everything else unchanged. Throws when the domain has no such disk.
 */
export function replaceFirstDiskChain(xml: string, chain: DiskLayer[]): string {
  const disk = diskElements(xml)[0];
  if (disk === undefined) throw new VirtError('virt.invalid-spec', 'the domain has no disk (device=disk) to put the desktop chain on');
  return xml.slice(0, disk.start) + rewriteDisk(disk.text, chain) + xml.slice(disk.end);
}

/**
 * Another domain's XML made into a new domain's: the name given, no uuid (libvirt makes one),
 * every disk (device='disk') dropped and one on `chain` put where the first was (vda on
 * virtio unless the template's first disk says otherwise), no MAC addresses (libvirt makes
 * new ones: two guests with one MAC break the network), no NVRAM file (the new domain gets its
 * own from the template's firmware), no live-only state (<seclabel> labels, ids).
 */
export function domainFromTemplate(template: string, name: string, chain: DiskLayer[]): string {
  if (!/<domain\b/.test(template)) throw new VirtError('virt.invalid-spec', 'the template is not a libvirt domain document (no <domain> element)');
  let xml = template.replace(/<\?xml[^>]*\?>\s*/, '');
  xml = xml.replace(/(<domain\b[^>]*?)\s+id=(['"])[^'"]*\2/, '$1');
  if (/<name>[\s\S]*?<\/name>/.test(xml)) xml = xml.replace(/<name>[\s\S]*?<\/name>/, `<name>${xmlEscape(name)}</name>`);
  else xml = xml.replace(/(<domain\b[^>]*>)/, `$1\n  <name>${xmlEscape(name)}</name>`);
  xml = xml.replace(/[ \t]*<uuid>[\s\S]*?<\/uuid>[ \t]*\n?/, '');
  xml = xml.replace(/[ \t]*<mac\b[^>]*\/>[ \t]*\n?/g, '');
  xml = xml.replace(/[ \t]*<nvram\b[^>]*\/>[ \t]*\n?|[ \t]*<nvram\b[^>]*>[\s\S]*?<\/nvram>[ \t]*\n?/g, '');
  const disks = diskElements(xml);
  if (disks.length === 0) {
    // No disk to take the place of: a plain virtio disk at the head of <devices>.
    const disk = [`<disk type='file' device='disk'>`, `      <driver name='qemu' type='${chain[0]?.format ?? 'qcow2'}'/>`, `      <source file='x'/>`, `      <target dev='vda' bus='virtio'/>`, '    </disk>'].join('\n');
    if (!/<devices>/.test(xml)) throw new VirtError('virt.invalid-spec', 'the template has no <devices> element to add the desktop disk to');
    return xml.replace(/<devices>\n?/, `<devices>\n    ${rewriteDisk(disk, chain)}\n`);
  }
  // Back to front, so earlier offsets stay valid; the first disk is rewritten, the others go.
  for (const disk of disks.slice(1).reverse()) {
    const lineStart = xml.lastIndexOf('\n', disk.start) + 1;
    const removeFrom = /^[ \t]*$/.test(xml.slice(lineStart, disk.start)) ? lineStart : disk.start;
    const removeTo = xml[disk.end] === '\n' ? disk.end + 1 : disk.end;
    xml = xml.slice(0, removeFrom) + xml.slice(removeTo);
  }
  const first = disks[0]!;
  // The first disk's own address/boot order stay, its source does not.
  return xml.slice(0, first.start) + rewriteDisk(first.text, chain) + xml.slice(first.end);
}

/** The domain's <name>. */
export function domainNameOf(xml: string): string | undefined {
  const name = /<name>([\s\S]*?)<\/name>/.exec(xml)?.[1];
  return name === undefined ? undefined : unescape(name.trim());
}

/**
 * The domain XML with qlayer's desktop element in <metadata> (replacing an older one of the
 * same namespace; every other metadata element, an administrator's or another tool's, stays).
 */
export function setDesktopMetadata(xml: string, meta: DesktopMetadata): string {
  const element = desktopMetadataElement(meta);
  const ours = /[ \t]*<([\w.-]+:)?desktop\b[^>]*\bxmlns(?::[\w.-]+)?=(['"])https:\/\/qlayer\.invalid\/xmlns\/desktop\/1\2[^>]*?(?:\/>|>[\s\S]*?<\/\1?desktop>)[ \t]*\n?/;
  const metadata = /<metadata>([\s\S]*?)<\/metadata>/.exec(xml);
  if (metadata) {
    const inner = metadata[1]!;
    const updated = ours.test(inner) ? inner.replace(ours, `    ${element}\n`) : `${inner.replace(/\s*$/, '')}\n    ${element}\n  `;
    return xml.slice(0, metadata.index) + `<metadata>${updated}</metadata>` + xml.slice(metadata.index + metadata[0].length);
  }
  const anchor = /<\/uuid>|<\/name>/.exec(xml);
  if (!anchor) throw new VirtError('virt.invalid-spec', 'the domain has no <name> to put qlayer\'s metadata after');
  const at = anchor.index + anchor[0].length;
  return `${xml.slice(0, at)}\n  <metadata>\n    ${element}\n  </metadata>${xml.slice(at)}`;
}
