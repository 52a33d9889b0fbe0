export * from './chain.js';
// Resolving and confining the files an image names: one policy for every reader.
export { NamedFilePolicy, type NamedFileRole, type ResolvedName } from '../qcow2/named-files.js';
