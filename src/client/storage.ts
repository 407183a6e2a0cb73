/** StoragePool and StorageVol: libvirt's storage API over the wire, plus sparse file transfer. */
import { checkByteCount, SparsevirtError } from '../errors.js';
import { P, SPARSE_STREAM, type PoolRef, type VolRef } from '../protocol/remote.js';
import { Stream } from '../stream/index.js';
import { receiveTo, sendFrom } from '../transfer/index.js';
import { escapeXml, isUnsupportedFlags, kPeer, uuidToString, type Connection } from './connection.js';

export interface PoolInfo {
  state: number;
  capacity: number;
  allocation: number;
  available: number;
}

export interface VolInfo {
  type: number;
  capacity: number;
  /** Allocated bytes; with GET_PHYSICAL, the physical size. */
  allocation: number;
}

export class StoragePool {
  readonly name: string;
  readonly uuid: Buffer;
  constructor(readonly conn: Connection, readonly ref: PoolRef) {
    this.name = ref.name;
    this.uuid = ref.uuid;
  }
  get uuidString(): string {
    return uuidToString(this.uuid);
  }
  async info(): Promise<PoolInfo> {
    const r = await this.conn.call(P.STORAGE_POOL_GET_INFO, { pool: this.ref });
    return { state: r.state, capacity: Number(r.capacity), allocation: Number(r.allocation), available: Number(r.available) };
  }
  async xmlDesc(flags = 0): Promise<string> {
    return (await this.conn.call(P.STORAGE_POOL_GET_XML_DESC, { pool: this.ref, flags })).xml;
  }
  async autostart(): Promise<boolean> {
    return (await this.conn.call(P.STORAGE_POOL_GET_AUTOSTART, { pool: this.ref })).autostart !== 0;
  }
  async setAutostart(on: boolean): Promise<void> {
    await this.conn.call(P.STORAGE_POOL_SET_AUTOSTART, { pool: this.ref, autostart: on ? 1 : 0 });
  }
  async isActive(): Promise<boolean> {
    return (await this.conn.call(P.STORAGE_POOL_IS_ACTIVE, { pool: this.ref })).active !== 0;
  }
  async isPersistent(): Promise<boolean> {
    return (await this.conn.call(P.STORAGE_POOL_IS_PERSISTENT, { pool: this.ref })).persistent !== 0;
  }
  async create(flags = 0): Promise<void> {
    await this.conn.call(P.STORAGE_POOL_CREATE, { pool: this.ref, flags });
  }
  async build(flags = 0): Promise<void> {
    await this.conn.call(P.STORAGE_POOL_BUILD, { pool: this.ref, flags });
  }
  async destroy(): Promise<void> {
    await this.conn.call(P.STORAGE_POOL_DESTROY, { pool: this.ref });
  }
  async undefine(): Promise<void> {
    await this.conn.call(P.STORAGE_POOL_UNDEFINE, { pool: this.ref });
  }
  async refresh(flags = 0): Promise<void> {
    await this.conn.call(P.STORAGE_POOL_REFRESH, { pool: this.ref, flags });
  }
  async delete(flags = 0): Promise<void> {
    await this.conn.call(P.STORAGE_POOL_DELETE, { pool: this.ref, flags });
  }
  async listAllVolumes(flags = 0): Promise<StorageVol[]> {
    const r = await this.conn.call(P.STORAGE_POOL_LIST_ALL_VOLUMES, { pool: this.ref, needResults: 1, flags });
    return r.vols.map((v) => new StorageVol(this.conn, v));
  }
  async volLookupByName(name: string): Promise<StorageVol> {
    return new StorageVol(this.conn, (await this.conn.call(P.STORAGE_VOL_LOOKUP_BY_NAME, { pool: this.ref, name })).vol);
  }
  async createVolXML(xml: string, flags = 0): Promise<StorageVol> {
    return new StorageVol(this.conn, (await this.conn.call(P.STORAGE_VOL_CREATE_XML, { pool: this.ref, xml, flags })).vol);
  }
  /** Create a volume as `vol-create-as` does (no allocation = fully allocated, as libvirt). */
  createVol(opts: { name: string; capacity: number; allocation?: number; format?: string }): Promise<StorageVol> {
    return this.createVolXML(volumeXml(opts));
  }
}

export function volumeXml(opts: { name: string; capacity: number; allocation?: number; format?: string }): string {
  checkByteCount('capacity', opts.capacity);
  let xml = `<volume>\n  <name>${escapeXml(opts.name)}</name>\n  <capacity>${opts.capacity}</capacity>\n`;
  if (opts.allocation !== undefined) xml += `  <allocation>${checkByteCount('allocation', opts.allocation)}</allocation>\n`;
  if (opts.format) xml += `  <target>\n    <format type='${escapeXml(opts.format)}'/>\n  </target>\n`;
  return xml + '</volume>\n';
}

export interface TransferOptions {
  /** Byte position in the volume (default 0). */
  offset?: number;
  /** Bytes to transfer; 0 or absent = to the end. */
  length?: number;
  /** Ask for a sparse stream (holes as hole packets). */
  sparse?: boolean;
  /** If the server refuses the sparse flag, retry without it instead of failing. */
  fallbackToPlain?: boolean;
  signal?: AbortSignal;
  /** Incoming window in bytes before the socket is paused (downloads). */
  highWaterMark?: number;
}

export interface FileTransferOptions extends TransferOptions {
  /** Turn allocated zero runs of the local file into holes (uploads; costs CPU). */
  detectZeroes?: boolean;
  /** Called as chunks pass (once per batch of them): bytes of data and of holes so far. */
  onProgress?: (p: { dataBytes: number; holeBytes: number }) => void;
}

export interface TransferResult {
  dataBytes: number;
  holeBytes: number;
  /** False when the server refused the sparse flag and the transfer fell back to plain. */
  sparse: boolean;
}

export class StorageVol {
  readonly pool: string;
  readonly name: string;
  readonly key: string;
  constructor(readonly conn: Connection, readonly ref: VolRef) {
    this.pool = ref.pool;
    this.name = ref.name;
    this.key = ref.key;
  }
  async info(): Promise<VolInfo> {
    const r = await this.conn.call(P.STORAGE_VOL_GET_INFO, { vol: this.ref });
    return { type: r.type, capacity: Number(r.capacity), allocation: Number(r.allocation) };
  }
  async infoFlags(flags: number): Promise<VolInfo> {
    const r = await this.conn.call(P.STORAGE_VOL_GET_INFO_FLAGS, { vol: this.ref, flags });
    return { type: r.type, capacity: Number(r.capacity), allocation: Number(r.allocation) };
  }
  async xmlDesc(flags = 0): Promise<string> {
    return (await this.conn.call(P.STORAGE_VOL_GET_XML_DESC, { vol: this.ref, flags })).xml;
  }
  async path(): Promise<string> {
    return (await this.conn.call(P.STORAGE_VOL_GET_PATH, { vol: this.ref })).name;
  }
  async lookupPool(): Promise<StoragePool> {
    return new StoragePool(this.conn, (await this.conn.call(P.STORAGE_POOL_LOOKUP_BY_VOLUME, { vol: this.ref })).pool);
  }
  async delete(flags = 0): Promise<void> {
    await this.conn.call(P.STORAGE_VOL_DELETE, { vol: this.ref, flags });
  }
  async resize(capacity: number | bigint, flags = 0): Promise<void> {
    await this.conn.call(P.STORAGE_VOL_RESIZE, { vol: this.ref, capacity: BigInt(capacity), flags });
  }
  async wipe(algorithm = 0, flags = 0): Promise<void> {
    await this.conn.call(P.STORAGE_VOL_WIPE_PATTERN, { vol: this.ref, algorithm, flags });
  }

  /** Whether this volume's daemon computes content digests (`contentDigest`). */
  contentDigestOffered(): Promise<boolean> {
    return this.conn.contentDigestOffered();
  }

  /**
   * The content digest (`sparsevirt-content-sha256`, see the package's `digest` module) of
   * `length` bytes from `offset`, computed by the daemon without reading holes; null where the
   * daemon does not offer it (libvirtd): `copy.volumeDigest` then computes it from a download.
   */
  async contentDigest(offset: number, length: number): Promise<string | null> {
    if (!(await this.contentDigestOffered())) return null;
    const r = await this.conn.call(P.SPARSEVIRT_VOL_CONTENT_DIGEST, {
      vol: this.ref, offset: BigInt(checkByteCount('offset', offset)), length: BigInt(checkByteCount('length', length)), flags: 0,
    });
    return r.digest;
  }

  /** Open an upload stream: what is sent on it is written into the volume at `offset`. */
  upload(opts: TransferOptions = {}): Promise<Stream> {
    return this.openStream(P.STORAGE_VOL_UPLOAD, true, opts);
  }

  /** Open a download stream of the volume's contents from `offset`. */
  download(opts: TransferOptions = {}): Promise<Stream> {
    return this.openStream(P.STORAGE_VOL_DOWNLOAD, false, opts);
  }

  private async openStream(proc: typeof P.STORAGE_VOL_UPLOAD | typeof P.STORAGE_VOL_DOWNLOAD, sending: boolean, opts: TransferOptions): Promise<Stream> {
    const offset = checkByteCount('offset', opts.offset ?? 0);
    const length = checkByteCount('length', opts.length ?? 0);
    const sparse = !!opts.sparse;
    const peer = this.conn[kPeer];
    const serial = peer.nextSerial();
    const wire = peer.openStream(proc.num, serial, { sparse, sending });
    const stream = new Stream(wire, { sparse, direction: sending ? 'send' : 'recv', signal: opts.signal, highWaterMark: opts.highWaterMark });
    wire.attach(stream);
    try {
      await peer.call(proc, { vol: this.ref, offset: BigInt(offset), length: BigInt(length), flags: sparse ? SPARSE_STREAM : 0 }, { serial, signal: opts.signal });
    } catch (err) {
      wire.fail(err as Error);
      peer.abortStreamIfOpened(serial);
      if (sparse && isUnsupportedFlags(err)) {
        if (opts.fallbackToPlain) return this.openStream(proc, sending, { ...opts, sparse: false });
        throw new SparsevirtError('ERR_SPARSE_UNSUPPORTED',
          `the server does not support sparse streams for ${proc === P.STORAGE_VOL_UPLOAD ? 'upload' : 'download'} (${(err as Error).message}); retry without sparse`,
          { cause: err });
      }
      throw err;
    }
    return stream;
  }

  /**
   * Upload a local file (from its start; `length` bytes of it when given) into the volume at
   * `offset`. With `sparse`, the file's holes travel as hole packets and read back as zeros.
   */
  async uploadFile(file: string, opts: FileTransferOptions = {}): Promise<TransferResult> {
    const stream = await this.upload(opts);
    const counts = await sendFrom(stream, file, {
      length: opts.length || undefined, detectZeroes: opts.detectZeroes, signal: opts.signal, onProgress: opts.onProgress, finish: true,
    });
    return { ...counts, sparse: stream.sparse };
  }

  /**
   * Download the volume (from `offset`, `length` bytes) into a local file, which is created or
   * replaced (as virsh does). Holes are left unallocated; the file's size is the stream's length.
   */
  async downloadFile(file: string, opts: FileTransferOptions = {}): Promise<TransferResult> {
    const stream = await this.download(opts);
    const counts = await receiveTo(stream, file, { truncate: true, signal: opts.signal, onProgress: opts.onProgress, finish: true });
    return { ...counts, sparse: stream.sparse };
  }
}
