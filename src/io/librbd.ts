/**
 * librados and librbd (Ceph's C API), bound through koffi on first use.
 *
 * Loading is lazy and never throws at import: a process that never touches an RBD pool never
 * loads Ceph, and one where the libraries are missing gets a `SparsevirtError` ERR_UNSUPPORTED
 * naming the Debian packages (librados2, librbd1) when it first asks for them; nothing else
 * in the process is affected.
 *
 * Threads. Calls that may wait on the network (connect, open, close, list, create, remove,
 * resize, stats, diff iteration) are made with koffi's `.async`, which runs them on a libuv
 * thread-pool thread: the event loop never waits for a monitor or an OSD. At most
 * `CEPH_CALL_THREADS` of them run at once, so that hung calls (an unreachable cluster, until
 * its timeouts) leave the rest of the thread pool (4 threads by default) to the file system.
 * Calls that only read the image's in-memory state (`rbd_stat`, `rbd_get_features`, …) and the
 * aio submissions stay synchronous: they do not wait on the network.
 *
 * Completions. An aio operation's completion is created without a callback and the image is
 * given an event pipe (`rbd_set_image_notification`, EVENT_TYPE_PIPE): librbd queues each
 * completed operation on the image and writes a byte into the pipe; the event loop reads the
 * pipe like a socket and takes every completed operation at once (`rbd_poll_io_events`). No
 * librbd thread ever waits for JS. (A callback made by `koffi.register` would be called on
 * librbd's single op thread, which would then wait for the event loop at every operation:
 * completions, and the internal work queued behind them, would advance one event-loop turn at
 * a time.) Where the pipe cannot be made, the completion gets such a callback instead. The
 * pipe keeps the event loop alive while operations are in flight (a relayed callback does not:
 * there the operations' deadline timers do).
 * Calls of the diff-iteration callback come from the thread-pool thread running
 * `rbd_diff_iterate2`, relayed to the event loop by koffi (that thread waits meanwhile), so
 * the JS side never waits synchronously for librbd work: a sync `rbd_close` could wait for a
 * thread that waits for the event loop; such calls go through `.async`.
 */
import { closeSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Socket, type SocketConstructorOpts } from 'node:net';
import util from 'node:util';
import { SparsevirtError, bigToSafe } from '../errors.js';
import { makePipe } from './sys.js';

type Koffi = typeof import('koffi');
type Lib = import('koffi').LibraryHandle;
type Fn = ReturnType<Lib['func']>;
/** A native pointer as koffi hands it back (an opaque external), or null. */
export type Ptr = unknown;

/** Debian packages that provide the libraries. */
export const CEPH_PACKAGES = ['librados2', 'librbd1'] as const;

/** Most Ceph calls running on the libuv thread pool at once. */
export const CEPH_CALL_THREADS = 2;

/** `rbd_set_image_notification`'s type for a pipe (librbd writes one byte per completion). */
const EVENT_TYPE_PIPE = 1;
/** Completions taken per `rbd_poll_io_events` call. */
const POLL_BATCH = 64;
/** `rbd_image_info_t` is 160 bytes on 64-bit Linux: size, obj_size, num_objs (u64), order (int), … */
const IMAGE_INFO_SIZE = 160;
/** `rbd_image_spec_t`: two pointers (id, name). */
const IMAGE_SPEC_SIZE = 16;
/** `rbd_snap_info_t`: id, size (u64), name (pointer). */
const SNAP_INFO_SIZE = 24;

export const RBD_FEATURE_LAYERING = 1n << 0n;
export const RBD_FEATURE_EXCLUSIVE_LOCK = 1n << 2n;
export const RBD_FEATURE_OBJECT_MAP = 1n << 3n;
export const RBD_FEATURE_FAST_DIFF = 1n << 4n;
export const RBD_FEATURE_DEEP_FLATTEN = 1n << 5n;
export const RBD_FLAG_FAST_DIFF_INVALID = 1n << 1n;

export interface ClusterStat {
  kb: bigint;
  kbUsed: bigint;
  kbAvail: bigint;
  numObjects: bigint;
}

export interface PoolStat {
  numBytes: bigint;
  numKb: bigint;
  numObjects: bigint;
}

export interface ImageInfo {
  size: number;
  objectSize: number;
  numObjects: number;
  order: number;
}

export interface SnapInfo {
  id: bigint;
  size: number;
  name: string;
}

/** One extent reported by `rbd_diff_iterate2`. */
export interface DiffExtent {
  offset: number;
  length: number;
  exists: boolean;
}

/** The bound libraries. Results are `-errno` on failure, as in C. */
export interface CephNative {
  koffi: Koffi;
  create2(name: string): { r: number; cluster: Ptr };
  confSet(cluster: Ptr, option: string, value: string): number;
  confGet(cluster: Ptr, option: string): string | null;
  connect(cluster: Ptr): Promise<number>;
  shutdown(cluster: Ptr): Promise<void>;
  ioctxCreate(cluster: Ptr, pool: string): Promise<{ r: number; ioctx: Ptr }>;
  ioctxDestroy(ioctx: Ptr): Promise<void>;
  clusterStat(cluster: Ptr): Promise<{ r: number; stat: ClusterStat }>;
  poolStat(ioctx: Ptr): Promise<{ r: number; stat: PoolStat }>;

  create(ioctx: Ptr, name: string, size: number, features: bigint | null, order: number): Promise<number>;
  list(ioctx: Ptr): Promise<{ r: number; names: string[] }>;
  remove(ioctx: Ptr, name: string): Promise<number>;
  open(ioctx: Ptr, name: string, snap: string | null, readOnly: boolean): Promise<{ r: number; image: Ptr }>;
  close(image: Ptr): Promise<number>;
  resize(image: Ptr, size: number): Promise<number>;
  stat(image: Ptr): { r: number; info: ImageInfo };
  getFeatures(image: Ptr): { r: number; value: bigint };
  getFlags(image: Ptr): { r: number; value: bigint };
  getStripeUnit(image: Ptr): { r: number; value: bigint };
  getStripeCount(image: Ptr): { r: number; value: bigint };
  snapList(image: Ptr): Promise<{ r: number; snaps: SnapInfo[] }>;
  snapCreate(image: Ptr, name: string): Promise<number>;
  snapRemove(image: Ptr, name: string): Promise<number>;
  snapProtect(image: Ptr, name: string): Promise<number>;
  snapUnprotect(image: Ptr, name: string): Promise<number>;
  snapIsProtected(image: Ptr, name: string): Promise<{ r: number; value: boolean }>;
  clone2(parentIo: Ptr, parent: string, snap: string, childIo: Ptr, child: string, features: bigint, stripeUnit: bigint, stripeCount: bigint): Promise<number>;
  copy(image: Ptr, destIo: Ptr, dest: string, sparseSize: number): Promise<number>;
  /**
   * `rbd_diff_iterate2` over [offset, offset+length): `onExtent` gets each extent (return
   * false to stop: the call then ends with ECANCELED). Resolves with the call's result.
   */
  diffIterate(image: Ptr, fromSnap: string | null, offset: number, length: number, includeParent: boolean, wholeObject: boolean, onExtent: (e: DiffExtent) => boolean): Promise<number>;

  /**
   * Start an aio operation: `start(op)` submits it through one of the `aio…` calls below, with
   * `op` as its last argument (returns that call's result). `done(ret)` is called once, on the
   * event loop, with the completion's return value, or with the submit call's negative result.
   */
  aio(start: (op: Ptr) => number, done: (ret: number) => void): void;
  /** Completions taken from an image's event pipe, and completions that called back (tests, stats). */
  readonly completions: { polled: number; calledBack: number };
  aioRead(image: Ptr, offset: number, buf: Buffer, op: Ptr): number;
  aioWritev(image: Ptr, offset: number, bufs: readonly Buffer[], op: Ptr): number;
  aioDiscard(image: Ptr, offset: number, length: number, op: Ptr): number;
  aioWriteZeroes(image: Ptr, offset: number, length: number, op: Ptr): number;
  aioFlush(image: Ptr, op: Ptr): number;
}

let names = { rados: 'librados.so.2', rbd: 'librbd.so.1' };
let loaded: CephNative | undefined;

/**
 * For tests: load the libraries under other names (a missing one shows the error path), or
 * `null` for the real ones. Takes effect for the next `cephNative()`; a binding already loaded
 * with the real names is kept for them.
 */
export function setCephLibraryNames(n: { rados: string; rbd: string } | null): void {
  names = n ?? { rados: 'librados.so.2', rbd: 'librbd.so.1' };
}

/** The bindings, loaded on first use. Throws ERR_UNSUPPORTED naming the packages when missing. */
export function cephNative(): CephNative {
  const real = names.rados === 'librados.so.2' && names.rbd === 'librbd.so.1';
  if (real && loaded) return loaded;
  const bound = load(names.rados, names.rbd);
  if (real) loaded = bound;
  return bound;
}

/** Whether librados and librbd can be loaded here (loads them). */
export function cephAvailable(): boolean {
  try {
    cephNative();
    return true;
  } catch {
    return false;
  }
}

function missing(what: string, err: unknown): SparsevirtError {
  const detail = err instanceof Error ? err.message : String(err);
  return new SparsevirtError(
    'ERR_UNSUPPORTED',
    `Ceph RBD pools need librados and librbd, which could not be loaded (${what}: ${detail}); ` +
      `install the Debian packages ${CEPH_PACKAGES.join(' and ')} (apt-get install ${CEPH_PACKAGES.join(' ')})`,
    { cause: err },
  );
}

// koffi's type names are process-wide: the types are declared once, whatever loads after.
let types: { iovec: unknown; completionCb: unknown; diffCb: unknown } | undefined;

function declareTypes(koffi: Koffi): NonNullable<typeof types> {
  types ??= {
    iovec: koffi.struct('sv_rbd_iovec', { base: 'void *', len: 'size_t' }),
    completionCb: koffi.proto('void sv_rbd_completion_cb(uintptr_t completion, void *arg)'),
    diffCb: koffi.proto('int sv_rbd_diff_cb(uint64_t offset, size_t length, int exists, void *arg)'),
  };
  return types;
}

/** koffi gives u64 results as numbers, or BigInt past 2^53. */
function big(v: unknown): bigint {
  return typeof v === 'bigint' ? v : BigInt(v as number);
}

/** Bounds the Ceph calls on the thread pool (see CEPH_CALL_THREADS). */
class Gate {
  #free: number;
  readonly #waiting: Array<() => void> = [];
  constructor(n: number) {
    this.#free = n;
  }
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.#free > 0) this.#free--;
    else await new Promise<void>((resolve) => this.#waiting.push(resolve));
    try {
      return await fn();
    } finally {
      const next = this.#waiting.shift();
      if (next) next();
      else this.#free++;
    }
  }
}

function load(radosName: string, rbdName: string): CephNative {
  let koffi: Koffi;
  try {
    koffi = createRequire(import.meta.url)('koffi') as Koffi;
  } catch (err) {
    throw missing('the koffi module', err);
  }
  let rados: Lib;
  let rbd: Lib;
  try {
    rados = koffi.load(radosName);
  } catch (err) {
    throw missing(radosName, err);
  }
  try {
    rbd = koffi.load(rbdName);
  } catch (err) {
    throw missing(rbdName, err);
  }
  const T = declareTypes(koffi);
  const gate = new Gate(CEPH_CALL_THREADS);

  // Runs `fn` on the thread pool; resolves with its result.
  const async = <R>(fn: Fn, ...args: unknown[]): Promise<R> =>
    gate.run(() => new Promise<R>((resolve, reject) => {
      fn.async(...args, (err: unknown, res: R) => (err ? reject(err) : resolve(res)));
    }));

  // librados
  const rados_create2 = rados.func('int rados_create2(_Out_ void **cluster, const char *clustername, const char *name, uint64_t flags)');
  const rados_conf_set = rados.func('int rados_conf_set(void *cluster, const char *option, const char *value)');
  const rados_conf_get = rados.func('int rados_conf_get(void *cluster, const char *option, void *buf, size_t len)');
  const rados_connect = rados.func('int rados_connect(void *cluster)');
  const rados_shutdown = rados.func('void rados_shutdown(void *cluster)');
  const rados_ioctx_create = rados.func('int rados_ioctx_create(void *cluster, const char *pool, _Out_ void **ioctx)');
  const rados_ioctx_destroy = rados.func('void rados_ioctx_destroy(void *ioctx)');
  const rados_cluster_stat = rados.func('int rados_cluster_stat(void *cluster, void *result)');
  const rados_ioctx_pool_stat = rados.func('int rados_ioctx_pool_stat(void *ioctx, void *stats)');

  // librbd
  const rbd_create = rbd.func('int rbd_create(void *io, const char *name, uint64_t size, _Inout_ int *order)');
  const rbd_create2 = rbd.func('int rbd_create2(void *io, const char *name, uint64_t size, uint64_t features, _Inout_ int *order)');
  const rbd_list2 = rbd.func('int rbd_list2(void *io, void *images, _Inout_ size_t *max_images)');
  const rbd_image_spec_list_cleanup = rbd.func('void rbd_image_spec_list_cleanup(void *images, size_t num_images)');
  const rbd_remove = rbd.func('int rbd_remove(void *io, const char *name)');
  const rbd_open = rbd.func('int rbd_open(void *io, const char *name, _Out_ void **image, const char *snap_name)');
  const rbd_open_read_only = rbd.func('int rbd_open_read_only(void *io, const char *name, _Out_ void **image, const char *snap_name)');
  const rbd_close = rbd.func('int rbd_close(void *image)');
  const rbd_resize = rbd.func('int rbd_resize(void *image, uint64_t size)');
  const rbd_stat = rbd.func('int rbd_stat(void *image, void *info, size_t infosize)');
  const rbd_get_features = rbd.func('int rbd_get_features(void *image, _Out_ uint64_t *features)');
  const rbd_get_flags = rbd.func('int rbd_get_flags(void *image, _Out_ uint64_t *flags)');
  const rbd_get_stripe_unit = rbd.func('int rbd_get_stripe_unit(void *image, _Out_ uint64_t *stripe_unit)');
  const rbd_get_stripe_count = rbd.func('int rbd_get_stripe_count(void *image, _Out_ uint64_t *stripe_count)');
  const rbd_snap_list = rbd.func('int rbd_snap_list(void *image, void *snaps, _Inout_ int *max_snaps)');
  const rbd_snap_list_end = rbd.func('void rbd_snap_list_end(void *snaps)');
  const rbd_snap_create = rbd.func('int rbd_snap_create(void *image, const char *snapname)');
  const rbd_snap_remove = rbd.func('int rbd_snap_remove(void *image, const char *snapname)');
  const rbd_snap_protect = rbd.func('int rbd_snap_protect(void *image, const char *snap_name)');
  const rbd_snap_unprotect = rbd.func('int rbd_snap_unprotect(void *image, const char *snap_name)');
  const rbd_snap_is_protected = rbd.func('int rbd_snap_is_protected(void *image, const char *snap_name, _Out_ int *is_protected)');
  const rbd_clone2 = rbd.func('int rbd_clone2(void *p_ioctx, const char *p_name, const char *p_snapname, void *c_ioctx, const char *c_name, uint64_t features, _Inout_ int *c_order, uint64_t stripe_unit, int stripe_count)');
  const rbd_image_options_create = rbd.func('void rbd_image_options_create(_Out_ void **opts)');
  const rbd_image_options_destroy = rbd.func('void rbd_image_options_destroy(void *opts)');
  const rbd_copy4 = rbd.func('int rbd_copy4(void *src, void *dest_io, const char *destname, void *dest_opts, size_t sparse_size)');
  const rbd_diff_iterate2 = rbd.func('int rbd_diff_iterate2(void *image, const char *fromsnapname, uint64_t ofs, uint64_t len, uint8_t include_parent, uint8_t whole_object, sv_rbd_diff_cb *cb, void *arg)');
  // completions are handled by address (a number): they come back as addresses from
  // rbd_poll_io_events too
  const rbd_aio_create_completion = rbd.func('int rbd_aio_create_completion(void *cb_arg, sv_rbd_completion_cb *complete_cb, _Out_ uintptr_t *c)');
  const rbd_aio_get_return_value = rbd.func('int64_t rbd_aio_get_return_value(uintptr_t c)');
  const rbd_aio_release = rbd.func('void rbd_aio_release(uintptr_t c)');
  const rbd_aio_read2 = rbd.func('int rbd_aio_read2(void *image, uint64_t off, size_t len, void *buf, uintptr_t c, int op_flags)');
  const rbd_aio_writev = rbd.func('int rbd_aio_writev(void *image, const sv_rbd_iovec *iov, int iovcnt, uint64_t off, uintptr_t c)');
  const rbd_aio_discard = rbd.func('int rbd_aio_discard(void *image, uint64_t off, uint64_t len, uintptr_t c)');
  const rbd_aio_write_zeroes = rbd.func('int rbd_aio_write_zeroes(void *image, uint64_t off, size_t len, uintptr_t c, int zero_flags, int op_flags)');
  const rbd_aio_flush = rbd.func('int rbd_aio_flush(void *image, uintptr_t c)');
  const rbd_set_image_notification = rbd.func('int rbd_set_image_notification(void *image, int fd, int type)');
  const rbd_poll_io_events = rbd.func('int rbd_poll_io_events(void *image, void *comps, int numcomp)');

  /** An operation between `aio()` and its completion. */
  interface Op {
    done: (ret: number) => void;
    /** The image's event pipe, or null where the completion calls back instead. */
    events: Events | null;
  }
  /** An image's event pipe (see the module comment). */
  interface Events {
    image: Ptr;
    key: bigint;
    socket: Socket;
    writeFd: number;
    /** Completions taken per rbd_poll_io_events call land here (addresses). */
    polled: Buffer;
    inFlight: number;
    /** rbd_close is running: the image may be gone under a poll. */
    closing: boolean;
  }
  const pending = new Map<number, Op>();
  const events = new Map<bigint, Events>();
  const completions = { polled: 0, calledBack: 0 };

  const finish = (c: number): void => {
    const op = pending.get(c);
    if (!op) return;
    pending.delete(c);
    const ret = Number(rbd_aio_get_return_value(c));
    rbd_aio_release(c);
    if (op.events && --op.events.inFlight === 0) op.events.socket.unref();
    op.done(ret);
  };

  const drain = (ev: Events): void => {
    while (!ev.closing) {
      const n = rbd_poll_io_events(ev.image, ev.polled, POLL_BATCH) as number;
      completions.polled += Math.max(0, n);
      for (let i = 0; i < n; i++) finish(Number(ev.polled.readBigUInt64LE(i * 8)));
      if (n < POLL_BATCH) break;
    }
  };

  /** The image's event pipe, made on its first operation; null where it cannot be made. */
  const eventsOf = (image: Ptr): Events | null => {
    const key = koffi.address(image) as bigint;
    const have = events.get(key);
    if (have) return have;
    const fds = makePipe(0);
    if (typeof fds === 'number') return null;
    if ((rbd_set_image_notification(image, fds[1], EVENT_TYPE_PIPE) as number) < 0) {
      closeSync(fds[0]);
      closeSync(fds[1]);
      return null;
    }
    const scratch = Buffer.allocUnsafe(256);
    let ev: Events | undefined;
    // the bytes only say "something completed": each read drains every completion queued
    // (`onread` is taken by the constructor at run time; @types/node does not list it there)
    const onread = { buffer: scratch, callback: () => (ev ? drain(ev) : undefined) };
    const socket = new Socket({ fd: fds[0], readable: true, writable: false, onread } as unknown as SocketConstructorOpts);
    socket.on('error', () => undefined);
    socket.unref();
    ev = { image, key, socket, writeFd: fds[1], polled: Buffer.alloc(POLL_BATCH * 8), inFlight: 0, closing: false };
    events.set(key, ev);
    return ev;
  };

  // Where an image has no event pipe: one registered callback for every completion.
  const completionCb = koffi.register((c: number | bigint) => {
    completions.calledBack++;
    finish(Number(c));
  }, koffi.pointer(T.completionCb as never));

  /** Creates the completion for `op` on `image` and submits the operation with `call`. */
  const submit = (image: Ptr, opArg: Ptr, call: (c: number) => number): number => {
    const op = opArg as Op;
    const ev = eventsOf(image);
    const box: [number] = [0];
    const rc = rbd_aio_create_completion(null, ev ? null : completionCb, box) as number;
    if (rc < 0) return rc;
    const c = box[0];
    pending.set(c, op);
    let r: number;
    try {
      r = call(c);
    } catch (err) {
      // koffi refused the arguments: nothing was submitted
      pending.delete(c);
      rbd_aio_release(c);
      throw err;
    }
    // a submit call that fails returns before it touches the completion: it is ours to release
    if (r < 0) {
      pending.delete(c);
      rbd_aio_release(c);
      return r;
    }
    if (ev) {
      op.events = ev;
      if (ev.inFlight++ === 0) ev.socket.ref();
    }
    return r;
  };

  // One registered diff callback; each running iteration has an id.
  const diffs = new Map<number, (e: DiffExtent) => boolean>();
  let nextDiff = 1;
  const diffCb = koffi.register((offset: number | bigint, length: number | bigint, exists: number, arg: Ptr) => {
    const on = diffs.get(Number(koffi.address(arg)));
    if (!on) return -125;
    try {
      return on({ offset: bigToSafe('diff offset', big(offset)), length: bigToSafe('diff length', big(length)), exists: exists !== 0 }) ? 0 : -125;
    } catch {
      return -125;
    }
  }, koffi.pointer(T.diffCb as never));

  const idArg = (id: number): unknown => koffi.as(id, 'void *');

  const u64Getter = (fn: Fn) => (image: Ptr): { r: number; value: bigint } => {
    const box: [number | bigint] = [0];
    const r = fn(image, box) as number;
    return { r, value: big(box[0]) };
  };

  return {
    koffi,
    completions,
    create2(name) {
      const box: [Ptr] = [null];
      const r = rados_create2(box, 'ceph', name, 0) as number;
      return { r, cluster: box[0] };
    },
    confSet: (cluster, option, value) => rados_conf_set(cluster, option, value) as number,
    confGet(cluster, option) {
      const buf = Buffer.alloc(4096);
      const r = rados_conf_get(cluster, option, buf, buf.length) as number;
      if (r < 0) return null;
      const end = buf.indexOf(0);
      return buf.toString('utf8', 0, end < 0 ? buf.length : end);
    },
    connect: (cluster) => async<number>(rados_connect, cluster),
    shutdown: (cluster) => async<void>(rados_shutdown, cluster),
    async ioctxCreate(cluster, pool) {
      const box: [Ptr] = [null];
      const r = await async<number>(rados_ioctx_create, cluster, pool, box);
      return { r, ioctx: box[0] };
    },
    ioctxDestroy: (ioctx) => async<void>(rados_ioctx_destroy, ioctx),
    async clusterStat(cluster) {
      const buf = Buffer.alloc(32);
      const r = await async<number>(rados_cluster_stat, cluster, buf);
      return {
        r,
        stat: { kb: buf.readBigUInt64LE(0), kbUsed: buf.readBigUInt64LE(8), kbAvail: buf.readBigUInt64LE(16), numObjects: buf.readBigUInt64LE(24) },
      };
    },
    async poolStat(ioctx) {
      const buf = Buffer.alloc(16 * 8);
      const r = await async<number>(rados_ioctx_pool_stat, ioctx, buf);
      return { r, stat: { numBytes: buf.readBigUInt64LE(0), numKb: buf.readBigUInt64LE(8), numObjects: buf.readBigUInt64LE(16) } };
    },

    create(ioctx, name, size, features, order) {
      const orderBox: [number] = [order];
      return features === null
        ? async<number>(rbd_create, ioctx, name, size, orderBox)
        : async<number>(rbd_create2, ioctx, name, size, features, orderBox);
    },
    async list(ioctx) {
      for (let max = 64; ;) {
        const buf = Buffer.alloc(max * IMAGE_SPEC_SIZE);
        const box: [number] = [max];
        const r = await async<number>(rbd_list2, ioctx, buf, box);
        if (r === -34 /* ERANGE */ && box[0] > max) {
          max = box[0];
          continue;
        }
        if (r < 0) return { r, names: [] };
        const n = box[0];
        const out: string[] = [];
        for (let i = 0; i < n; i++) {
          const namePtr = koffi.decode(buf, i * IMAGE_SPEC_SIZE + 8, 'char *') as string | null;
          out.push(namePtr ?? '');
        }
        rbd_image_spec_list_cleanup(buf, n);
        return { r: 0, names: out };
      }
    },
    remove: (ioctx, name) => async<number>(rbd_remove, ioctx, name),
    async open(ioctx, name, snap, readOnly) {
      const box: [Ptr] = [null];
      const r = await async<number>(readOnly ? rbd_open_read_only : rbd_open, ioctx, name, box, snap);
      return { r, image: box[0] };
    },
    async close(image) {
      const ev = events.get(koffi.address(image) as bigint);
      if (ev) {
        drain(ev);
        ev.closing = true;
      }
      const r = await async<number>(rbd_close, image);
      if (ev) {
        events.delete(ev.key);
        ev.socket.destroy();
        closeSync(ev.writeFd);
        // rbd_close waited for the operations still in flight: their completions are done
        for (const [c, op] of pending) {
          if (op.events !== ev) continue;
          if (r >= 0) finish(c);
          else {
            pending.delete(c);
            op.done(r);
          }
        }
      }
      return r;
    },
    resize: (image, size) => async<number>(rbd_resize, image, size),
    stat(image) {
      const buf = Buffer.alloc(IMAGE_INFO_SIZE);
      const r = rbd_stat(image, buf, IMAGE_INFO_SIZE) as number;
      return {
        r,
        info: {
          size: bigToSafe('image size', buf.readBigUInt64LE(0)),
          objectSize: bigToSafe('object size', buf.readBigUInt64LE(8)),
          numObjects: bigToSafe('object count', buf.readBigUInt64LE(16)),
          order: buf.readInt32LE(24),
        },
      };
    },
    getFeatures: u64Getter(rbd_get_features),
    getFlags: u64Getter(rbd_get_flags),
    getStripeUnit: u64Getter(rbd_get_stripe_unit),
    getStripeCount: u64Getter(rbd_get_stripe_count),
    async snapList(image) {
      for (let max = 16; ;) {
        const buf = Buffer.alloc((max + 1) * SNAP_INFO_SIZE);
        const box: [number] = [max];
        const r = await async<number>(rbd_snap_list, image, buf, box);
        if (r === -34 /* ERANGE */) {
          max = Math.max(box[0], max * 2);
          continue;
        }
        if (r < 0) return { r, snaps: [] };
        const snaps: SnapInfo[] = [];
        for (let i = 0; i < r; i++) {
          snaps.push({
            id: buf.readBigUInt64LE(i * SNAP_INFO_SIZE),
            size: bigToSafe('snapshot size', buf.readBigUInt64LE(i * SNAP_INFO_SIZE + 8)),
            name: (koffi.decode(buf, i * SNAP_INFO_SIZE + 16, 'char *') as string | null) ?? '',
          });
        }
        rbd_snap_list_end(buf);
        return { r: 0, snaps };
      }
    },
    snapCreate: (image, name) => async<number>(rbd_snap_create, image, name),
    snapRemove: (image, name) => async<number>(rbd_snap_remove, image, name),
    snapProtect: (image, name) => async<number>(rbd_snap_protect, image, name),
    snapUnprotect: (image, name) => async<number>(rbd_snap_unprotect, image, name),
    async snapIsProtected(image, name) {
      const box: [number] = [0];
      const r = await async<number>(rbd_snap_is_protected, image, name, box);
      return { r, value: box[0] !== 0 };
    },
    clone2(parentIo, parent, snap, childIo, child, features, stripeUnit, stripeCount) {
      const order: [number] = [0];
      return async<number>(rbd_clone2, parentIo, parent, snap, childIo, child, features, order, stripeUnit, Number(stripeCount));
    },
    async copy(image, destIo, dest, sparseSize) {
      const box: [Ptr] = [null];
      rbd_image_options_create(box);
      try {
        return await async<number>(rbd_copy4, image, destIo, dest, box[0], sparseSize);
      } finally {
        rbd_image_options_destroy(box[0]);
      }
    },
    async diffIterate(image, fromSnap, offset, length, includeParent, wholeObject, onExtent) {
      const id = nextDiff;
      nextDiff = nextDiff >= 0x7fffffff ? 1 : nextDiff + 1;
      diffs.set(id, onExtent);
      try {
        return await async<number>(rbd_diff_iterate2, image, fromSnap, offset, length, includeParent ? 1 : 0, wholeObject ? 1 : 0, diffCb, idArg(id));
      } finally {
        diffs.delete(id);
      }
    },

    aio(start, done) {
      const op: Op = { done, events: null };
      const r = start(op);
      if (r < 0) done(r);
    },
    aioRead: (image, offset, buf, op) => submit(image, op, (c) => rbd_aio_read2(image, offset, buf.length, buf, c, 0) as number),
    aioWritev: (image, offset, bufs, op) => {
      const iov = bufs.map((b) => ({ base: b, len: b.length }));
      return submit(image, op, (c) => rbd_aio_writev(image, iov, bufs.length, offset, c) as number);
    },
    aioDiscard: (image, offset, length, op) => submit(image, op, (c) => rbd_aio_discard(image, offset, length, c) as number),
    aioWriteZeroes: (image, offset, length, op) => submit(image, op, (c) => rbd_aio_write_zeroes(image, offset, length, c, 0, 0) as number),
    aioFlush: (image, op) => submit(image, op, (c) => rbd_aio_flush(image, c) as number),
  };
}

/** `ENOENT`, `ETIMEDOUT`, … for a `-errno` result. */
export function errnoName(negErrno: number): string {
  try {
    return util.getSystemErrorName(negErrno);
  } catch {
    return `errno ${-negErrno}`;
  }
}

/** "No such file or directory" for a `-errno` result. */
export function errnoText(negErrno: number): string {
  return util.getSystemErrorMap().get(negErrno)?.[1] ?? errnoName(negErrno);
}

/** A Node-style system error for a `-errno` result (the `cause` of the errors thrown here). */
export function cephErrno(negErrno: number, call: string): NodeJS.ErrnoException {
  const err: NodeJS.ErrnoException = new Error(`${errnoName(negErrno)}: ${errnoText(negErrno)}, ${call}`);
  err.code = errnoName(negErrno);
  err.errno = negErrno;
  err.syscall = call;
  return err;
}
