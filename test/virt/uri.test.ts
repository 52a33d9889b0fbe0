/**
 * libvirt.uri handling: parsing, and the combinations refused with a store. A second host cannot
 * be reached from the test machines; README "Remote libvirt" says how the remote transport was
 * run instead (qemu+ssh to this machine's own daemon through a private sshd, by hand).
 */
import { chown, mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkUriForStore, parseLibvirtUri } from '../../src/virt/uri.js';
import { tempDir } from '../helpers/qemu.js';

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('qlayer-uri-'));
});
afterAll(async () => cleanup?.());

describe('parseLibvirtUri', () => {
  it('reads local and remote URIs', () => {
    expect(parseLibvirtUri('qemu:///system')).toMatchObject({ driver: 'qemu', transport: null, host: null, path: '/system', remote: false });
    expect(parseLibvirtUri('qemu:///session')).toMatchObject({ path: '/session', remote: false });
    expect(parseLibvirtUri('qemu+ssh://admin@kvm2.example.org:2222/system?keyfile=/root/.ssh/id_ed25519&no_verify=1')).toEqual({
      uri: 'qemu+ssh://admin@kvm2.example.org:2222/system?keyfile=/root/.ssh/id_ed25519&no_verify=1',
      driver: 'qemu',
      transport: 'ssh',
      user: 'admin',
      host: 'kvm2.example.org',
      port: 2222,
      path: '/system',
      params: { keyfile: '/root/.ssh/id_ed25519', no_verify: '1' },
      remote: true,
    });
    expect(parseLibvirtUri('qemu+tls://[fd00::2]/system')).toMatchObject({ host: 'fd00::2', transport: 'tls', remote: true });
    expect(parseLibvirtUri('qemu+ssh:///system')).toMatchObject({ transport: 'ssh', host: null, remote: false }); // libvirt: ssh to localhost
    expect(parseLibvirtUri('qemu+unix:///system?socket=/run/libvirt/libvirt-sock')).toMatchObject({ transport: 'unix', remote: false, params: { socket: '/run/libvirt/libvirt-sock' } });
  });

  it.each([
    ['', /not a libvirt URI/],
    ['/var/run/libvirt/libvirt-sock', /not a libvirt URI/],
    ['xen:///system', /driver xen is not qemu/],
    ['lxc:///', /driver lxc is not qemu/],
    ['qemu+carrier-pigeon://host/system', /unknown transport carrier-pigeon/],
    ['qemu:///', /neither \/system nor \/session/],
    ['qemu+ssh://host', /neither \/system nor \/session/],
  ])('refuses %j', (uri, why) => {
    expect(() => parseLibvirtUri(uri)).toThrow(why);
    try {
      parseLibvirtUri(uri);
    } catch (error) {
      expect((error as { code: string }).code).toBe('virt.bad-uri');
    }
  });
});

describe('checkUriForStore', () => {
  it('a remote system URI with an absolute store is accepted; a relative one is refused, naming the host', () => {
    expect(checkUriForStore('qemu+ssh://kvm2/system', { root: '/srv/shared/store', given: '/srv/shared/store' })).toMatchObject({ remote: true });
    expect(checkUriForStore('qemu+ssh://kvm2/system', { root: '/srv/shared/store' })).toMatchObject({ remote: true });
    expect(() => checkUriForStore('qemu+ssh://kvm2/system', { root: '/home/me/qlayer-store', given: 'qlayer-store' })).toThrow(/relative path; .*kvm2 sees too/);
    expect(() => checkUriForStore('qemu+ssh://kvm2/session', { root: '/srv/shared/store' })).toThrow(/use qemu\+ssh:\/\/kvm2\/system/);
  });

  it('qemu:///session with a store of another user (a system store) is refused; with its own, accepted', async () => {
    const system = join(dir, 'system-store');
    await mkdir(system);
    await chown(system, 0, 0);
    expect(() => checkUriForStore('qemu:///session', { root: system, uid: 1000 })).toThrow(/belongs to uid 0 \(a system store\): use qemu:\/\/\/system/);
    expect(checkUriForStore('qemu:///session', { root: system, uid: 0 })).toMatchObject({ path: '/session' });
    expect(checkUriForStore('qemu:///session', { root: join(dir, 'not-made-yet'), uid: 1000 })).toMatchObject({ path: '/session' });
    expect(checkUriForStore('qemu:///system', { root: system, uid: 1000 })).toMatchObject({ path: '/system' });
  });
});
