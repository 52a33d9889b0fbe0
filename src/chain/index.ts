export * from './chain.js';
export * from './confine.js';
