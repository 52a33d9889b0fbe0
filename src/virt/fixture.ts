import { existsSync, readFileSync, realpathSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadExeca } from '../io/external-program.js';
import { VirtError } from './errors.js';

/** The test guest built by vm-fixtures/build.sh, with every path made absolute. */
export interface Fixture {
  dir: string;
  key: string;
  kernel: string;
  /** The bzImage; `kernel` is the PVH vmlinux when the build could extract one. */
  bzImage: string;
  initrd: string;
  /** Kernel command line without root= and requests. */
  cmdline: string;
  kernelRelease: string;
  images: {
    base: FixtureImage;
    'base-gpt': FixtureImage;
  };
  bootMarker: string;
  readyMarker: string;
  manifest: unknown;
}

export interface FixtureImage {
  path: string;
  sha256: string;
  virtualSize: number;
  rootDevice: string;
  /** Full command line for this image (console, root=). */
  cmdline: string;
  filesystemOffset: number;
}

/** The repository root (this file is src/virt/fixture.ts or dist/src/virt/fixture.js). */
export function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 5; i++) {
    if (existsSync(join(dir, 'package.json')) && existsSync(join(dir, 'vm-fixtures'))) return dir;
    dir = dirname(dir);
  }
  return process.cwd();
}

/** The fixture cache folder: $QLAYER_FIXTURES_CACHE or <repo>/.cache/vm-fixtures. */
export function fixtureCacheDir(): string {
  return process.env['QLAYER_FIXTURES_CACHE'] ?? join(repoRoot(), '.cache', 'vm-fixtures');
}

/** Load the current fixture's manifest; 'virt.fixture-missing' says how to build it. */
export function loadFixture(cacheDir: string = fixtureCacheDir()): Fixture {
  const current = join(cacheDir, 'current');
  const manifestPath = join(current, 'manifest.json');
  if (!existsSync(manifestPath)) {
    throw new VirtError('virt.fixture-missing', `the test guest is not built (no ${manifestPath}); run vm-fixtures/build.sh`);
  }
  const dir = realpathSync(current);
  const m = JSON.parse(readFileSync(manifestPath, 'utf8')) as {
    key: string;
    kernel: { path: string; release: string };
    bzImage: { path: string };
    initrd: { path: string };
    cmdline: string;
    images: Record<'base' | 'base-gpt', { path: string; sha256: string; virtualSize: number; rootDevice: string; cmdline: string; filesystem: { offset: number } }>;
    serial: { bootMarker: string; readyMarker: string };
  };
  const image = (name: 'base' | 'base-gpt'): FixtureImage => {
    const entry = m.images[name];
    return {
      path: resolve(dir, entry.path),
      sha256: entry.sha256,
      virtualSize: entry.virtualSize,
      rootDevice: entry.rootDevice,
      cmdline: entry.cmdline,
      filesystemOffset: entry.filesystem.offset,
    };
  };
  return {
    dir,
    key: m.key,
    kernel: resolve(dir, m.kernel.path),
    bzImage: resolve(dir, m.bzImage.path),
    initrd: resolve(dir, m.initrd.path),
    cmdline: m.cmdline,
    kernelRelease: m.kernel.release,
    images: { base: image('base'), 'base-gpt': image('base-gpt') },
    bootMarker: m.serial.bootMarker,
    readyMarker: m.serial.readyMarker,
    manifest: m,
  };
}

/** Build the fixture if its inputs changed (seconds when cached), then load it. */
export async function ensureFixture(options: { cacheDir?: string; force?: boolean } = {}): Promise<Fixture> {
  const cacheDir = options.cacheDir ?? fixtureCacheDir();
  const script = join(repoRoot(), 'vm-fixtures', 'build.sh');
  const { execa } = await loadExeca();
  const result = await execa('bash', [script, ...(options.force ? ['--force'] : [])], {
    reject: false,
    env: { QLAYER_FIXTURES_CACHE: cacheDir },
    timeout: 600_000,
  });
  if (result.exitCode !== 0) {
    throw new VirtError('virt.fixture-missing', `vm-fixtures/build.sh failed (exit ${result.exitCode}): ${result.stderr.trim().split('\n').slice(-5).join('\n')}`);
  }
  return loadFixture(cacheDir);
}

/** Which of build-debian.sh's guests: grub-pc for BIOS, or grub-efi on an EFI system partition for UEFI (OVMF). */
export type DebianFirmware = 'bios' | 'uefi';

/** The Debian 12 guest built by vm-fixtures/build-debian.sh (boots through its own grub, BIOS or UEFI). */
export interface DebianFixture {
  dir: string;
  key: string;
  /** The firmware its bootloader is for (boot.firmware of a desktop on it). */
  firmware: DebianFirmware;
  /** base.qcow2: GPT, partition 1 BIOS boot (bios) or the EFI system partition (uefi), partition 2 the ext4 root. */
  image: {
    path: string;
    sha256: string;
    virtualSize: number;
    /** Host bytes the qcow2 file holds. */
    allocated: number;
    rootDevice: string;
    filesystemOffset: number;
    filesystemUuid: string;
  };
  kernelRelease: string;
  /** The kernel command line grub passes. */
  cmdline: string;
  /** The ordinary user. */
  user: { name: string; uid: number; home: string };
  agentVersion: string;
  manifest: unknown;
}

/** The cache entry (symlink) of a Debian guest: debian-current, debian-uefi-current. */
const debianCurrent = (firmware: DebianFirmware): string => (firmware === 'uefi' ? 'debian-uefi-current' : 'debian-current');

/** Load the current Debian guest's manifest; 'virt.fixture-missing' says how to build it. */
export function loadDebianFixture(cacheDir: string = fixtureCacheDir(), firmware: DebianFirmware = 'bios'): DebianFixture {
  const current = join(cacheDir, debianCurrent(firmware));
  const manifestPath = join(current, 'manifest.json');
  if (!existsSync(manifestPath)) {
    const build = firmware === 'uefi' ? 'vm-fixtures/build-debian.sh --firmware uefi' : 'vm-fixtures/build-debian.sh';
    throw new VirtError('virt.fixture-missing', `the Debian test guest${firmware === 'uefi' ? ' for UEFI' : ''} is not built (no ${manifestPath}); run ${build} (as root, with mmdebstrap)`);
  }
  const dir = realpathSync(current);
  const m = JSON.parse(readFileSync(manifestPath, 'utf8')) as {
    key: string;
    image: { path: string; sha256: string; virtualSize: number; allocated: number; rootDevice: string; filesystem: { offset: number; uuid: string } };
    boot: { cmdline: string; firmware?: string };
    kernel: { release: string };
    user: { name: string; uid: number; home: string };
    agent: { version: string };
  };
  // Manifests from before the UEFI variant name no firmware: they are BIOS builds.
  const built = (m.boot.firmware ?? 'bios') as DebianFirmware;
  if (built !== firmware) throw new VirtError('virt.fixture-missing', `${manifestPath} is a ${built} build, not ${firmware}; rebuild with vm-fixtures/build-debian.sh --firmware ${firmware}`);
  return {
    dir,
    key: m.key,
    firmware,
    image: {
      path: resolve(dir, m.image.path),
      sha256: m.image.sha256,
      virtualSize: m.image.virtualSize,
      allocated: m.image.allocated,
      rootDevice: m.image.rootDevice,
      filesystemOffset: m.image.filesystem.offset,
      filesystemUuid: m.image.filesystem.uuid,
    },
    kernelRelease: m.kernel.release,
    cmdline: m.boot.cmdline,
    user: m.user,
    agentVersion: m.agent.version,
    manifest: m,
  };
}

/** Build the Debian guest if its inputs changed (seconds when cached, about a minute otherwise), then load it. */
export async function ensureDebianFixture(options: { cacheDir?: string; force?: boolean; firmware?: DebianFirmware } = {}): Promise<DebianFixture> {
  const cacheDir = options.cacheDir ?? fixtureCacheDir();
  const firmware = options.firmware ?? 'bios';
  const script = join(repoRoot(), 'vm-fixtures', 'build-debian.sh');
  const { execa } = await loadExeca();
  const args = [script, ...(firmware === 'uefi' ? ['--firmware', 'uefi'] : []), ...(options.force ? ['--force'] : [])];
  const result = await execa('bash', args, {
    reject: false,
    env: { QLAYER_FIXTURES_CACHE: cacheDir },
    timeout: 900_000,
  });
  if (result.exitCode !== 0) {
    throw new VirtError('virt.fixture-missing', `vm-fixtures/build-debian.sh${firmware === 'uefi' ? ' --firmware uefi' : ''} failed (exit ${result.exitCode}): ${result.stderr.trim().split('\n').slice(-5).join('\n')}`);
  }
  return loadDebianFixture(cacheDir, firmware);
}
