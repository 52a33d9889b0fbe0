/**
 * The edits qlayer makes to domain XML it did not write: only the first disk's image chain
 * changes (adopt, each start and recompose), or a template's disks, name, uuid, MACs and NVRAM
 * (create --like/--xml). Every other line must come out as it went in; virt-xml-validate
 * (libvirt's own schema) must accept the result.
 */
import { execa } from 'execa';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { domainFromTemplate, firstDisk, replaceFirstDiskChain } from '../../src/virt/domain-edit.js';
import { diskSources } from '../../src/virt/domain-xml.js';

const admin = `<domain type='qemu'>
  <name>web1</name>
  <uuid>0b6c1d7e-3b5e-4a43-9d0b-6f7f3a0e2a11</uuid>
  <metadata>
    <app:note xmlns:app='https://example.invalid/app'>keep me</app:note>
  </metadata>
  <memory unit='KiB'>262144</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/var/lib/vm/web1 &amp; co.img'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/x.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/sdb'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:11:22:33'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <graphics type='vnc' port='-1' autoport='yes' passwd='s3cret'/>
  </devices>
</domain>
`;

const chain = [
  { path: '/store/desktops/web1/user.qcow2', format: 'qcow2' as const },
  { path: '/store/desktops/web1/apps.3.qcow2', format: 'qcow2' as const },
  { path: '/store/bases/web1.qcow2', format: 'qcow2' as const },
];

async function validate(xml: string): Promise<{ exitCode: number; output: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'qlayer-domain-edit-'));
  try {
    await writeFile(join(dir, 'd.xml'), xml);
    const r = await execa('virt-xml-validate', [join(dir, 'd.xml'), 'domain'], { reject: false });
    return { exitCode: r.exitCode ?? -1, output: `${r.stdout}${r.stderr}` };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

describe('replaceFirstDiskChain', () => {
  it('puts the chain on the first disk and leaves every other line alone', async () => {
    const xml = replaceFirstDiskChain(admin, chain);
    expect(diskSources(xml)).toEqual(['/store/desktops/web1/user.qcow2']); // the block disk has no file
    expect(firstDisk(xml)).toEqual({ type: 'file', file: '/store/desktops/web1/user.qcow2', format: 'qcow2' });
    // Each layer explicit, in order, with its format; the end marked.
    const order = [...xml.matchAll(/<source file='([^']*)'/g)].map((m) => m[1]);
    expect(order.slice(0, 3)).toEqual(chain.map((l) => l.path));
    expect(xml).toContain("<driver name='qemu' type='qcow2' cache='none'/>");
    expect(xml).toMatch(/<seclabel model='dac' relabel='no'\/>/);
    // Outside the first disk, the document is unchanged.
    const outside = (doc: string): string => doc.replace(/<disk type='file' device='disk'>[\s\S]*?<\/disk>/, '');
    expect(outside(xml)).toBe(outside(admin));
    for (const kept of ["<boot order='1'/>", "slot='0x04'", "passwd='s3cret'", 'keep me', "<mac address='52:54:00:11:22:33'/>", '<uuid>0b6c1d7e']) expect(xml).toContain(kept);
    expect(await validate(xml)).toMatchObject({ exitCode: 0 });
  });

  it('is idempotent and replaces an existing backing chain whole', () => {
    const once = replaceFirstDiskChain(admin, chain);
    expect(replaceFirstDiskChain(once, chain)).toBe(once);
    const next = replaceFirstDiskChain(once, [chain[0]!, { path: '/store/desktops/web1/apps.4.qcow2', format: 'qcow2' }, chain[2]!]);
    expect(next).not.toContain('apps.3');
    expect((next.match(/<backingStore type='file'>/g) ?? []).length).toBe(2);
    expect((next.match(/<backingStore\/>/g) ?? []).length).toBe(1);
  });

  it('refuses a domain without a disk', () => {
    expect(() => replaceFirstDiskChain(admin.replace(/<disk[\s\S]*<\/disk>\n/, ''), chain)).toThrow(/no disk/);
  });
});

describe('domainFromTemplate', () => {
  it('takes the hardware, drops the identity, the other disks, MACs and NVRAM', async () => {
    const xml = domainFromTemplate(admin, 'qlayer-abc-alice', chain);
    expect(xml).toContain('<name>qlayer-abc-alice</name>');
    expect(xml).not.toContain('<uuid>');
    expect(xml).not.toContain('<mac ');
    expect(xml).not.toContain('<nvram');
    expect(xml).not.toContain('/dev/sdb');
    expect(xml).toContain('/iso/x.iso'); // a cdrom is hardware, not a disk of the template's
    expect(diskSources(xml)).toEqual([chain[0]!.path]);
    for (const kept of ["<vcpu placement='static'>2</vcpu>", "<memory unit='KiB'>262144</memory>", "<source network='default'/>", "passwd='s3cret'"]) expect(xml).toContain(kept);
    expect(await validate(xml)).toMatchObject({ exitCode: 0 });
  });

  it('adds a disk to a template that has none', async () => {
    const xml = domainFromTemplate(admin.replace(/ *<disk type='file' device='disk'>[\s\S]*?<\/disk>\n/, '').replace(/ *<disk type='block'[\s\S]*?<\/disk>\n/, ''), 'x', chain);
    expect(diskSources(xml)).toEqual([chain[0]!.path]);
    expect(await validate(xml)).toMatchObject({ exitCode: 0 });
  });

  it('refuses what is no domain document', () => {
    expect(() => domainFromTemplate('<network/>', 'x', chain)).toThrow(/not a libvirt domain/);
  });
});
