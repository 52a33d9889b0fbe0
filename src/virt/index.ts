/** The libvirt layer: domain XML, start/stop, serial watch, guest agent, host readiness, the test guest. */
export * from './errors.js';
export * from './domain-xml.js';
export * from './libvirt.js';
export * from './serial.js';
export * from './agent.js';
export * from './accel.js';
export * from './boot.js';
export * from './fixture.js';
export * from './kvm-probe.js';
export * from './desktop-runtime.js';
export * from './host-check.js';
