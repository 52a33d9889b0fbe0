/**
 * Host readiness pieces that do not need a broken host to test: qemu.conf parsing and the
 * "can QEMU's user open this image" rule, on real files with real modes.
 */
import { chmod, chown, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { accessibleBy, checkHost, qemuConfUser } from '../../src/virt/host-check.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'qlayer-hostcheck-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('host check', () => {
  it("reads qemu.conf's user and group (last assignment wins, comments ignored, defaults otherwise)", async () => {
    const conf = join(dir, 'qemu.conf');
    await writeFile(conf, '#user = "nobody"\nuser = "libvirt-qemu"\ngroup = "kvm"\n# qlayer test host\nuser = "root"\n');
    expect(qemuConfUser(conf)).toEqual({ user: 'root', group: 'kvm', dynamicOwnership: true });
    await writeFile(conf, 'dynamic_ownership = 0\n');
    expect(qemuConfUser(conf)).toEqual({ user: 'libvirt-qemu', group: 'libvirt-qemu', dynamicOwnership: false });
    expect(qemuConfUser(join(dir, 'missing.conf')).user).toBe('libvirt-qemu');
  });

  it('decides access by owner, group and other bits', async () => {
    const image = join(dir, 'image.qcow2');
    await writeFile(image, 'x');
    await chown(image, 0, 0);
    await chmod(image, 0o600);
    expect(accessibleBy(image, 0, 0, true)).toBe(true); // root
    expect(accessibleBy(image, 1000, 1000, false)).toBe(false);
    await chmod(image, 0o640);
    expect(accessibleBy(image, 1000, 0, false)).toBe(true); // by group
    expect(accessibleBy(image, 1000, 0, true)).toBe(false);
    await chown(image, 1000, 0);
    await chmod(image, 0o600);
    expect(accessibleBy(image, 1000, 5, true)).toBe(true); // by owner
    await chmod(image, 0o604);
    expect(accessibleBy(image, 2000, 5, false)).toBe(true); // by other
  });

  it('reports a missing image and passes an accessible one (QEMU runs as root here or has access)', async () => {
    const image = join(dir, 'ok.qcow2');
    await writeFile(image, 'x');
    await chmod(image, 0o644);
    const report = await checkHost({ images: [image, join(dir, 'absent.qcow2')] });
    expect(report.checks.find((c) => c.name === `image ${image}`)?.ok).toBe(true);
    const absent = report.checks.find((c) => c.name === `image ${join(dir, 'absent.qcow2')}`);
    expect(absent).toMatchObject({ ok: false, detail: 'does not exist' });
    expect(report.ok).toBe(false);
  });
});
