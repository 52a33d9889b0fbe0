/**
 * The domain XML builder: every shape it produces passes libvirt's own schema check
 * (virt-xml-validate), libvirt accepts it (define in a real libvirtd, then undefine), and bad
 * specs are refused with the offending field named.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildDomainXml, diskSources, hasAgentChannel, parseOwner, xmlEscape, type DomainSpec } from '../../src/virt/domain-xml.js';
import { VirtError } from '../../src/virt/errors.js';
import { LibvirtConnection } from '../../src/virt/libvirt.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qlayer-xml-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function validate(xml: string): Promise<{ ok: boolean; output: string }> {
  const file = join(dir, `d-${Math.random().toString(36).slice(2)}.xml`);
  await writeFile(file, xml);
  const result = await execa('virt-xml-validate', [file, 'domain'], { reject: false });
  return { ok: result.exitCode === 0, output: `${result.stdout}${result.stderr}` };
}

const kernelSpec: DomainSpec = {
  name: 'qlayer-xml-kernel',
  type: 'qemu',
  memoryMiB: 256,
  vcpus: 2,
  boot: { kind: 'kernel', kernel: '/boot/vmlinux', initrd: '/boot/initrd.img', cmdline: 'console=ttyS0 root=/dev/vda qlayer.sha256=/a,/b' },
  disks: [{ path: '/images/user.qcow2', format: 'qcow2' }],
  serialLog: '/var/log/qlayer/serial.log',
  owner: { pid: 1234, host: 'host-a', started: '2026-01-01T00:00:00.000Z' },
};

const shapes: Array<[string, DomainSpec]> = [
  ['direct kernel boot, chain read from headers', kernelSpec],
  [
    'explicit 3-layer backing chain, KVM, two disks',
    {
      ...kernelSpec,
      name: 'qlayer-xml-chain',
      type: 'kvm',
      disks: [
        {
          path: '/images/user.qcow2',
          format: 'qcow2',
          cache: 'none',
          discard: 'unmap',
          backingChain: [
            { path: '/images/apps.qcow2', format: 'qcow2' },
            { path: '/images/base.qcow2', format: 'qcow2' },
          ],
        },
        { path: '/images/data.raw', format: 'raw', readOnly: true },
      ],
    },
  ],
  [
    'firmware boot (BIOS) with network and VNC',
    { name: 'qlayer-xml-bios', type: 'kvm', memoryMiB: 2048, vcpus: 2, boot: { kind: 'firmware', firmware: 'bios' }, disks: [{ path: '/images/desktop.qcow2', format: 'qcow2' }], network: 'default', vnc: true },
  ],
  [
    'firmware boot (EFI, q35), no agent, no serial',
    { name: 'qlayer-xml-efi', type: 'kvm', memoryMiB: 4096, vcpus: 4, machine: 'q35', boot: { kind: 'firmware', firmware: 'efi' }, disks: [{ path: '/images/desktop.qcow2', format: 'qcow2' }], guestAgent: false },
  ],
  [
    'names and paths that need escaping',
    { ...kernelSpec, name: 'qlayer-xml-esc', disks: [{ path: `/images/it's <a> & "b".qcow2`, format: 'qcow2' }], boot: { kind: 'kernel', kernel: '/k', cmdline: `a='1' b="<2>" & c` } },
  ],
];

describe('buildDomainXml', () => {
  it.each(shapes)('%s: passes virt-xml-validate', async (_, spec) => {
    const xml = buildDomainXml(spec);
    const result = await validate(xml);
    expect(result.ok, `${result.output}\n${xml}`).toBe(true);
  });

  it('writes the pieces the guest relies on', () => {
    const xml = buildDomainXml(shapes[1]![1]);
    expect(xml).toContain(`<domain type='kvm'>`);
    expect(xml).toContain(`<cpu mode='host-passthrough'/>`);
    expect(xml).toContain('<acpi/>');
    expect(xml).toContain(`<driver name='qemu' type='qcow2' cache='none' discard='unmap'/>`);
    expect(xml).toContain(`<seclabel type='none'/>`);
    expect(xml).toContain(`<target type='virtio' name='org.qemu.guest_agent.0'/>`);
    expect(xml).toContain(`<source path='/var/log/qlayer/serial.log' append='off'/>`);
    expect(xml).toContain('<on_reboot>destroy</on_reboot>');
    // The chain nests top-down and ends with an empty <backingStore/>.
    const chain = xml.slice(xml.indexOf('<disk'), xml.indexOf('</disk>'));
    expect(chain.indexOf('/images/apps.qcow2')).toBeLessThan(chain.indexOf('/images/base.qcow2'));
    expect(chain.match(/<backingStore type='file'>/g)).toHaveLength(2);
    expect(chain.match(/<format type='qcow2'\/>/g)).toHaveLength(2);
    expect(chain).toMatch(/<source file='\/images\/base.qcow2'\/>\s*<backingStore\/>/);
    expect(xml).toContain(`<target dev='vdb' bus='virtio'/>`);
    expect(buildDomainXml(shapes[0]![1])).toContain(`<domain type='qemu'>`);
    expect(buildDomainXml(shapes[0]![1])).not.toContain('<cpu');
    expect(buildDomainXml(shapes[2]![1])).toContain('<on_reboot>restart</on_reboot>');
  });

  it('escapes every value it embeds', () => {
    const xml = buildDomainXml(shapes[4]![1]);
    expect(xml).toContain(`/images/it&apos;s &lt;a&gt; &amp; &quot;b&quot;.qcow2`);
    expect(xml).toContain(`a=&apos;1&apos; b=&quot;&lt;2&gt;&quot; &amp; c`);
    expect(xmlEscape(`<&>"'`)).toBe('&lt;&amp;&gt;&quot;&apos;');
  });

  it('round-trips the owner metadata', () => {
    expect(parseOwner(buildDomainXml(kernelSpec))).toEqual(kernelSpec.owner);
    // libvirt rewrites the element with double quotes and its own attribute order.
    const dumped = `<metadata>\n    <qlayer:owner xmlns:qlayer="https://qlayer.invalid/xmlns/domain/1" started="x&amp;y" host="h" pid="42"/>\n  </metadata>`;
    expect(parseOwner(dumped)).toEqual({ pid: 42, host: 'h', started: 'x&y' });
    expect(parseOwner('<domain/>')).toBeUndefined();
  });

  it('tells a domain with the guest-agent channel from one without (stop picks agent or ACPI by it)', () => {
    expect(hasAgentChannel(buildDomainXml(kernelSpec))).toBe(true);
    expect(hasAgentChannel(buildDomainXml({ ...kernelSpec, guestAgent: false }))).toBe(false);
    // libvirt's live XML: double quotes, a state attribute, other channels beside it.
    const live = `<channel type="spicevmc"><target type="virtio" name="com.redhat.spice.0"/></channel>\n<channel type="unix"><target type="virtio" name="org.qemu.guest_agent.0" state="disconnected"/></channel>`;
    expect(hasAgentChannel(live)).toBe(true);
    expect(hasAgentChannel(live.split('\n')[0]!)).toBe(false);
  });

  const bad: Array<[string, Partial<DomainSpec>, RegExp]> = [
    ['name', { name: 'has space' }, /domain spec name/],
    ['relative kernel', { boot: { kind: 'kernel', kernel: 'vmlinuz' } }, /boot\.kernel.*absolute/],
    ['relative disk', { disks: [{ path: 'user.qcow2', format: 'qcow2' }] }, /disks\[0\]\.path.*absolute/],
    ['memory', { memoryMiB: 8 }, /memoryMiB/],
    ['vcpus', { vcpus: 0 }, /vcpus/],
    ['format', { disks: [{ path: '/a', format: 'vmdk' as 'raw' }] }, /disks\[0\]\.format/],
    ['raw with backing', { disks: [{ path: '/a', format: 'raw', backingChain: [{ path: '/b', format: 'raw' }] }] }, /raw image cannot have a backing file/],
    ['duplicate target', { disks: [{ path: '/a', format: 'qcow2', target: 'vda' }, { path: '/b', format: 'qcow2', target: 'vda' }] }, /vda is used twice/],
    ['firmware without disk', { boot: { kind: 'firmware', firmware: 'bios' }, disks: [] }, /needs a disk/],
    ['line break in path', { serialLog: '/a\nb' }, /serialLog/],
  ];
  it.each(bad)('refuses a bad %s with virt.invalid-spec naming the field', (_, patch, message) => {
    let caught: unknown;
    try {
      buildDomainXml({ ...kernelSpec, ...patch });
    } catch (error) {
      caught = error;
    }
    expect(caught).toBeInstanceOf(VirtError);
    expect((caught as VirtError).code).toBe('virt.invalid-spec');
    expect((caught as VirtError).message).toMatch(message);
  });

  it('libvirt itself accepts the kernel-boot and chain shapes (define, read back, undefine)', async () => {
    const connection = await LibvirtConnection.open();
    try {
      for (const [, spec] of [shapes[0]!, shapes[1]!]) {
        const name = `${spec.name}-${process.pid}`;
        // The real libvirtd checks the XML but not the files when only defining.
        const xml = buildDomainXml({ ...spec, name, type: 'qemu' });
        const { Hypervisor } = await import('@unraid/libvirt');
        const hv = new Hypervisor({ uri: 'qemu:///system' });
        await hv.connectOpen();
        try {
          const domain = await hv.domainDefineXML(xml);
          const back = await hv.domainGetXMLDesc(domain);
          await hv.domainUndefine(domain);
          expect(parseOwner(back)).toEqual(spec.owner);
          if (spec.disks[0]?.backingChain) expect(back).toContain('/images/apps.qcow2');
        } finally {
          await hv.connectClose();
        }
        expect(await connection.exists(name)).toBe(false);
      }
    } finally {
      await connection.close();
    }
  });
});

describe('diskSources', () => {
  it('reads each disk\'s top image from live XML, not its backing stores, not cdroms', () => {
    const xml = `<domain type='qemu'><name>qlayer-x</name><devices>
      <disk type='file' device='cdrom'><source file='/iso/x.iso' index='4'/><target dev='hdc'/></disk>
      <disk type='file' device='disk'>
        <driver name='qemu' type='qcow2'/>
        <source file='/s/desktops/demo/user.qcow2' index='3'/>
        <backingStore type='file' index='2'><format type='qcow2'/><source file='/s/desktops/demo/apps.0.qcow2'/>
          <backingStore type='file' index='1'><format type='qcow2'/><source file='/s/bases/b.qcow2'/><backingStore/></backingStore>
        </backingStore>
        <target dev='vda' bus='virtio'/>
      </disk>
      <disk type="file" device="disk"><source file="/a&amp;b/o'k.qcow2"/></disk>
    </devices></domain>`;
    expect(diskSources(xml)).toEqual(['/s/desktops/demo/user.qcow2', "/a&b/o'k.qcow2"]);
  });
});
