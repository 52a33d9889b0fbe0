/**
 * libvirt connection URIs as qlayer uses them (config libvirt.uri), and the combinations that
 * cannot work with a store. A remote URI (qemu+ssh://host/system) is fine when the store sits on
 * storage both hosts see at the same absolute path: libvirt on the other host opens the images
 * by the paths in the domain XML, and its QEMU hook finds the store by the path in the metadata.
 */
import { statSync } from 'node:fs';
import { VirtError } from './errors.js';

export interface LibvirtUri {
  uri: string;
  /** qemu (the only hypervisor driver qlayer runs). */
  driver: string;
  /** ssh, tls, tcp, unix, libssh, libssh2, ext; null: the local default. */
  transport: string | null;
  user: string | null;
  host: string | null;
  port: number | null;
  /** /system or /session. */
  path: string;
  params: Record<string, string>;
  /** Reaches another machine's daemon (a host is named; libvirt takes qemu+ssh:///system to mean this host). */
  remote: boolean;
}

const TRANSPORTS = new Set(['ssh', 'libssh', 'libssh2', 'tls', 'tcp', 'unix', 'ext']);

/** Parse a libvirt URI, refusing what qlayer cannot drive, each with the reason and a fix. */
export function parseLibvirtUri(uri: string): LibvirtUri {
  const bad = (why: string): VirtError => new VirtError('virt.bad-uri', `libvirt.uri ${JSON.stringify(uri)}: ${why}`);
  const match = /^([a-z][a-z0-9]*)(?:\+([a-z0-9-]+))?:\/\/(?:([^@/?#]*)@)?(\[[^\]]*\]|[^:/?#]*)(?::(\d+))?(\/[^?#]*)?(?:\?([^#]*))?$/i.exec(uri.trim());
  if (!match) throw bad('not a libvirt URI (driver[+transport]://[user@][host[:port]]/path, e.g. qemu:///system or qemu+ssh://host/system)');
  const [, driver, transport, user, host, port, path, query] = match;
  if (driver!.toLowerCase() !== 'qemu') throw bad(`driver ${driver} is not qemu: qlayer's desktops are QEMU domains`);
  if (transport !== undefined && !TRANSPORTS.has(transport.toLowerCase())) throw bad(`unknown transport ${transport} (one of ${[...TRANSPORTS].join(', ')})`);
  if (path !== '/system' && path !== '/session') throw bad(`path ${path ?? '(none)'} is neither /system nor /session`);
  const params: Record<string, string> = {};
  for (const pair of (query ?? '').split('&').filter(Boolean)) {
    const [key, value = ''] = pair.split('=');
    params[decodeURIComponent(key!)] = decodeURIComponent(value);
  }
  const hostName = host === undefined || host === '' ? null : host.replace(/^\[|\]$/g, '');
  return {
    uri,
    driver: 'qemu',
    transport: transport?.toLowerCase() ?? null,
    user: user === undefined || user === '' ? null : decodeURIComponent(user),
    host: hostName,
    port: port === undefined ? null : Number(port),
    path: path!,
    params,
    remote: hostName !== null,
  };
}

export interface StoreForUri {
  /** The store's root folder (absolute, resolved on this host). */
  root: string;
  /** The store path as the user gave it (--store, QLAYER_STORE), when known: a relative one means this host's working folder. */
  given?: string;
  /** This process's uid (default: process.getuid()). */
  uid?: number;
}

/**
 * Check that the URI can work with this store; returns the parsed URI. Refused:
 * - a remote URI with a store given as a relative path: it names a folder of this machine's
 *   working directory, which the other host cannot share at the same path;
 * - a remote /session daemon: it runs as the SSH user with its own hooks folder, and the store
 *   would have to belong to that user there;
 * - qemu:///session (QEMU runs as you) with a store that belongs to another user (a system
 *   store: root's, made for qemu:///system): its images would be opened by the wrong user.
 */
export function checkUriForStore(uri: string, store: StoreForUri): LibvirtUri {
  const parsed = parseLibvirtUri(uri);
  const bad = (why: string): VirtError => new VirtError('virt.bad-uri', `libvirt.uri ${uri}: ${why}`);
  if (parsed.remote) {
    if (store.given !== undefined && !store.given.startsWith('/')) {
      throw bad(`the store ${JSON.stringify(store.given)} is a relative path; with a remote libvirt give it as an absolute path that ${parsed.host} sees too (shared storage mounted at the same path)`);
    }
    if (parsed.path === '/session') throw bad(`a remote session daemon runs as the SSH user with its own hooks; use qemu+${parsed.transport ?? 'ssh'}://${parsed.host}/system`);
  } else if (parsed.path === '/session') {
    const uid = store.uid ?? process.getuid?.() ?? 0;
    let owner: number | null = null;
    try {
      owner = statSync(store.root).uid;
    } catch {
      owner = null; // a store not made yet is made by this user
    }
    if (owner !== null && owner !== uid) {
      throw bad(`qemu:///session runs QEMU as uid ${uid}, but the store ${store.root} belongs to uid ${owner} (a system store): use qemu:///system, or a store of your own`);
    }
  }
  return parsed;
}
