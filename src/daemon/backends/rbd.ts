/**
 * The RBD pool backend: `<pool type='rbd'>` on a Ceph cluster, as libvirt 9.0's
 * storage_backend_rbd.c has it (connection, sizes, volume XML, errors), plus what libvirt's RBD
 * backend lacks: vol-upload and vol-download, sparse and plain, with offset and length, and
 * vol-create-from across backends.
 *
 * Start connects with the pool's monitors, Ceph pool and cephx user; the key is the value of the
 * secret `<auth><secret>` names (found through the daemon's `BackendContext`), base64-encoded as
 * libvirt encodes it. Ceph's own timeouts bound the time a pool whose cluster cannot be reached
 * takes to fail, and an operation a stopped OSD or monitor does not answer: 30 s each as
 * libvirt's, or what `<rbd:config_opts>` sets (`client_mount_timeout` for connecting,
 * `rados_mon_op_timeout` for statistics, `rados_osd_op_timeout` for every image operation and so
 * every transfer). A transfer whose operation times out fails with libvirt's SYSTEM_ERROR and
 * Ceph's reason (ETIMEDOUT) on the stream; the daemon serves its other pools meanwhile, and the
 * pool's connection serves again once the cluster answers.
 *
 * Volumes are images: key and target path `<source name>/<image>`, type network, format raw.
 * A download reads the extents `rbd_diff_iterate2` reports and sends the rest as holes (zeros
 * inside reported extents are found and sent as holes too); an upload writes data and turns holes
 * into discards or write-zeroes, so a hole reads as zeros over old data and is left unallocated
 * where Ceph can. Memory stays bounded by the primitives' bytes in flight.
 */
import { RemoteError, SparsevirtError } from '../../errors.js';
import type { Chunk, FileRange, WrittenRange } from '../../chunk.js';
import { readFileRange } from '../../chunk.js';
import { VolType, WipeAlgorithm } from '../../protocol/remote.js';
import { SecretUsage } from '../../protocol/secret.js';
import type {
  BackendContext, PoolBackend, Pool, PoolDef, ReadOptions, VolDef, VolInfo, Volume, VolumeReader, VolumeSource, VolumeWriter, WriteHooks, WriteOptions,
} from '../backend.js';
import { CODE, DOMAIN, checkFlags, storageError } from '../errors.js';
import { RbdPool, rbdReadChunks, rbdWriteChunks, type RbdImage } from '../rbd/index.js';
import { escapeXml } from '../../xml.js';

/**
 * libvirt's Ceph timeouts in seconds (client_mount_timeout, rados_mon_op_timeout,
 * rados_osd_op_timeout), each of which `<rbd:config_opts>` may set otherwise.
 */
const DEFAULT_TIMEOUT = 30;
/** Chunks and bytes gathered into one batch of a download. */
const BATCH_CHUNKS = 64;
const BATCH_BYTES = 4 << 20;
/** Bytes of writes in flight to the cluster per upload. */
const IN_FLIGHT = 16 << 20;
/**
 * Bytes of reads in flight per download: a read's bytes stay in memory until the socket has
 * written them (they go out as views of the read buffers), so fewer are kept in flight than
 * for writes, which librbd releases as the OSD acknowledges them.
 */
const READ_IN_FLIGHT = 4 << 20;

const ERRNO: Record<string, number> = {
  ERR_NOT_FOUND: 2, ERR_EXISTS: 17, ERR_ACCESS_DENIED: 13, ERR_TIMEOUT: 110, ERR_INVALID_ARG: 22, ERR_UNSUPPORTED: 95, ERR_IO: 5,
};

/**
 * A failure of Ceph as libvirt reports one (virReportSystemError): code SYSTEM_ERROR, domain
 * STORAGE, Ceph's reason in the message, its errno in int1. Errors that are libvirt's already pass.
 */
export function rbdError(err: unknown, domain: number = DOMAIN.STORAGE): RemoteError {
  if (err instanceof RemoteError) return err;
  const e = err as SparsevirtError & { cause?: NodeJS.ErrnoException };
  const detail = e instanceof Error ? e.message : String(err);
  let errno = typeof e?.cause?.errno === 'number' ? Math.abs(e.cause.errno) : -1;
  if (errno < 0 && typeof e?.code === 'string') errno = ERRNO[e.code] ?? -1;
  return new RemoteError({
    code: CODE.SYSTEM_ERROR, domain, message: detail, level: 2,
    str1: '%s', str2: detail, str3: null, int1: errno, int2: -1,
  });
}

function conn(pool: Pool): RbdPool {
  const c = pool.conn;
  if (!(c instanceof RbdPool) || c.closed) throw storageError(CODE.OPERATION_INVALID, `storage pool '${pool.name}' is not active`);
  return c;
}

function sourceName(def: PoolDef): string {
  return def.source.name ?? '';
}

function volumeOf(pool: Pool, name: string): Volume {
  const key = `${sourceName(pool.def)}/${name}`;
  return { pool, name, key, path: key };
}

function notFound(name: string): RemoteError {
  return storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching name '${name}'`);
}

async function openImage(vol: Volume, readOnly: boolean): Promise<RbdImage> {
  try {
    return await conn(vol.pool).open(vol.name, { readOnly });
  } catch (err) {
    if (err instanceof SparsevirtError && err.code === 'ERR_NOT_FOUND') throw notFound(vol.name);
    throw rbdError(err);
  }
}

async function statPool(pool: Pool): Promise<void> {
  const s = await conn(pool).stats();
  pool.stats = { capacity: BigInt(s.capacity), allocation: BigInt(s.allocation), available: BigInt(s.available) };
}

/** libvirt's refusals of a volume definition for an RBD pool. */
function checkVolDef(def: VolDef): number {
  if (def.format !== null && def.format !== 'raw') {
    throw storageError(CODE.CONFIG_UNSUPPORTED, 'only RAW volumes are supported by this storage pool');
  }
  if (!def.capacity) throw storageError(CODE.NO_SUPPORT, 'volume capacity required for this storage pool');
  return def.capacity;
}

/** Data of a batch as chunks: file ranges are read into buffers; data received in place never comes here. */
async function* toChunks(source: AsyncIterable<Array<Chunk | WrittenRange>>): AsyncGenerator<Chunk[]> {
  for await (const batch of source) {
    const out: Chunk[] = [];
    for (const c of batch) {
      if (c.kind === 'written') throw new SparsevirtError('ERR_INVALID_ARG', 'an RBD volume cannot take data received in place');
      out.push(c);
    }
    yield out;
  }
}

async function* fromReader(reader: VolumeReader): AsyncGenerator<Chunk[]> {
  for await (const batch of reader.batches()) {
    yield batch.map((c): Chunk => (c.kind === 'file' ? { kind: 'data', bytes: readFileRange(c) } : c));
  }
}

/** The chunks of `gen` gathered into batches. */
async function* batched(gen: AsyncGenerator<Chunk>): AsyncGenerator<Array<Chunk | FileRange>> {
  let batch: Chunk[] = [];
  let bytes = 0;
  for await (const c of gen) {
    batch.push(c);
    if (c.kind === 'data') bytes += c.bytes.length;
    if (batch.length >= BATCH_CHUNKS || bytes >= BATCH_BYTES) {
      yield batch;
      batch = [];
      bytes = 0;
    }
  }
  if (batch.length) yield batch;
}

class RbdReader implements VolumeReader {
  private gen: AsyncGenerator<Chunk> | null = null;
  constructor(private readonly image: RbdImage, private readonly o: ReadOptions) {}

  batches(): AsyncIterable<Array<Chunk | FileRange>> {
    const size = this.image.size;
    const offset = Math.min(this.o.offset, size);
    const length = this.o.length === null ? size - offset : Math.min(this.o.length, size - offset);
    this.gen = rbdReadChunks(this.image, { offset, length, sparse: this.o.sparse, detectZeroes: this.o.sparse, maxBytesInFlight: READ_IN_FLIGHT });
    const gen = this.gen;
    return (async function* () {
      try {
        yield* batched(gen);
      } catch (err) {
        throw rbdError(err, DOMAIN.STREAMS);
      }
    })();
  }

  async close(): Promise<void> {
    await this.gen?.return(undefined).catch(() => undefined);
    await this.image.close();
  }
}

/** Whether any extent of the image (its parent's included) exists at or after `offset`. */
async function hasData(image: RbdImage, offset: number): Promise<boolean> {
  const size = image.size;
  if (offset >= size) return false;
  let found = false;
  await image.diff(offset, size - offset, {}, (e) => {
    if (e.exists) found = true;
    return !found;
  });
  return found;
}

class RbdWriter implements VolumeWriter {
  constructor(private readonly image: RbdImage, private readonly o: WriteOptions) {}

  async write(source: AsyncIterable<Array<Chunk | WrittenRange>>, _hooks: WriteHooks): Promise<void> {
    try {
      // nothing allocated from the offset on (a new volume): holes need no discard, as rbd import skips them
      const zeroed = !(await hasData(this.image, this.o.offset));
      await rbdWriteChunks(this.image, toChunks(source), { offset: this.o.offset, maxBytesInFlight: IN_FLIGHT, zeroed });
    } catch (err) {
      throw rbdError(err, DOMAIN.STREAMS);
    }
  }

  async close(): Promise<void> {
    await this.image.close();
  }
}

export const rbdBackend: PoolBackend = {
  type: 'rbd',
  supports: new Set(['createVol', 'createVolFrom', 'deleteVol', 'resizeVol', 'wipeVol', 'upload', 'download'] as const),
  /** libvirt 9.0 lists no target formats for rbd (its enum is empty), raw by default. */
  volFormats: { defaultFormat: 'raw', formats: [] },

  checkDefinition(def: PoolDef): void {
    if (def.source.hosts.length === 0 || def.source.hosts.some((h) => !h.name)) {
      throw storageError(CODE.XML_ERROR, 'missing storage pool source host name');
    }
    if (!def.source.name) throw storageError(CODE.XML_ERROR, "element 'name' is mandatory for RBD pool");
  },

  /** libvirt has no duplicate check for RBD pools: two definitions may name the same Ceph pool. */
  sameSource(): boolean {
    return false;
  },

  async start(pool: Pool, ctx: BackendContext): Promise<void> {
    const def = pool.def;
    let auth: { username: string; key: string } | null = null;
    if (def.source.auth) {
      const value = ctx.lookupSecretValue(def.source.auth.secret, SecretUsage.CEPH);
      auth = { username: def.source.auth.username, key: value.toString('base64') };
    }
    let c: RbdPool;
    try {
      c = await RbdPool.connect({
        monitors: def.source.hosts.map((h) => (h.port ? { host: h.name, port: h.port } : { host: h.name })),
        pool: sourceName(def),
        auth,
        configOpts: def.configOpts.map((o) => [o.name, o.value] as const),
        timeout: DEFAULT_TIMEOUT,
      });
    } catch (err) {
      throw rbdError(err);
    }
    pool.conn = c;
    try {
      await statPool(pool);
    } catch (err) {
      pool.conn = null;
      await c.close().catch(() => undefined);
      throw rbdError(err);
    }
  },

  async stop(pool: Pool): Promise<void> {
    const c = pool.conn;
    pool.conn = null;
    if (c instanceof RbdPool) await c.close().catch(() => undefined);
  },

  async refresh(pool: Pool): Promise<void> {
    try {
      await statPool(pool);
    } catch (err) {
      throw rbdError(err);
    }
  },

  async listVolumes(pool: Pool): Promise<string[]> {
    let names: string[];
    try {
      names = await conn(pool).list();
    } catch (err) {
      throw rbdError(err);
    }
    return names.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  },

  async lookupVolume(pool: Pool, name: string): Promise<Volume> {
    const names = await this.listVolumes(pool);
    if (!names.includes(name)) throw notFound(name);
    return volumeOf(pool, name);
  },

  async findVolume(pool: Pool, keyOrPath: string): Promise<Volume | null> {
    const prefix = `${sourceName(pool.def)}/`;
    if (!keyOrPath.startsWith(prefix)) return null;
    const name = keyOrPath.slice(prefix.length);
    const names = await this.listVolumes(pool);
    return names.includes(name) ? volumeOf(pool, name) : null;
  },

  async volumeInfo(vol: Volume): Promise<VolInfo> {
    let info;
    try {
      info = await conn(vol.pool).info(vol.name);
    } catch (err) {
      if (err instanceof SparsevirtError && err.code === 'ERR_NOT_FOUND') throw notFound(vol.name);
      throw rbdError(err);
    }
    return { type: VolType.NETWORK, capacity: BigInt(info.capacity), allocation: BigInt(info.allocation), physical: 0n, format: 'raw' };
  },

  async volumeXml(vol: Volume): Promise<string> {
    const info = await this.volumeInfo(vol);
    return `<volume type='network'>
  <name>${escapeXml(vol.name)}</name>
  <key>${escapeXml(vol.key)}</key>
  <capacity unit='bytes'>${info.capacity}</capacity>
  <allocation unit='bytes'>${info.allocation}</allocation>
  <target>
    <path>${escapeXml(vol.path)}</path>
    <format type='raw'/>
  </target>
</volume>
`;
  },

  async createVolume(pool: Pool, def: VolDef, flags: number): Promise<Volume> {
    checkFlags(flags, 0, 'virStorageBackendRBDBuildVol');
    const capacity = checkVolDef(def);
    await create(pool, def.name, capacity);
    return volumeOf(pool, def.name);
  },

  async createVolumeFrom(pool: Pool, def: VolDef, src: VolumeSource, flags: number): Promise<Volume> {
    checkFlags(flags, 0, 'virStorageBackendRBDBuildVolFrom');
    if (def.format !== null && def.format !== 'raw') {
      throw storageError(CODE.CONFIG_UNSUPPORTED, 'only RAW volumes are supported by this storage pool');
    }
    const c = conn(pool);
    const srcCapacity = Number(src.info.capacity);
    const capacity = Math.max(def.capacity ?? 0, srcCapacity);
    const srcConn = src.vol.pool.conn;
    if (src.vol.pool.type === 'rbd' && srcConn === c) {
      try {
        await c.clone(src.vol.name, def.name);
        if (capacity > srcCapacity) await c.resize(def.name, capacity);
      } catch (err) {
        if (err instanceof SparsevirtError && err.code === 'ERR_EXISTS') throw exists(def.name);
        throw rbdError(err);
      }
      return volumeOf(pool, def.name);
    }
    await create(pool, def.name, capacity);
    const vol = volumeOf(pool, def.name);
    try {
      const reader = await src.openRead({ offset: 0, length: null, sparse: true });
      try {
        const image = await openImage(vol, false);
        try {
          await rbdWriteChunks(image, fromReader(reader), { zeroed: true });
        } finally {
          await image.close();
        }
      } finally {
        await reader.close();
      }
    } catch (err) {
      await c.remove(def.name).catch(() => undefined);
      throw rbdError(err);
    }
    return vol;
  },

  async deleteVolume(vol: Volume, flags: number): Promise<void> {
    const ZEROED = 1;
    const WITH_SNAPSHOTS = 2;
    checkFlags(flags, ZEROED | WITH_SNAPSHOTS, 'virStorageBackendRBDDeleteVol');
    if (flags & ZEROED) await wipe(vol, WipeAlgorithm.ZERO);
    let removed: boolean;
    try {
      removed = await conn(vol.pool).remove(vol.name, { withSnapshots: (flags & WITH_SNAPSHOTS) !== 0 });
    } catch (err) {
      throw rbdError(err);
    }
    if (!removed) throw notFound(vol.name);
  },

  async resizeVolume(vol: Volume, capacity: bigint, flags: number): Promise<void> {
    checkFlags(flags, 0, 'virStorageBackendRBDResizeVol');
    try {
      await conn(vol.pool).resize(vol.name, Number(capacity));
    } catch (err) {
      if (err instanceof SparsevirtError && err.code === 'ERR_NOT_FOUND') throw notFound(vol.name);
      throw rbdError(err);
    }
  },

  async wipeVolume(vol: Volume, algorithm: number, flags: number): Promise<void> {
    checkFlags(flags, 0, 'virStorageBackendRBDVolWipe');
    if (algorithm !== WipeAlgorithm.ZERO && algorithm !== WipeAlgorithm.TRIM) {
      throw storageError(CODE.INVALID_ARG, `unsupported algorithm ${algorithm}`);
    }
    await wipe(vol, algorithm);
  },

  async openRead(vol: Volume, o: ReadOptions): Promise<VolumeReader> {
    return new RbdReader(await openImage(vol, true), o);
  },

  async openWrite(vol: Volume, o: WriteOptions): Promise<VolumeWriter> {
    return new RbdWriter(await openImage(vol, false), o);
  },
};

function exists(name: string): RemoteError {
  return storageError(CODE.STORAGE_VOL_EXIST, `'${name}'`);
}

async function create(pool: Pool, name: string, capacity: number): Promise<void> {
  // librbd takes C strings: a NUL would cut the name short and name another image
  if (name.includes('\0')) throw storageError(CODE.INVALID_ARG, 'volume name cannot contain a NUL byte');
  try {
    await conn(pool).create(name, capacity);
  } catch (err) {
    if (err instanceof SparsevirtError && err.code === 'ERR_EXISTS') throw exists(name);
    throw rbdError(err);
  }
}

/** ZERO: the whole image reads as zeros (discarded where aligned, zeroed elsewhere); TRIM: discarded. */
async function wipe(vol: Volume, algorithm: number): Promise<void> {
  const image = await openImage(vol, false);
  try {
    const size = image.size;
    if (size === 0) return;
    if (algorithm === WipeAlgorithm.TRIM) {
      await image.discard(0, size);
      await image.flush();
    } else {
      async function* oneHole(): AsyncGenerator<Chunk> {
        yield { kind: 'hole', length: size };
      }
      await rbdWriteChunks(image, oneHole());
    }
  } catch (err) {
    throw rbdError(err);
  } finally {
    await image.close();
  }
}
