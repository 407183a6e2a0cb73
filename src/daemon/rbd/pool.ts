/**
 * An RBD pool as libvirt's `<pool type='rbd'>` describes it, and its images.
 *
 * Connection (as libvirt 9.0's storage_backend_rbd.c does it): `rados_create` for
 * `client.<username>` (client.admin without `<auth>`), options `key` (the secret's value,
 * base64) and `auth_supported` (`cephx`, or `none` without `<auth>`), `mon_host` from the
 * `<host>` elements (`name:port,` each, `[v6]:port,` for IPv6, the name alone without a port),
 * `client_mount_timeout`, `rados_mon_op_timeout` and `rados_osd_op_timeout` (30 s in libvirt),
 * `rbd_default_format` 2, then each `<rbd:config_opts>` option, then `rados_connect` and
 * `rados_ioctx_create` for the source name. Here also `auth_client_required` (the same value
 * as `auth_supported`) and `rbd_cache` false (the streams here write large sequential runs and
 * flush at the end; a config option can turn the cache back on) and
 * `rbd_disable_zero_copy_writes` false (writes from the frame buffers, which stay ours until
 * the write completes).
 *
 * Sizes (libvirt's figures): the pool's capacity is `rados_cluster_stat` kb × 1024, its
 * available space kb_avail × 1024, its allocation `rados_ioctx_pool_stat` num_bytes. A
 * volume's capacity is `rbd_stat` size; its allocation is obj_size × num_objs (the capacity
 * rounded up to objects), except with `<refresh><volume allocation='default'/></refresh>` in
 * the pool XML and the fast-diff feature valid (flag FAST_DIFF_INVALID clear): then the sum of
 * the extents `rbd_diff_iterate2(whole_object=1)` reports as existing.
 *
 * Every call that may wait on the cluster runs off the event loop (see librbd.ts) and fails
 * within a bounded time: Ceph's own timeouts (the `timeout` option, or what `<rbd:config_opts>`
 * sets in its place, read back from the handle as Ceph applies them), and a deadline of the
 * longest of them plus a margin here, after which the call is reported as ERR_TIMEOUT even if
 * Ceph has not answered. An aio operation Ceph gives up on (ETIMEDOUT) completes, and its
 * buffers are released then; one past the deadline here keeps them until librbd completes it
 * (librbd may still write into them). `rbdOpsInFlight()` counts them for the whole process.
 */
import { SparsevirtError, checkByteCount } from '../../errors.js';
import {
  RBD_FEATURE_FAST_DIFF,
  RBD_FLAG_FAST_DIFF_INVALID,
  cephErrno,
  cephNative,
  errnoName,
  errnoText,
  type CephNative,
  type ClusterStat,
  type DiffExtent,
  type PoolStat,
  type Ptr,
} from '../../io/librbd.js';

/** A monitor as in libvirt's `<source><host name='…' port='…'/>`. */
export interface RbdMonitor {
  host: string;
  /** Without a port, librados uses its default ports (3300 for msgr2, 6789 for v1). */
  port?: number;
}

export interface RbdPoolSource {
  /** `<source><host/>`: at least one. */
  monitors: readonly RbdMonitor[];
  /** `<source><name>`: the Ceph pool. */
  pool: string;
  /**
   * `<auth type='ceph' username='…'>` with the secret's value (base64, as librados wants it:
   * libvirt encodes the secret's raw bytes in base64). Without it, no authentication.
   */
  auth?: { username: string; key: string } | null;
  /** `<rbd:config_opts><rbd:option name value/>`, applied last, in order. */
  configOpts?: ReadonlyArray<readonly [string, string]>;
  /**
   * Seconds for `client_mount_timeout`, `rados_mon_op_timeout` and `rados_osd_op_timeout`
   * (default 30, libvirt's), set before `configOpts`, which may set any of them otherwise. A
   * connect to unreachable monitors fails after about this long; so does an operation an OSD
   * does not answer.
   */
  timeout?: number;
}

/** Ceph's timeouts in seconds as the cluster handle applies them (0: Ceph waits without end). */
export interface RbdTimeouts {
  /** `client_mount_timeout`: connecting to the monitors. */
  mount: number;
  /** `rados_mon_op_timeout`: a request to the monitors (cluster and pool statistics). */
  monOp: number;
  /** `rados_osd_op_timeout`: a request to an OSD (every image operation). */
  osdOp: number;
}

const TIMEOUT_OPTIONS = { mount: 'client_mount_timeout', monOp: 'rados_mon_op_timeout', osdOp: 'rados_osd_op_timeout' } as const;

/** The timeouts as the handle applies them; an option it does not report keeps `fallback`. */
function appliedTimeouts(native: CephNative, cluster: Ptr, fallback: number): RbdTimeouts {
  const read = (option: string): number => {
    const v = Number(native.confGet(cluster, option) ?? NaN);
    return Number.isFinite(v) && v >= 0 ? v : fallback;
  };
  return { mount: read(TIMEOUT_OPTIONS.mount), monOp: read(TIMEOUT_OPTIONS.monOp), osdOp: read(TIMEOUT_OPTIONS.osdOp) };
}

/** The deadline of the calls here: the longest of Ceph's timeouts (`fallback` where none is set) plus a margin. */
function deadlineOf(t: RbdTimeouts, fallback: number): number {
  const longest = Math.max(t.mount, t.monOp, t.osdOp);
  return Math.ceil(longest > 0 ? longest : fallback) * 1000 + DEADLINE_MARGIN_MS;
}

/** aio operations submitted by this process and not completed by librbd, and the bytes of the buffers they hold. */
const inFlight = { ops: 0, bytes: 0 };

/** The aio operations of every image of the process that librbd has not completed yet, and the buffer bytes they hold. */
export function rbdOpsInFlight(): { ops: number; bytes: number } {
  return { ...inFlight };
}

export interface RbdPoolStats {
  /** Bytes: cluster kb × 1024. */
  capacity: number;
  /** Bytes: the pool's num_bytes. */
  allocation: number;
  /** Bytes: cluster kb_avail × 1024. */
  available: number;
  cluster: ClusterStat;
  pool: PoolStat;
}

export interface RbdVolumeInfo {
  name: string;
  /** libvirt's target path and key: `pool/name`. */
  path: string;
  capacity: number;
  /** As libvirt reports it (see the module comment). */
  allocation: number;
  objectSize: number;
  numObjects: number;
  order: number;
  features: bigint;
  flags: bigint;
}

export interface RbdCreateOptions {
  /** Feature bits (rbd_create2). Default: librbd's default features (rbd_create, as libvirt). */
  features?: bigint;
  /** Object size as a power of two (default 0: librbd's default, 22 = 4 MiB). */
  order?: number;
}

/** librbd's default `rbd_discard_granularity_bytes`. */
const DEFAULT_DISCARD_GRANULARITY = 64 << 10;

/** Margin on top of Ceph's timeouts before a call is given up here. */
const DEADLINE_MARGIN_MS = 5_000;

/** What to call the errno results of this module's calls, for messages and codes. */
function codeFor(negErrno: number): string {
  switch (negErrno) {
    case -2: return 'ERR_NOT_FOUND';
    case -17: return 'ERR_EXISTS';
    case -1:
    case -13: return 'ERR_ACCESS_DENIED';
    case -110: return 'ERR_TIMEOUT';
    case -22:
    case -34: return 'ERR_INVALID_ARG';
    case -95:
    case -38: return 'ERR_UNSUPPORTED';
    default: return 'ERR_IO';
  }
}

/** A SparsevirtError for a failed Ceph call: `what` failed, Ceph's errno, the code from it. */
export function cephError(what: string, negErrno: number, call: string, code = codeFor(negErrno)): SparsevirtError {
  return new SparsevirtError(code, `${what}: ${errnoText(negErrno)} (${errnoName(negErrno)})`, { cause: cephErrno(negErrno, call) });
}

/** `p`, or ERR_TIMEOUT after `ms` (the native call then finishes on its own; `late` gets its result). */
export function deadline<T>(p: Promise<T>, ms: number, what: string, late?: (v: T) => void): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    let expired = false;
    const timer = setTimeout(() => {
      expired = true;
      reject(new SparsevirtError('ERR_TIMEOUT', `${what}: no answer from the Ceph cluster within ${Math.round(ms / 1000)} s`));
    }, ms);
    p.then(
      (v) => {
        clearTimeout(timer);
        if (expired) late?.(v);
        else resolve(v);
      },
      (err: unknown) => {
        clearTimeout(timer);
        if (!expired) reject(err);
      },
    );
  });
}

/** libvirt's `mon_host`: `name:port,` per monitor, IPv6 in brackets, the name alone without a port. */
export function monHostString(monitors: readonly RbdMonitor[]): string {
  let s = '';
  for (const m of monitors) {
    if (!m.host) throw new SparsevirtError('ERR_INVALID_ARG', 'received malformed monitor, check the XML definition');
    if (m.port) {
      if (!Number.isInteger(m.port) || m.port < 1 || m.port > 65535) {
        throw new SparsevirtError('ERR_INVALID_ARG', `monitor port must be 1-65535, got ${m.port}`);
      }
      s += m.host.includes(':') && !m.host.startsWith('[') ? `[${m.host}]:${m.port},` : `${m.host}:${m.port},`;
    } else {
      s += `${m.host},`;
    }
  }
  return s;
}

/** A connection to one Ceph pool: cluster handle and I/O context. Close it when done. */
export class RbdPool {
  readonly name: string;
  /** Whom the connection authenticated as (`client.admin` without auth). */
  readonly user: string;
  readonly monHost: string;
  /** Ceph's timeouts as the handle applies them. */
  readonly timeouts: Readonly<RbdTimeouts>;
  /** Milliseconds after which a call here gives up (the longest of Ceph's timeouts plus a margin). */
  readonly deadlineMs: number;
  /**
   * `rbd_discard_granularity_bytes` (librbd's default 64 KiB): a discard leaves the parts of
   * its range that are not aligned to it as they were. 0: discards are exact.
   */
  readonly discardGranularity: number;
  readonly #native: CephNative;
  readonly #cluster: Ptr;
  readonly #ioctx: Ptr;
  readonly #images = new Set<RbdImage>();
  #closed: Promise<void> | null = null;

  private constructor(native: CephNative, cluster: Ptr, ioctx: Ptr, source: RbdPoolSource, user: string, monHost: string, timeouts: RbdTimeouts, deadlineMs: number) {
    this.#native = native;
    this.#cluster = cluster;
    this.#ioctx = ioctx;
    this.name = source.pool;
    this.user = user;
    this.monHost = monHost;
    this.timeouts = Object.freeze({ ...timeouts });
    this.deadlineMs = deadlineMs;
    const g = Number(native.confGet(cluster, 'rbd_discard_granularity_bytes') ?? NaN);
    this.discardGranularity = Number.isSafeInteger(g) && g >= 0 ? g : DEFAULT_DISCARD_GRANULARITY;
  }

  /**
   * Connects as libvirt does (see the module comment). Fails with ERR_UNSUPPORTED (no
   * librados/librbd), ERR_INVALID_ARG (an option Ceph refuses), ERR_ACCESS_DENIED (cephx
   * refused the user or key), ERR_TIMEOUT (no monitor answered within the timeout),
   * ERR_NOT_FOUND (no such pool), ERR_IO otherwise. The event loop never waits.
   */
  static async connect(source: RbdPoolSource): Promise<RbdPool> {
    if (!source.pool) throw new SparsevirtError('ERR_INVALID_ARG', 'an RBD pool needs the name of its Ceph pool');
    if (!source.monitors.length) throw new SparsevirtError('ERR_INVALID_ARG', 'an RBD pool needs at least one monitor host');
    const timeout = source.timeout ?? 30;
    if (!Number.isFinite(timeout) || timeout <= 0) throw new SparsevirtError('ERR_INVALID_ARG', `timeout must be positive seconds, got ${timeout}`);
    const monHost = monHostString(source.monitors);
    const native = cephNative();
    const user = `client.${source.auth ? source.auth.username : 'admin'}`;
    const { r, cluster } = native.create2(user);
    if (r < 0) throw cephError(`failed to initialize RADOS for ${user}`, r, 'rados_create2', 'ERR_INVALID_ARG');
    const seconds = String(Math.ceil(timeout));
    const auth = source.auth ? 'cephx' : 'none';
    const options: Array<readonly [string, string, boolean]> = [];
    if (source.auth) options.push(['key', source.auth.key, true]);
    options.push(
      ['auth_supported', auth, false],
      ['auth_client_required', auth, false],
      ['mon_host', monHost, false],
      ['client_mount_timeout', seconds, false],
      ['rados_mon_op_timeout', seconds, false],
      ['rados_osd_op_timeout', seconds, false],
      ['rbd_default_format', '2', false],
      ['rbd_cache', 'false', false],
      // librbd writes from the caller's buffers instead of copying them: rbdWriteChunks keeps
      // each buffer until its write completes, and only then hands it back to the frame pool
      ['rbd_disable_zero_copy_writes', 'false', false],
    );
    for (const [name, value] of source.configOpts ?? []) options.push([name, value, false]);
    let timeouts: RbdTimeouts = { mount: timeout, monOp: timeout, osdOp: timeout };
    let ms = deadlineOf(timeouts, timeout);
    // The handle is shut down on failure, but never under a call still running on it: a call
    // past its deadline shuts it down when it returns.
    let running: Promise<unknown> | null = null;
    const dispose = (): void => {
      const shut = (): void => void native.shutdown(cluster).catch(() => undefined);
      if (running) running.then(shut, shut);
      else shut();
    };
    const track = <T>(p: Promise<T>): Promise<T> => {
      const tracked = p.finally(() => {
        if (running === tracked) running = null;
      });
      running = tracked;
      return tracked;
    };
    let ioctx: Ptr;
    try {
      for (const [name, value, secret] of options) {
        const rc = native.confSet(cluster, name, value);
        if (rc < 0) {
          throw cephError(`failed to set RADOS option ${name}${secret ? '' : `=${value}`}`, rc, 'rados_conf_set', 'ERR_INVALID_ARG');
        }
      }
      timeouts = appliedTimeouts(native, cluster, timeout);
      ms = deadlineOf(timeouts, timeout);
      const rc = await deadline(track(native.connect(cluster)), ms, `connect to the Ceph monitors at ${monHost}`);
      if (rc < 0) throw connectError(rc, monHost, user, timeouts.mount);
      const res = await deadline(track(native.ioctxCreate(cluster, source.pool)), ms, `open Ceph pool '${source.pool}'`, (late) => {
        if (late.r >= 0) void native.ioctxDestroy(late.ioctx).catch(() => undefined);
      });
      if (res.r < 0) {
        throw res.r === -2
          ? cephError(`Ceph pool '${source.pool}' does not exist (monitors ${monHost.replace(/,$/, '')})`, res.r, 'rados_ioctx_create')
          : cephError(`failed to open Ceph pool '${source.pool}'`, res.r, 'rados_ioctx_create');
      }
      ioctx = res.ioctx;
    } catch (err) {
      dispose();
      throw err;
    }
    return new RbdPool(native, cluster, ioctx, source, user, monHost, timeouts, ms);
  }

  get closed(): boolean {
    return this.#closed !== null;
  }

  #check(): void {
    if (this.#closed) throw new SparsevirtError('ERR_STREAM_STATE', `the connection to Ceph pool '${this.name}' is closed`);
  }

  #call<T>(p: Promise<T>, what: string, late?: (v: T) => void): Promise<T> {
    return deadline(p, this.deadlineMs, what, late);
  }

  /** libvirt's capacity, allocation and available for the pool (see the module comment). */
  async stats(): Promise<RbdPoolStats> {
    this.#check();
    const c = await this.#call(this.#native.clusterStat(this.#cluster), 'stat the Ceph cluster');
    if (c.r < 0) throw cephError('failed to stat the RADOS cluster', c.r, 'rados_cluster_stat');
    const p = await this.#call(this.#native.poolStat(this.#ioctx), `stat Ceph pool '${this.name}'`);
    if (p.r < 0) throw cephError(`failed to stat the RADOS pool '${this.name}'`, p.r, 'rados_ioctx_pool_stat');
    const safe = (v: bigint, what: string): number => {
      if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new SparsevirtError('ERR_INVALID_ARG', `${what} ${v} does not fit in 2^53`);
      return Number(v);
    };
    return {
      capacity: safe(c.stat.kb * 1024n, 'cluster capacity'),
      available: safe(c.stat.kbAvail * 1024n, 'cluster available'),
      allocation: safe(p.stat.numBytes, 'pool allocation'),
      cluster: c.stat,
      pool: p.stat,
    };
  }

  /** Image names (`rbd_list2`), in Ceph's order. */
  async list(): Promise<string[]> {
    this.#check();
    const { r, names } = await this.#call(this.#native.list(this.#ioctx), `list the images of Ceph pool '${this.name}'`);
    if (r < 0) throw cephError('Unable to list RBD images', r, 'rbd_list2');
    return names;
  }

  /**
   * Creates an image of `capacity` bytes: `rbd_create` with order 0 (librbd's defaults, format
   * 2 by `rbd_default_format`), as libvirt; or `rbd_create2` with `features`. ERR_EXISTS when
   * the name is taken.
   */
  async create(name: string, capacity: number, opts: RbdCreateOptions = {}): Promise<void> {
    this.#check();
    checkByteCount('capacity', capacity);
    if (capacity === 0) throw new SparsevirtError('ERR_INVALID_ARG', 'volume capacity required for this storage pool');
    const order = opts.order ?? 0;
    const r = await this.#call(this.#native.create(this.#ioctx, name, capacity, opts.features ?? null, order), `create RBD image '${this.name}/${name}'`);
    if (r < 0) throw cephError(`failed to create volume '${this.name}/${name}'`, r, opts.features === undefined ? 'rbd_create' : 'rbd_create2');
  }

  /**
   * Removes an image; false when it did not exist (libvirt ignores ENOENT). With
   * `withSnapshots`, its snapshots are unprotected and removed first (libvirt's
   * VIR_STORAGE_VOL_DELETE_WITH_SNAPSHOTS). An image still open somewhere fails with ERR_IO (EBUSY).
   */
  async remove(name: string, opts: { withSnapshots?: boolean } = {}): Promise<boolean> {
    this.#check();
    if (opts.withSnapshots) {
      const image = await this.open(name).catch((err: unknown) => {
        if (err instanceof SparsevirtError && err.code === 'ERR_NOT_FOUND') return null;
        throw err;
      });
      if (!image) return false;
      try {
        await image.removeSnapshots();
      } finally {
        await image.close();
      }
    }
    const r = await this.#call(this.#native.remove(this.#ioctx, name), `remove RBD image '${this.name}/${name}'`);
    if (r === -2) return false;
    if (r < 0) throw cephError(`failed to remove volume '${this.name}/${name}'`, r, 'rbd_remove');
    return true;
  }

  /** Sets the image's size (grows or shrinks), as libvirt's resize. */
  async resize(name: string, capacity: number): Promise<void> {
    const image = await this.open(name);
    try {
      await image.resize(capacity);
    } finally {
      await image.close();
    }
  }

  /**
   * The volume as libvirt reports it. `allocationFromDiff`: the pool XML has
   * `<refresh><volume allocation='default'/></refresh>` (then fast-diff images report what
   * exists; otherwise, and always without it, obj_size × num_objs).
   */
  async info(name: string, opts: { allocationFromDiff?: boolean } = {}): Promise<RbdVolumeInfo> {
    const image = await this.open(name, { readOnly: true });
    try {
      return await image.volumeInfo(opts);
    } finally {
      await image.close();
    }
  }

  /**
   * libvirt's clone (vol-create-from): a snapshot of `source` that has no changes since it was
   * taken is used if there is one, else a new one `libvirt-N` (N random below 65535); it is
   * protected; then `rbd_clone2` with the source's features, stripe unit and stripe count.
   * Returns the snapshot's name.
   */
  async clone(source: string, target: string): Promise<string> {
    const image = await this.open(source);
    try {
      const features = image.features;
      const unit = image.stripeUnit;
      const count = image.stripeCount;
      let snap = await image.unchangedSnapshot();
      if (snap === null) {
        snap = `libvirt-${Math.floor(Math.random() * 65534)}`;
        await image.createSnapshot(snap);
      }
      await image.protectSnapshot(snap);
      const r = await this.#call(this.#native.clone2(this.#ioctx, source, snap, this.#ioctx, target, features, unit, count), `clone RBD image '${source}'`);
      if (r < 0) throw cephError(`failed to clone RBD volume ${source} to ${target}`, r, 'rbd_clone2');
      return snap;
    } finally {
      await image.close();
    }
  }

  /**
   * A full copy of `source` as a new image `target` (`rbd_copy4`; runs of at least
   * `sparseSize` zero bytes, default 4096, are not written). libvirt's RBD backend has no copy.
   */
  async copy(source: string, target: string, opts: { sparseSize?: number } = {}): Promise<void> {
    const image = await this.open(source, { readOnly: true });
    try {
      const sparse = opts.sparseSize ?? 4096;
      checkByteCount('sparseSize', sparse);
      // a copy moves the whole image: no deadline beyond Ceph's own per-operation timeouts
      const r = await image.native.copy(image.handle, this.#ioctx, target, sparse);
      if (r < 0) throw cephError(`failed to copy RBD volume ${source} to ${target}`, r, 'rbd_copy4');
    } finally {
      await image.close();
    }
  }

  /** Opens an image (read-only: `rbd_open_read_only`, as libvirt's refresh). ERR_NOT_FOUND when missing. */
  async open(name: string, opts: { readOnly?: boolean; snapshot?: string } = {}): Promise<RbdImage> {
    this.#check();
    const native = this.#native;
    const { r, image } = await this.#call(native.open(this.#ioctx, name, opts.snapshot ?? null, opts.readOnly ?? false), `open RBD image '${this.name}/${name}'`, (late) => {
      if (late.r >= 0) void native.close(late.image).catch(() => undefined);
    });
    if (r < 0) throw cephError(`failed to open the RBD image '${this.name}/${name}'`, r, 'rbd_open');
    const img = new RbdImage(this, native, image, name, opts.readOnly ?? false, this.deadlineMs, () => this.#images.delete(img));
    this.#images.add(img);
    return img;
  }

  /** Closes the open images, then the I/O context and the cluster handle. Idempotent. */
  close(): Promise<void> {
    this.#closed ??= (async () => {
      await Promise.allSettled([...this.#images].map((i) => i.close()));
      await this.#native.ioctxDestroy(this.#ioctx);
      await this.#native.shutdown(this.#cluster);
    })();
    return this.#closed;
  }
}

function connectError(rc: number, monHost: string, user: string, timeout: number): SparsevirtError {
  const at = `the Ceph monitors at ${monHost.replace(/,$/, '')}`;
  switch (rc) {
    case -110:
      return cephError(`failed to connect to ${at}: no monitor answered within ${timeout} s (client_mount_timeout)`, rc, 'rados_connect', 'ERR_TIMEOUT');
    case -1:
    case -13:
      return cephError(`${at} refused cephx authentication as ${user}: wrong key or unknown user`, rc, 'rados_connect', 'ERR_ACCESS_DENIED');
    case -2:
      return cephError(`failed to connect to ${at} as ${user}: no key for this user`, rc, 'rados_connect', 'ERR_ACCESS_DENIED');
    default:
      return cephError(`failed to connect to the RADOS monitor on: ${monHost}`, rc, 'rados_connect', 'ERR_IO');
  }
}

export interface RbdOpOptions {
  /** Give up on this operation after so many ms (default: the pool's deadline). */
  deadlineMs?: number;
}

/**
 * An open image. Data operations are librbd aio: each returns a promise settled from the
 * completion; the buffers passed in are held until librbd is done with them, also when the
 * promise was already rejected by its deadline. Close it when done (waits for operations in
 * flight).
 */
export class RbdImage {
  readonly pool: RbdPool;
  readonly name: string;
  readonly readOnly: boolean;
  /** Operations submitted and not completed by librbd. */
  #inFlight = 0;
  #maxInFlight = 0;
  #idle: Array<() => void> = [];
  #closed: Promise<void> | null = null;
  #size: number;
  readonly objectSize: number;
  readonly order: number;
  readonly #deadlineMs: number;
  readonly #forget: () => void;
  /** @internal */
  readonly native: CephNative;
  /** @internal */
  readonly handle: Ptr;

  /** @internal (RbdPool.open) */
  constructor(pool: RbdPool, native: CephNative, handle: Ptr, name: string, readOnly: boolean, deadlineMs: number, forget: () => void) {
    this.pool = pool;
    this.native = native;
    this.handle = handle;
    this.name = name;
    this.readOnly = readOnly;
    this.#deadlineMs = deadlineMs;
    this.#forget = forget;
    const { r, info } = native.stat(handle);
    if (r < 0) throw cephError(`failed to stat the RBD image '${name}'`, r, 'rbd_stat');
    this.#size = info.size;
    this.objectSize = info.objectSize;
    this.order = info.order;
  }

  /** Size in bytes (as of open, `stat()` or `resize()`). */
  get size(): number {
    return this.#size;
  }

  /** Operations in flight now, and the most there ever were at once (for tests and stats). */
  get inFlight(): number {
    return this.#inFlight;
  }
  get maxInFlight(): number {
    return this.#maxInFlight;
  }

  get features(): bigint {
    return this.#u64(this.native.getFeatures(this.handle), 'features', 'rbd_get_features');
  }
  get flags(): bigint {
    return this.#u64(this.native.getFlags(this.handle), 'flags', 'rbd_get_flags');
  }
  get stripeUnit(): bigint {
    return this.#u64(this.native.getStripeUnit(this.handle), 'stripe unit', 'rbd_get_stripe_unit');
  }
  get stripeCount(): bigint {
    return this.#u64(this.native.getStripeCount(this.handle), 'stripe count', 'rbd_get_stripe_count');
  }

  #u64(res: { r: number; value: bigint }, what: string, call: string): bigint {
    this.#check();
    if (res.r < 0) throw cephError(`failed to get the ${what} of RBD image ${this.name}`, res.r, call);
    return res.value;
  }

  #check(): void {
    if (this.#closed) throw new SparsevirtError('ERR_STREAM_STATE', `RBD image '${this.pool.name}/${this.name}' is closed`);
  }

  /** `rbd_stat`: size, object size, object count, order (refreshes `size`). */
  stat(): { size: number; objectSize: number; numObjects: number; order: number } {
    this.#check();
    const { r, info } = this.native.stat(this.handle);
    if (r < 0) throw cephError(`failed to stat the RBD image '${this.name}'`, r, 'rbd_stat');
    this.#size = info.size;
    return info;
  }

  async resize(size: number): Promise<void> {
    this.#check();
    checkByteCount('size', size);
    const r = await deadline(this.native.resize(this.handle, size), this.#deadlineMs, `resize RBD image '${this.name}'`);
    if (r < 0) throw cephError(`failed to resize the RBD image '${this.name}'`, r, 'rbd_resize');
    this.stat();
  }

  /** The volume as libvirt reports it (see RbdPool.info). */
  async volumeInfo(opts: { allocationFromDiff?: boolean } = {}): Promise<RbdVolumeInfo> {
    const info = this.stat();
    const features = this.features;
    const flags = this.flags;
    let allocation = info.objectSize * info.numObjects;
    if (opts.allocationFromDiff && (features & RBD_FEATURE_FAST_DIFF) !== 0n && (flags & RBD_FLAG_FAST_DIFF_INVALID) === 0n) {
      allocation = 0;
      await this.diff(0, info.size, { wholeObject: true }, (e) => {
        if (e.exists) allocation += e.length;
        return true;
      });
    }
    return {
      name: this.name,
      path: `${this.pool.name}/${this.name}`,
      capacity: info.size,
      allocation,
      objectSize: info.objectSize,
      numObjects: info.numObjects,
      order: info.order,
      features,
      flags,
    };
  }

  /**
   * `rbd_diff_iterate2` over [offset, offset+length): calls `onExtent` for each extent, in
   * librbd's order (return false to stop early). Defaults: since the image's creation
   * (`fromSnapshot` null), the parent's data included (a clone reads through to it), extents
   * as the OSDs report them (`wholeObject` false).
   */
  async diff(offset: number, length: number, opts: { fromSnapshot?: string | null; includeParent?: boolean; wholeObject?: boolean }, onExtent: (e: DiffExtent) => boolean): Promise<void> {
    this.#check();
    checkByteCount('offset', offset);
    checkByteCount('length', length);
    let stopped = false;
    const r = await deadline(
      this.native.diffIterate(this.handle, opts.fromSnapshot ?? null, offset, length, opts.includeParent ?? true, opts.wholeObject ?? false, (e) => {
        if (stopped) return false;
        if (!onExtent(e)) stopped = true;
        return !stopped;
      }),
      this.#deadlineMs,
      `iterate RBD image '${this.name}'`,
    );
    if (r < 0 && !(stopped && r === -125)) throw cephError(`failed to iterate RBD image '${this.name}'`, r, 'rbd_diff_iterate2');
  }

  /** Snapshots (`rbd_snap_list`). */
  async snapshots(): Promise<Array<{ name: string; size: number }>> {
    this.#check();
    const { r, snaps } = await deadline(this.native.snapList(this.handle), this.#deadlineMs, `list snapshots of '${this.name}'`);
    if (r < 0) throw cephError(`failed to list the snapshots of RBD image '${this.name}'`, r, 'rbd_snap_list');
    return snaps.map((s) => ({ name: s.name, size: s.size }));
  }

  /** The first snapshot with no change since (libvirt's clone looks for one), or null. */
  async unchangedSnapshot(): Promise<string | null> {
    const size = this.stat().size;
    for (const s of await this.snapshots()) {
      let changed = false;
      await this.diff(0, size, { fromSnapshot: s.name, includeParent: false, wholeObject: true }, () => {
        changed = true;
        return false;
      });
      if (!changed) return s.name;
    }
    return null;
  }

  async createSnapshot(name: string): Promise<void> {
    this.#check();
    const r = await deadline(this.native.snapCreate(this.handle, name), this.#deadlineMs, `snapshot '${this.name}'`);
    if (r < 0) throw cephError(`failed to create RBD snapshot ${this.name}@${name}`, r, 'rbd_snap_create');
  }

  /** Protects a snapshot unless it is protected already. */
  async protectSnapshot(name: string): Promise<void> {
    this.#check();
    const p = await deadline(this.native.snapIsProtected(this.handle, name), this.#deadlineMs, `snapshot '${this.name}@${name}'`);
    if (p.r < 0) throw cephError(`failed to verify if RBD snapshot ${this.name}@${name} is protected`, p.r, 'rbd_snap_is_protected');
    if (p.value) return;
    const r = await deadline(this.native.snapProtect(this.handle, name), this.#deadlineMs, `protect '${this.name}@${name}'`);
    if (r < 0) throw cephError(`failed to protect RBD snapshot ${this.name}@${name}`, r, 'rbd_snap_protect');
  }

  /** Unprotects (where protected) and removes every snapshot, as libvirt's delete with snapshots. */
  async removeSnapshots(): Promise<void> {
    for (const s of await this.snapshots()) {
      const p = await deadline(this.native.snapIsProtected(this.handle, s.name), this.#deadlineMs, `snapshot '${this.name}@${s.name}'`);
      if (p.r < 0) throw cephError(`failed to verify if snapshot '${this.pool.name}/${this.name}@${s.name}' is protected`, p.r, 'rbd_snap_is_protected');
      if (p.value) {
        const r = await deadline(this.native.snapUnprotect(this.handle, s.name), this.#deadlineMs, `unprotect '${this.name}@${s.name}'`);
        if (r < 0) throw cephError(`failed to unprotect snapshot '${this.pool.name}/${this.name}@${s.name}'`, r, 'rbd_snap_unprotect');
      }
      const r = await deadline(this.native.snapRemove(this.handle, s.name), this.#deadlineMs, `remove '${this.name}@${s.name}'`);
      if (r < 0) throw cephError(`failed to remove snapshot '${this.pool.name}/${this.name}@${s.name}'`, r, 'rbd_snap_remove');
    }
  }

  /**
   * One aio operation: settles with its result (bytes for a read, 0 otherwise) or an ERR_IO /
   * ERR_TIMEOUT error. `keep` (the buffers) stays referenced until librbd completes it.
   */
  #aio(what: string, call: string, start: (c: Ptr) => number, keep: Buffer | readonly Buffer[] | null, opts: RbdOpOptions): Promise<number> {
    this.#check();
    const bytes = keep === null ? 0 : Buffer.isBuffer(keep) ? keep.length : keep.reduce((n, b) => n + b.length, 0);
    return new Promise<number>((resolve, reject) => {
      let held: unknown = keep;
      let settled = false;
      const ms = opts.deadlineMs ?? this.#deadlineMs;
      // also keeps the event loop alive while the operation is in flight: koffi's relay of the
      // completion callback does not
      const timer = setTimeout(() => {
        if (settled) return;
        settled = true;
        reject(new SparsevirtError('ERR_TIMEOUT', `${what} on RBD image '${this.pool.name}/${this.name}': no completion from librbd within ${Math.round(ms / 1000)} s`));
      }, ms);
      this.#inFlight++;
      if (this.#inFlight > this.#maxInFlight) this.#maxInFlight = this.#inFlight;
      inFlight.ops++;
      inFlight.bytes += bytes;
      const done = (ret: number, err?: unknown): void => {
        held = undefined;
        inFlight.ops--;
        inFlight.bytes -= bytes;
        this.#inFlight--;
        if (this.#inFlight === 0) for (const wake of this.#idle.splice(0)) wake();
        clearTimeout(timer);
        if (settled) return;
        settled = true;
        if (err !== undefined) reject(err);
        else if (ret < 0) reject(cephError(`${what} on RBD image '${this.pool.name}/${this.name}' failed`, ret, call, ret === -110 ? 'ERR_TIMEOUT' : 'ERR_IO'));
        else resolve(ret);
      };
      try {
        this.native.aio(start, done);
      } catch (err) {
        done(-22, err);
      }
      void held;
    });
  }

  /** Reads `buf.length` bytes at `offset` into `buf` (`rbd_aio_read2`); resolves with the bytes read. */
  async read(offset: number, buf: Buffer, opts: RbdOpOptions = {}): Promise<number> {
    checkByteCount('offset', offset);
    return this.#aio(`read of ${buf.length} bytes at ${offset}`, 'rbd_aio_read2', (c) => this.native.aioRead(this.handle, offset, buf, c), buf, opts);
  }

  /** Writes the buffers back to back at `offset` (`rbd_aio_writev`). */
  async write(offset: number, bufs: Buffer | readonly Buffer[], opts: RbdOpOptions = {}): Promise<void> {
    checkByteCount('offset', offset);
    const list = Buffer.isBuffer(bufs) ? [bufs] : bufs;
    const len = list.reduce((n, b) => n + b.length, 0);
    this.#writable(offset, len);
    await this.#aio(`write of ${len} bytes at ${offset}`, 'rbd_aio_writev', (c) => this.native.aioWritev(this.handle, offset, list, c), list, opts);
  }

  /**
   * `rbd_aio_discard`: librbd drops whole objects and zeroes object ranges aligned to its
   * discard granularity (`rbd_discard_granularity_bytes`, 64 KiB by default); the parts of the
   * range outside that alignment keep their old data.
   */
  async discard(offset: number, length: number, opts: RbdOpOptions = {}): Promise<void> {
    this.#writable(offset, length);
    await this.#aio(`discard of ${length} bytes at ${offset}`, 'rbd_aio_discard', (c) => this.native.aioDiscard(this.handle, offset, length, c), null, opts);
  }

  /**
   * `rbd_aio_write_zeroes`: the whole range reads as zeros afterwards; librbd runs it as a
   * discard with granularity 0 (whole objects dropped, partial ranges zeroed).
   */
  async writeZeroes(offset: number, length: number, opts: RbdOpOptions = {}): Promise<void> {
    this.#writable(offset, length);
    await this.#aio(`write-zeroes of ${length} bytes at ${offset}`, 'rbd_aio_write_zeroes', (c) => this.native.aioWriteZeroes(this.handle, offset, length, c), null, opts);
  }

  /** `rbd_aio_flush`: resolves once the writes completed before it are stable. */
  async flush(opts: RbdOpOptions = {}): Promise<void> {
    await this.#aio('flush', 'rbd_aio_flush', (c) => this.native.aioFlush(this.handle, c), null, opts);
  }

  #writable(offset: number, length: number): void {
    checkByteCount('offset', offset);
    checkByteCount('length', length);
    if (this.readOnly) throw new SparsevirtError('ERR_ACCESS_DENIED', `RBD image '${this.pool.name}/${this.name}' is open read-only`);
    // librbd clips I/O at the end of the image: what lies past it would be lost silently
    if (offset + length > this.#size) {
      throw new SparsevirtError('ERR_INVALID_ARG', `range ${offset}+${length} is past the end of RBD image '${this.pool.name}/${this.name}' (${this.#size} bytes)`);
    }
  }

  /** Resolves when no operation is in flight. */
  idle(): Promise<void> {
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idle.push(resolve));
  }

  /**
   * Waits for the operations in flight (at most the deadline: librbd's close waits for what is
   * left), then closes (`rbd_close`, off the event loop). Idempotent.
   */
  close(): Promise<void> {
    this.#closed ??= (async () => {
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([this.idle(), new Promise<void>((resolve) => (timer = setTimeout(resolve, this.#deadlineMs)))]);
      clearTimeout(timer);
      const r = await this.native.close(this.handle);
      this.#forget();
      if (r < 0) throw cephError(`failed to close RBD image '${this.name}'`, r, 'rbd_close');
    })();
    return this.#closed;
  }
}
