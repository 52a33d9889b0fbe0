/**
 * The qcow2 engine: header and table layouts (header.ts, layout.ts), one image opened for
 * reading or writing (image.ts), image creation (create.ts), internal snapshots, compressed
 * clusters. Backing chains are in src/chain. Every refusal is a Qcow2Error with a stable code.
 */
export * from './errors.js';
export * from './header.js';
export * from './layout.js';
export * from './snapshots.js';
export * from './compression.js';
export * from './image.js';
export * from './create.js';
export * from './referenced-names.js';
