/**
 * qlayer/testing: boot throwaway VMs from a disk image in tests, run commands in them through
 * the guest agent, watch their consoles, snapshot and restore them. A consumer of the layers and
 * virt code, like the CLI. See README "Testing with qlayer".
 */
export { boot, type BootOptions } from './boot.js';
export { Vm, VmSnapshot, type ExecResult, type ExecOptions, type SnapshotMode } from './vm.js';
export type { VmOptions, BootMode, AppSource } from './options.js';
export { testGuest, type TestGuest } from './test-guest.js';
export { reap, type ReapOptions, type ReapResult } from './reap.js';
export { TestingError, type TestingErrorCode } from './errors.js';
export type { CommandRecord } from './diagnostics.js';
