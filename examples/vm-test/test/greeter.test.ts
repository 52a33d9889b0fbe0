/**
 * Boot the small test guest with the greeter app composed in (qlayer builds it as an app and
 * assigns it, so its files are in the guest's filesystem at the first boot), run it, check it.
 */
import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { beforeAll, expect, test } from 'vitest';
import { boot, testGuest, type TestGuest } from 'qlayer/testing';

const app = fileURLToPath(new URL('../app/greeter', import.meta.url));
let guest: TestGuest;

beforeAll(async () => {
  guest = await testGuest(); // built once and cached; seconds afterwards
});

test('the greeter runs in the guest and greets', async () => {
  const before = createHash('sha256').update(readFileSync(guest.image)).digest('hex');
  {
    await using vm = await boot({ ...guest, apps: [app], memoryMiB: 256, timeoutSec: 300 });

    expect(await vm.succeed('/opt/greeter/bin/greet qlayer')).toBe('Hello, qlayer!\n');
    // The app's files are ordinary files of the guest: change one and the app follows.
    await vm.writeFile('/opt/greeter/share/greeting.txt', 'Goodbye');
    expect(await vm.succeed('/opt/greeter/bin/greet')).toBe('Goodbye, world!\n');

    const failed = await vm.exec('/opt/greeter/bin/missing');
    expect(failed.exitCode).toBe(127);
    expect(vm.serialLog()).toContain(guest.readyMarker);
  }
  // The VM ran on a throwaway overlay: the image is unchanged.
  expect(createHash('sha256').update(readFileSync(guest.image)).digest('hex')).toBe(before);
});
