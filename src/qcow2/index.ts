export * from './errors.js';
export * from './header.js';
export * from './layout.js';
export * from './snapshots.js';
export * from './compression.js';
export * from './image.js';
export * from './create.js';
