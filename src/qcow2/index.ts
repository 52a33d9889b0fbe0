export * from './errors.js';
export * from './header.js';
export * from './layout.js';
