/**
 * UEFI domains (config boot.firmware: uefi), with libvirt as the oracle: the XML buildDomainXml
 * writes is defined and read back, and a transient domain started from it shows what libvirt made
 * of it (the OVMF build it picked from the firmware descriptors, secure boot off, the NVRAM file
 * where we asked, created from the firmware's template). The NVRAM edits of template domains
 * (withNvram) and the disk-chain rewrite of a recompose (replaceFirstDiskChain) are checked the
 * same way: what libvirt keeps of them after a define.
 *
 * Needs the ovmf package (scripts/setup-host.sh).
 */
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { replaceFirstDiskChain } from '../../src/virt/domain-edit.js';
import { bootsUefi, buildDomainXml, withNvram, type DomainSpec } from '../../src/virt/domain-xml.js';
import { VirtError } from '../../src/virt/errors.js';

let dir: string;
const defined: string[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qlayer-uefi-xml-'));
});
afterAll(async () => {
  for (const name of defined) {
    await execa('virsh', ['-c', 'qemu:///system', 'destroy', name], { reject: false });
    await execa('virsh', ['-c', 'qemu:///system', 'undefine', '--nvram', name], { reject: false });
  }
  await rm(dir, { recursive: true, force: true });
});

const virsh = async (...args: string[]): Promise<string> => (await execa('virsh', ['-c', 'qemu:///system', ...args])).stdout;

/** Define `xml`, read back libvirt's inactive XML. */
async function defineAndRead(xml: string, name: string): Promise<string> {
  const file = join(dir, `${name}.xml`);
  await writeFile(file, xml);
  defined.push(name);
  await virsh('define', file);
  return virsh('dumpxml', '--inactive', name);
}

const name = (what: string): string => `qlayer-uefi-xml-${what}-${process.pid}`;

function efiSpec(what: string, nvram: string, disk = '/images/desktop.qcow2'): DomainSpec {
  return {
    name: name(what),
    type: 'qemu',
    memoryMiB: 128,
    vcpus: 1,
    boot: { kind: 'firmware', firmware: 'efi', nvram },
    disks: [{ path: disk, format: 'qcow2', backingChain: [{ path: '/images/apps.qcow2', format: 'qcow2' }, { path: '/images/base.qcow2', format: 'qcow2' }] }],
    serialLog: join(dir, `${what}.serial.log`),
  };
}

describe('UEFI domain XML', () => {
  it('passes virt-xml-validate and libvirt keeps q35, efi, secure boot off and our NVRAM path', async () => {
    const nvram = join(dir, 'desk-a', 'nvram.fd');
    const xml = buildDomainXml(efiSpec('a', nvram));
    const file = join(dir, 'a-validate.xml');
    await writeFile(file, xml);
    const validation = await execa('virt-xml-validate', [file, 'domain'], { reject: false });
    expect(validation.exitCode, `${validation.stdout}${validation.stderr}\n${xml}`).toBe(0);

    const back = await defineAndRead(xml, name('a'));
    expect(back).toMatch(/<os firmware=['"]efi['"]>/);
    expect(back).toMatch(/machine=['"]pc-q35-[\d.]+['"]/);
    expect(back).toMatch(/<feature enabled=['"]no['"] name=['"]secure-boot['"]\/>/);
    expect(back).toMatch(/<feature enabled=['"]no['"] name=['"]enrolled-keys['"]\/>/);
    expect(back).toContain(`<nvram>${nvram}</nvram>`);
    expect(bootsUefi(back)).toBe(true);
    // Defining creates no NVRAM file: libvirt makes it at the first start.
    expect(existsSync(nvram)).toBe(false);
  });

  it('a BIOS spec gets no firmware, nvram or q35; an NVRAM file on a BIOS spec is refused', async () => {
    const bios: DomainSpec = { ...efiSpec('bios', '/x'), boot: { kind: 'firmware', firmware: 'bios' } };
    const xml = buildDomainXml(bios);
    expect(xml).not.toMatch(/firmware=|<nvram|q35/);
    expect(bootsUefi(await defineAndRead(xml, name('bios')))).toBe(false);
    const refused = (() => {
      try {
        buildDomainXml({ ...bios, boot: { kind: 'firmware', firmware: 'bios', nvram: '/x/nvram.fd' } });
      } catch (error) {
        return error;
      }
      return undefined;
    })();
    expect(refused).toBeInstanceOf(VirtError);
    expect((refused as VirtError).message).toMatch(/boot\.nvram: only a UEFI boot/);
    expect(() => buildDomainXml(efiSpec('rel', 'nvram.fd'))).toThrow(/boot\.nvram.*absolute/);
  });

  it('started: libvirt picks the non-secure-boot OVMF and creates the NVRAM file from its template, where we asked', async () => {
    // No disk file is needed for OVMF to come up; it sits in its boot manager until destroyed.
    await mkdir(join(dir, 'desk-b'));
    const nvram = join(dir, 'desk-b', 'nvram.fd');
    const spec: DomainSpec = { ...efiSpec('b', nvram), disks: [{ path: join(dir, 'empty.qcow2'), format: 'qcow2' }], guestAgent: false };
    await execa('qemu-img', ['create', '-q', '-f', 'qcow2', join(dir, 'empty.qcow2'), '64M']);
    const file = join(dir, 'b.xml');
    await writeFile(file, buildDomainXml(spec));
    defined.push(spec.name);
    await virsh('create', file);
    const live = await virsh('dumpxml', spec.name);
    await virsh('destroy', spec.name);

    const loader = /<loader\b([^>]*)>([^<]+)<\/loader>/.exec(live);
    expect(loader, live).not.toBeNull();
    expect(loader![1]).toMatch(/readonly=['"]yes['"]/);
    expect(loader![1]).toMatch(/type=['"]pflash['"]/);
    expect(loader![1]).not.toMatch(/secure=['"]yes['"]/);
    expect(loader![2]).toMatch(/OVMF_CODE[^/]*\.fd$/);
    expect(loader![2]).not.toMatch(/secboot|\.ms\.|snakeoil/);
    const nvramElement = /<nvram\b[^>]*\btemplate=['"]([^'"]+)['"][^>]*>([^<]+)<\/nvram>/.exec(live);
    expect(nvramElement, live).not.toBeNull();
    expect(nvramElement![2]).toBe(nvram);
    // The file is a copy of the template libvirt named (OVMF had not written to it yet, or only
    // its own boot entries: same size either way).
    const template = nvramElement![1]!;
    expect((await stat(nvram)).size).toBe((await stat(template)).size);
    expect(existsSync(`/var/lib/libvirt/qemu/nvram/${spec.name}_VARS.fd`)).toBe(false);
  }, 120_000);

  it('withNvram gives a UEFI template domain its own NVRAM file and leaves a BIOS one alone (libvirt keeps it)', async () => {
    const desktopNvram = join(dir, 'desk-c', 'nvram.fd');
    // libvirt's own dump of a UEFI domain that had libvirt's default NVRAM path (as --like reads it).
    const source = await defineAndRead(buildDomainXml(efiSpec('c-src', '/var/lib/libvirt/qemu/nvram/other_VARS.fd')), name('c-src'));
    const dropped = source.replace(/[ \t]*<nvram\b[^>]*>[\s\S]*?<\/nvram>[ \t]*\n?/, '').replace(name('c-src'), name('c'));
    const added = withNvram(dropped, desktopNvram);
    expect(await defineAndRead(added.replace(/[ \t]*<uuid>[\s\S]*?<\/uuid>\n?/, ''), name('c'))).toContain(`<nvram>${desktopNvram}</nvram>`);

    // An explicit loader (OVMF named by hand) with a template: the path changes, the template stays.
    const explicit = [
      `<domain type='qemu'>`,
      `  <name>${name('d')}</name>`,
      `  <memory unit='MiB'>128</memory>`,
      '  <os>',
      `    <type arch='x86_64' machine='q35'>hvm</type>`,
      `    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>`,
      `    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/d_VARS.fd</nvram>`,
      '  </os>',
      '  <features>',
      '    <acpi/>',
      '  </features>',
      '</domain>',
      '',
    ].join('\n');
    expect(bootsUefi(explicit)).toBe(true);
    const back = await defineAndRead(withNvram(explicit, join(dir, 'desk-d', 'nvram.fd')), name('d'));
    expect(back).toMatch(new RegExp(`<nvram template=['"]/usr/share/OVMF/OVMF_VARS_4M.fd['"]>${join(dir, 'desk-d', 'nvram.fd')}</nvram>`));

    const bios = buildDomainXml({ ...efiSpec('e', '/x'), boot: { kind: 'firmware', firmware: 'bios' } });
    expect(withNvram(bios, '/y/nvram.fd')).toBe(bios);
  });

  it('a recompose (replaceFirstDiskChain) keeps the NVRAM file and the firmware: libvirt reads them back unchanged', async () => {
    const nvram = join(dir, 'desk-f', 'nvram.fd');
    const before = await defineAndRead(buildDomainXml(efiSpec('f', nvram)), name('f'));
    const rewritten = replaceFirstDiskChain(before, [
      { path: '/images/user.qcow2', format: 'qcow2' },
      { path: '/images/apps-1.qcow2', format: 'qcow2' },
      { path: '/images/base.qcow2', format: 'qcow2' },
    ]);
    const after = await defineAndRead(rewritten, name('f'));
    expect(after).toContain('/images/apps-1.qcow2');
    const os = (xml: string): string => /<os\b[\s\S]*?<\/os>/.exec(xml)![0];
    expect(os(after)).toBe(os(before));
    expect(os(after)).toContain(`<nvram>${nvram}</nvram>`);
  });
});
