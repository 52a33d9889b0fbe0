/**
 * execa, loaded on first use. Importing it pulls in dozens of modules (~150 ms measured here),
 * which every qlayer command paid at start-up, even `image info`, which runs no external
 * program. The modules that do run one (virsh, fallocate, the fixture build) await this first.
 */
let execaModule: Promise<typeof import('execa')> | undefined;

export function loadExeca(): Promise<typeof import('execa')> {
  execaModule ??= import('execa');
  return execaModule;
}
