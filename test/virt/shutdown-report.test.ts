import { describe, expect, it } from 'vitest';
import { agentErrorWords } from '../../src/virt/agent.js';
import { describeShutdown, type ShutdownResult } from '../../src/virt/boot.js';
import { VirtError } from '../../src/virt/errors.js';

describe('shutdown reports', () => {
  it("agentErrorWords keeps the guest's words, not qlayer's or libvirt's framing", () => {
    const libvirt = new VirtError('virt.agent-error', "agent guest-shutdown on qlayer-x: internal error: unable to execute QEMU agent command 'guest-shutdown': child process has failed to shutdown");
    expect(agentErrorWords(libvirt)).toBe('child process has failed to shutdown');
    const reply = new VirtError('virt.agent-error', 'agent guest-exec on qlayer-x: {"class":"GenericError","desc":"Guest agent command failed, error was \\"No such file\\""}');
    expect(agentErrorWords(reply)).toBe('Guest agent command failed, error was "No such file"');
    expect(agentErrorWords(new Error('plain'))).toBe('plain');
  });

  it('describeShutdown names the way down and every failed step', () => {
    const result: ShutdownResult = {
      how: 'systemctl',
      ms: 5500,
      steps: [
        { how: 'agent', ok: false, detail: 'guest-shutdown: child process has failed to shutdown (shutdown says: Failed to connect to bus: No such file or directory)', ms: 100 },
        { how: 'systemctl', ok: true, detail: 'systemctl poweroff: the guest went down', ms: 5400 },
      ],
    };
    expect(describeShutdown(result)).toBe('systemctl in 5.5 s (agent failed: guest-shutdown: child process has failed to shutdown (shutdown says: Failed to connect to bus: No such file or directory))');
    const destroyed: ShutdownResult = { how: 'destroyed', ms: 30_000, steps: [{ how: 'acpi', ok: false, detail: 'no response to the ACPI power button within 30.0 s', ms: 30_000 }, { how: 'destroy', ok: true, detail: 'forced off', ms: 10 }], warning: 'the next recompose checks the filesystem' };
    expect(describeShutdown(destroyed)).toMatch(/^destroyed in 30\.0 s \(acpi failed: no response.*\); the next recompose checks the filesystem$/);
  });
});
