/**
 * The client: `connect(uri)` opens a libvirt connection (to libvirtd or sparsevirtd) and gives
 * typed access to storage pools and volumes, with sparse upload and download.
 */
import { escapeXml } from '../xml.js';
import { RemoteError, SparsevirtError, VIR_ERR_CODE } from '../errors.js';
import { Peer } from '../rpc/peer.js';
import {
  AuthType, CONNECT_RO, Feature, P, type PoolRef, type Procedure, type VolRef,
} from '../protocol/remote.js';
import { openTransport } from '../transport/connect.js';
import { SshStream } from '../transport/ssh.js';
import { defaultUri, parseUri, type ParsedUri } from '../transport/uri.js';
import { StoragePool, StorageVol } from './storage.js';

export interface ConnectOptions {
  /** Open read-only (VIR_CONNECT_RO): listing and download only. */
  readonly?: boolean;
  signal?: AbortSignal;
  /** Seconds of silence before a keepalive ping (default 5; 0 disables). */
  keepaliveInterval?: number;
  /** Unanswered pings before the connection is declared dead (default 6, as virsh). */
  keepaliveCount?: number;
  /** Timeout in ms for opening the socket and for each handshake call (default 30 s). */
  timeout?: number;
  /**
   * While a stream from libvirtd is open, keep the event loop polling for this many ms after each
   * read instead of sleeping (default 1, at most 100; 0 disables). It keeps one CPU busy for the
   * length of a download, which virsh's client happens to do by its own work, and small extents
   * come several times faster (see io/busy-poll.ts). Ignored with a sparsevirtd, which sends in
   * batches: there it would only burn the CPU.
   */
  busyPoll?: number;
}

const BUSY_POLL_MS = 1;
const BUSY_POLL_MAX = 100;

/** @internal The connection's `Peer`, for the package's own modules (and its tests). */
export const kPeer = Symbol('sparsevirt.peer');

export class Connection {
  readonly uri: ParsedUri;
  readonly readonly: boolean;
  readonly #peer: Peer;

  /**
   * The daemon took `Feature.SPARSEVIRT_DEEP_QUEUE` (it is sparsevirtd); false until its answer
   * arrives, and with libvirtd.
   */
  sparsevirtDaemon = false;
  #digestOffered: Promise<boolean> | null = null;

  private constructor(uri: ParsedUri, peer: Peer, readonly: boolean) {
    this.uri = uri;
    this.#peer = peer;
    this.readonly = readonly;
  }

  /** @internal */
  get [kPeer](): Peer {
    return this.#peer;
  }

  /** The connection is closed (by `close()`, the server, or a failure). */
  get closed(): boolean {
    return this.#peer.closed;
  }

  /** @internal */
  static async open(uriString: string | undefined, opts: ConnectOptions = {}): Promise<Connection> {
    const uri = parseUri(uriString || defaultUri());
    const busyPoll = opts.busyPoll ?? BUSY_POLL_MS;
    if (typeof busyPoll !== 'number' || !(busyPoll >= 0 && busyPoll <= BUSY_POLL_MAX)) {
      throw new SparsevirtError('ERR_INVALID_ARG', `busyPoll must be a number of ms from 0 to ${BUSY_POLL_MAX}, got ${String(busyPoll)}`);
    }
    const sock = await openTransport(uri, { signal: opts.signal, timeout: opts.timeout, readonly: opts.readonly });
    const peer = new Peer(sock, { role: 'client', keepaliveInterval: opts.keepaliveInterval ?? 5, keepaliveCount: opts.keepaliveCount ?? 6, busyPoll });
    const conn = new Connection(uri, peer, !!opts.readonly);
    try {
      await conn.handshake(opts);
    } catch (err) {
      peer.destroy(err as Error);
      if (sock instanceof SshStream && (err as SparsevirtError).code === 'ERR_TIMEOUT') {
        // ssh ran but nothing answered through it: it may be waiting at a prompt, or for a host
        const said = sock.lastWords();
        throw new SparsevirtError('ERR_TIMEOUT', `no answer through ssh to ${sock.where} within ${opts.timeout ?? 30000} ms${said ? `: ssh said: ${said}` : ''}`, { cause: err });
      }
      throw err;
    }
    return conn;
  }

  private async handshake(opts: ConnectOptions): Promise<void> {
    // A server that accepts but never answers must not hang connect(): every handshake call is
    // bounded (keepalive only starts once the server agreed to it).
    const o = { signal: opts.signal, timeout: opts.timeout ?? 30000 };
    const { types } = await this.#peer.call(P.AUTH_LIST, undefined, o);
    if (types.length > 0 && !types.includes(AuthType.NONE)) {
      throw new SparsevirtError('ERR_UNSUPPORTED', `the server requires authentication (${types.map((t) => ['none', 'sasl', 'polkit'][t] ?? t).join(', ')}), which sparsevirt does not implement`);
    }
    const ka = await this.#peer.call(P.CONNECT_SUPPORTS_FEATURE, { feature: Feature.PROGRAM_KEEPALIVE }, o);
    await this.#peer.call(P.CONNECT_OPEN, { name: this.uri.name, flags: opts.readonly ? CONNECT_RO : 0 }, o);
    if (ka.supported === 1) this.#peer.startKeepalive();
    // Not awaited: the answer changes nothing here, and the daemon reads it before any later call.
    this.#peer.call(P.CONNECT_SUPPORTS_FEATURE, { feature: Feature.SPARSEVIRT_DEEP_QUEUE }, o).then(
      (r) => {
        this.sparsevirtDaemon = r.supported === 1;
        if (this.sparsevirtDaemon) this.#peer.busyPoll = 0;
      },
      () => {},
    );
  }

  /**
   * Whether the daemon computes content digests of volume ranges (sparsevirtd does; libvirtd
   * answers 0 to the feature). Asked once per connection.
   */
  contentDigestOffered(): Promise<boolean> {
    this.#digestOffered ??= this.#peer.call(P.CONNECT_SUPPORTS_FEATURE, { feature: Feature.SPARSEVIRT_CONTENT_DIGEST }, {})
      .then((r) => r.supported === 1, () => false);
    return this.#digestOffered;
  }

  /** Call a procedure; RemoteErrors keep libvirt's code, domain and message. */
  call<A, R>(proc: Procedure<A, R>, args: A, signal?: AbortSignal): Promise<R> {
    return this.#peer.call(proc, args, { signal });
  }

  async close(): Promise<void> {
    if (this.#peer.closed) return;
    try {
      await this.#peer.call(P.CONNECT_CLOSE, undefined, { timeout: 5000 });
    } catch {
      // closing anyway
    }
    this.#peer.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }

  // ------------------------------------------------------------ connection info

  async getUri(): Promise<string> {
    return (await this.call(P.CONNECT_GET_URI, undefined)).uri;
  }
  async getType(): Promise<string> {
    return (await this.call(P.CONNECT_GET_TYPE, undefined)).type;
  }
  async getVersion(): Promise<number> {
    return Number((await this.call(P.CONNECT_GET_VERSION, undefined)).hvVer);
  }
  async getLibVersion(): Promise<number> {
    return Number((await this.call(P.CONNECT_GET_LIB_VERSION, undefined)).libVer);
  }
  async getHostname(): Promise<string> {
    return (await this.call(P.CONNECT_GET_HOSTNAME, undefined)).hostname;
  }

  // ------------------------------------------------------------ pools

  /** All pools; `flags` as libvirt's CONNECT_LIST_ALL_STORAGE_POOLS (e.g. 1 inactive, 2 active). */
  async listAllStoragePools(flags = 0): Promise<StoragePool[]> {
    const r = await this.call(P.CONNECT_LIST_ALL_STORAGE_POOLS, { needResults: 1, flags });
    return r.pools.map((p) => new StoragePool(this, p));
  }
  async storagePoolLookupByName(name: string): Promise<StoragePool> {
    return new StoragePool(this, (await this.call(P.STORAGE_POOL_LOOKUP_BY_NAME, { name })).pool);
  }
  async storagePoolLookupByUUID(uuid: string | Buffer): Promise<StoragePool> {
    const raw = typeof uuid === 'string' ? uuidToBytes(uuid) : uuid;
    return new StoragePool(this, (await this.call(P.STORAGE_POOL_LOOKUP_BY_UUID, { uuid: raw })).pool);
  }
  async storagePoolDefineXML(xml: string, flags = 0): Promise<StoragePool> {
    return new StoragePool(this, (await this.call(P.STORAGE_POOL_DEFINE_XML, { xml, flags })).pool);
  }
  /** Define a dir pool (what `pool-define-as NAME dir --target DIR` sends). */
  storagePoolDefineDir(name: string, target: string): Promise<StoragePool> {
    return this.storagePoolDefineXML(dirPoolXml(name, target));
  }

  // ------------------------------------------------------------ volumes

  async storageVolLookupByKey(key: string): Promise<StorageVol> {
    return new StorageVol(this, (await this.call(P.STORAGE_VOL_LOOKUP_BY_KEY, { key })).vol);
  }
  async storageVolLookupByPath(path: string): Promise<StorageVol> {
    return new StorageVol(this, (await this.call(P.STORAGE_VOL_LOOKUP_BY_PATH, { path })).vol);
  }

  /** @internal */
  pool(ref: PoolRef): StoragePool {
    return new StoragePool(this, ref);
  }
  /** @internal */
  vol(ref: VolRef): StorageVol {
    return new StorageVol(this, ref);
  }
}

export function connect(uri?: string, opts: ConnectOptions = {}): Promise<Connection> {
  return Connection.open(uri, opts);
}

export { escapeXml };

export function dirPoolXml(name: string, target: string): string {
  return `<pool type='dir'>\n  <name>${escapeXml(name)}</name>\n  <target>\n    <path>${escapeXml(target)}</path>\n  </target>\n</pool>\n`;
}

export function uuidToBytes(uuid: string): Buffer {
  const hex = uuid.replace(/-/g, '');
  if (!/^[0-9a-fA-F]{32}$/.test(hex)) throw new SparsevirtError('ERR_INVALID_ARG', `invalid UUID '${uuid}'`);
  return Buffer.from(hex, 'hex');
}

export function uuidToString(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function newUuid(): Buffer {
  return uuidToBytes(globalThis.crypto.randomUUID()); // (webcrypto's getter loads crypto on first use)
}

/** True for libvirt's "unsupported flags" refusal (what an old or limited peer says to the sparse flag). */
export function isUnsupportedFlags(err: unknown): boolean {
  return err instanceof RemoteError && err.virCode === VIR_ERR_CODE.INVALID_ARG && /unsupported flags/i.test(err.message);
}
