/**
 * RBD image ⇄ chunks, the primitives a sparse `vol-download` / `vol-upload` on an RBD pool runs
 * on.
 *
 * Reading: the allocated extents come from `rbd_diff_iterate2` (since creation, parent
 * included, whole_object off), a window at a time (the next window is asked for while the
 * current one is read); the rest is holes. Extents are read with aio in pieces that end on
 * multiples of `readSize`, up to `depth` reads and `maxBytesInFlight` bytes in flight, handed
 * on in order. An object store may report more than was written (memstore reports from the
 * start of an object to the end of its data), so `detectZeroes` turns all-zero pieces inside
 * reported extents into holes as well. A read whose data is small (at most a quarter of it:
 * scattered 4 KiB extents) is copied out into slabs and its buffer read into again; the data of
 * a dense read goes on as views of its buffer, lent to the wire: once a connection has written
 * all of it to its socket, the buffer is read into again (a download reuses the buffers it has in
 * flight, never one per read).
 *
 * Writing: data is written with aio (`rbd_aio_writev`, contiguous chunks gathered without
 * copying into writes that end on multiples of `writeSize`, the object size: one request per
 * object), up to `depth` operations and `maxBytesInFlight` bytes in flight; `release` gets the
 * buffers back once written. A hole must read as zeros afterwards whatever the image held
 * there, and should not stay allocated: it becomes an `rbd_aio_discard` where it starts and ends
 * on the discard granularity (librbd leaves a discard's unaligned edges as they were), else an
 * `rbd_aio_write_zeroes` (zeroes exactly, whole objects dropped). On an image known to read as
 * zeros (`zeroed`, e.g. just created), holes cost nothing, as `rbd import` skips them. The
 * writes end with `rbd_aio_flush`.
 *
 * Memory is bounded by `maxBytesInFlight` (and one read or write more) whatever the image's size.
 * Every operation has a deadline (the pool's), so a vanished OSD fails the transfer within a
 * bounded time (ERR_TIMEOUT, or ERR_IO with Ceph's ETIMEDOUT).
 */
import { LEGACY_PAYLOAD_MAX, chunkLength, type Chunk } from '../../chunk.js';
import { SparsevirtError, checkByteCount } from '../../errors.js';
import { lendToWire, releaseFramePayloads } from '../../io/pools.js';
import { zeroDetection } from '../../sparse/extents.js';
import { abortError } from '../../sparse/file.js';
import { zeroBytes, ZERO_CHUNK_SIZE } from '../../stream/zeros.js';
import type { RbdImage } from './pool.js';

export interface RbdReadOptions {
  /** First byte (default 0). */
  offset?: number;
  /** Bytes (default: to the end); clipped to the image's size. */
  length?: number;
  /** Holes as hole chunks (default); false: as zero data. */
  sparse?: boolean;
  /** Largest data chunk (default 262120, libvirt's stream payload). */
  chunkSize?: number;
  /** Reads in flight at once (default 32) … */
  depth?: number;
  /** … and bytes (default 16 MiB; at least one read). */
  maxBytesInFlight?: number;
  /** Bytes per read (default 1 MiB; reads end on multiples of it). */
  readSize?: number;
  /** Bytes of the image per `rbd_diff_iterate2` call (default 256 MiB). */
  windowSize?: number;
  /**
   * Report all-zero pieces of `minRun` bytes (default 4096, aligned to image offsets) inside
   * the extents librbd reports as holes too.
   */
  detectZeroes?: boolean | { minRun?: number };
  signal?: AbortSignal;
}

export interface RbdWriteOptions {
  /** Where the first chunk lands (default 0). */
  offset?: number;
  /**
   * Object requests in flight at once (default 512): a write counts one, a discard or write-zeroes
   * one per object it spans …
   */
  depth?: number;
  /** … and bytes of data (default 16 MiB; at least one write). */
  maxBytesInFlight?: number;
  /**
   * Contiguous data is gathered into writes that end at multiples of this many bytes (default:
   * the image's object size, so that a write is one object's request).
   */
  writeSize?: number;
  /** The image reads as zeros where holes come (just created): holes are skipped. */
  zeroed?: boolean;
  /** `rbd_aio_flush` at the end (default true). */
  flush?: boolean;
  /**
   * Called with data buffers once librbd has written them (never for a failed write: after a
   * deadline librbd may still hold its buffers). Default `releaseFramePayloads`: the frame
   * buffers of a received stream go back to their pool (other buffers are left alone), so an
   * upload reuses the ~64 frame buffers of the pool instead of leaving one per packet to the
   * garbage collector. null: nothing is handed back.
   */
  release?: ((buffers: Buffer[]) => void) | null;
  signal?: AbortSignal;
}

export interface RbdWriteResult {
  dataBytes: number;
  holeBytes: number;
}

/** Small operations need many in flight (each is a round trip to an OSD); large ones are bounded by bytes. */
const DEFAULT_DEPTH = 32;
/**
 * Writes scattered in 4 KiB pieces are each an OSD round trip: with 32 in flight, the upload of
 * 100,000 of them (bench image c) took 25.5 s and left a third of the machine idle; with 512,
 * 16.9 s, about `rbd import`'s time on the same cluster. Data bytes stay bounded by
 * `maxBytesInFlight`, holes by the objects they span.
 */
const DEFAULT_WRITE_DEPTH = 512;
const DEFAULT_BYTES_IN_FLIGHT = 16 << 20;
/**
 * Reads of a whole object (4 MiB) would cost a quarter of the requests and completions, and
 * ~10 % of a dense download's CPU, but librbd then holds more: the daemon's peak RSS downloading
 * 8 GiB with 1 GiB of data went from 169 to 219-226 MiB (test/rbd-memory.test.ts).
 */
const DEFAULT_READ_SIZE = 1 << 20;
const DEFAULT_WRITE_SIZE = 4 << 20;
const DEFAULT_WINDOW = 256 << 20;
/** Largest single discard / write-zeroes: librbd makes one request per object in it. */
const HOLE_OP_OBJECTS = 64;

function positive(name: string, v: number | undefined, dflt: number): number {
  if (v === undefined) return dflt;
  if (!Number.isSafeInteger(v) || v < 1) throw new SparsevirtError('ERR_INVALID_ARG', `${name} must be a positive integer, got ${v}`);
  return v;
}

/** Extents of one window, sorted, merged, clipped to it (existing ones only). */
async function windowExtents(image: RbdImage, start: number, end: number): Promise<Array<[number, number]>> {
  const raw: Array<[number, number]> = [];
  await image.diff(start, end - start, {}, (e) => {
    if (e.exists && e.length > 0) {
      const a = Math.max(e.offset, start);
      const b = Math.min(e.offset + e.length, end);
      if (b > a) raw.push([a, b]);
    }
    return true;
  });
  raw.sort((x, y) => x[0] - y[0]);
  const out: Array<[number, number]> = [];
  for (const [a, b] of raw) {
    const last = out[out.length - 1];
    if (last && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

type Planned = { kind: 'hole'; length: number } | { kind: 'read'; offset: number; length: number };

/** The reads and holes of [start, end), in order, a window of extents at a time. */
async function* plan(image: RbdImage, start: number, end: number, windowSize: number, readSize: number): AsyncGenerator<Planned> {
  const fetch = (from: number): Promise<Array<[number, number]>> | null => {
    if (from >= end) return null;
    const p = windowExtents(image, from, Math.min(end, from + windowSize));
    p.catch(() => undefined);
    return p;
  };
  let pos = start;
  let next = fetch(start);
  for (let win = start; next; win += windowSize) {
    const extents = await next;
    next = fetch(win + windowSize);
    for (const [a, b] of extents) {
      if (a > pos) yield { kind: 'hole', length: a - pos };
      // reads end on multiples of readSize: aligned reads stay within as few objects as can be
      for (let off = a; off < b; ) {
        const to = Math.min(b, (Math.floor(off / readSize) + 1) * readSize);
        yield { kind: 'read', offset: off, length: to - off };
        off = to;
      }
      pos = b;
    }
    const winEnd = Math.min(end, win + windowSize);
    if (winEnd > pos) {
      yield { kind: 'hole', length: winEnd - pos };
      pos = winEnd;
    }
  }
}

/**
 * Read buffers of one size, reused: a read whose data was copied out (or that was all zeros)
 * gives its buffer back at once; one whose data went on as views is lent to the wire
 * (`lendToWire`) and comes back once a connection sent all of it. A consumer that is not a
 * connection keeps such a buffer (it is never reused). Nothing waits for a buffer: when none is
 * free, a new one is made, so the buffers in use are those the reads in flight and the consumer
 * hold, which its backpressure bounds.
 */
class ReadBuffers {
  readonly #free: Buffer[] = [];
  /** Buffers made so far. */
  made = 0;
  constructor(
    readonly size: number,
    readonly max: number,
  ) {}
  /** A buffer of `length` bytes (at most `size`) for the next read. */
  take(length: number): Buffer {
    let buf = this.#free.pop();
    if (buf === undefined) {
      buf = Buffer.allocUnsafeSlow(this.size);
      this.made++;
    }
    return length === buf.length ? buf : buf.subarray(0, length);
  }
  /** A buffer from `take` whose bytes are not referenced any more. */
  readonly give = (buf: Buffer): void => {
    if (this.#free.length < this.max) this.#free.push(buf.length === this.size ? buf : Buffer.from(buf.buffer, buf.byteOffset, this.size));
  };
}

/**
 * Small data copied out of read buffers lands in slabs, as Node's own pool does for small
 * buffers: 10,000 copies of 4 KiB are 160 allocations, not 10,000. A slab lives as long as a
 * copy in it is referenced.
 */
class CopySlab {
  static readonly SIZE = 256 << 10;
  #slab: Buffer | null = null;
  #used = 0;
  copy(src: Buffer): Buffer {
    const n = src.length;
    if (n > CopySlab.SIZE >>> 2) return Buffer.from(src);
    if (this.#slab === null || this.#used + n > CopySlab.SIZE) {
      this.#slab = Buffer.allocUnsafeSlow(CopySlab.SIZE);
      this.#used = 0;
    }
    const out = this.#slab.subarray(this.#used, this.#used + n);
    src.copy(out);
    this.#used = (this.#used + n + 7) & ~7;
    return out;
  }
}

/** A read whose data is at most this share of it is copied out, and its buffer read into again. */
const COPY_OUT_SHARE = 1 / 4;

/**
 * The data runs `[from, to)` of `buf` (image offset `offset`): pieces of `minRun` bytes aligned
 * to image offsets that are all zeros are left out.
 */
function dataRuns(buf: Buffer, offset: number, minRun: number): Array<[number, number]> {
  const runs: Array<[number, number]> = [];
  let from = -1;
  for (let at = 0; at < buf.length; ) {
    const end = Math.min(buf.length, (Math.floor((offset + at) / minRun) + 1) * minRun - offset);
    if (isZero(buf, at, end)) {
      if (from >= 0) runs.push([from, at]);
      from = -1;
    } else if (from < 0) {
      from = at;
    }
    at = end;
  }
  if (from >= 0) runs.push([from, buf.length]);
  return runs;
}

/** A completed read: its buffer, its data runs, and whether they are to be copied out. */
interface ReadDone {
  kind: 'read';
  offset: number;
  buf: Buffer;
  runs: Array<[number, number]>;
  /** The data is small (at most a quarter of the read): copied out, the buffer is free again. */
  copy: boolean;
}

interface ReadSettings {
  start: number;
  end: number;
  depth: number;
  maxBytes: number;
  readSize: number;
  windowSize: number;
  minRun: number | null;
  signal: AbortSignal | undefined;
}

function readSettings(image: RbdImage, opts: RbdReadOptions): ReadSettings {
  const start = checkByteCount('offset', opts.offset ?? 0);
  const readSize = positive('readSize', opts.readSize, DEFAULT_READ_SIZE);
  return {
    start,
    end: Math.min(image.size, opts.length === undefined ? image.size : start + checkByteCount('length', opts.length)),
    depth: positive('depth', opts.depth, DEFAULT_DEPTH),
    maxBytes: positive('maxBytesInFlight', opts.maxBytesInFlight, DEFAULT_BYTES_IN_FLIGHT),
    readSize,
    windowSize: Math.max(positive('windowSize', opts.windowSize, DEFAULT_WINDOW), readSize),
    minRun: zeroDetection(opts.detectZeroes)?.minRun ?? null,
    signal: opts.signal,
  };
}

/**
 * The reads and holes of the range in order, each read completed and its data runs found. The
 * next reads are in flight before one is handed on. A buffer comes back through
 * `buffers.give` (by the consumer, once done with it). Closing the iteration waits for the
 * reads in flight.
 */
async function* readsInOrder(image: RbdImage, o: ReadSettings, buffers: ReadBuffers): AsyncGenerator<ReadDone | { kind: 'hole'; length: number }> {
  const steps = plan(image, o.start, o.end, o.windowSize, o.readSize);
  type Queued = { kind: 'read'; offset: number; buf: Buffer; done: Promise<number> } | { kind: 'hole'; length: number };
  const queue: Queued[] = [];
  let reading = 0;
  let readingBytes = 0;
  let held: Planned | null = null;
  let planned = false;

  const fill = async (): Promise<void> => {
    // holes are free: the queue is bounded by reads, and by a few holes between them
    while (reading < o.depth && queue.length < o.depth * 4) {
      let step = held;
      held = null;
      if (!step) {
        if (planned) break;
        const r = await steps.next();
        if (r.done) {
          planned = true;
          break;
        }
        step = r.value;
      }
      if (step.kind === 'hole') {
        queue.push(step);
        continue;
      }
      if (reading > 0 && readingBytes + step.length > o.maxBytes) {
        held = step;
        break;
      }
      const buf = buffers.take(step.length);
      const done = image.read(step.offset, buf);
      done.catch(() => undefined);
      reading++;
      readingBytes += step.length;
      queue.push({ kind: 'read', offset: step.offset, buf, done });
    }
  };

  try {
    for (;;) {
      if (o.signal?.aborted) throw abortError(o.signal);
      await fill();
      const item = queue.shift();
      if (!item) break;
      if (item.kind === 'hole') {
        yield item;
        continue;
      }
      const buf = item.buf;
      let n: number;
      try {
        n = await item.done;
      } finally {
        reading--;
        readingBytes -= buf.length;
      }
      if (n !== buf.length) {
        throw new SparsevirtError('ERR_IO', `short read of RBD image '${image.pool.name}/${image.name}': ${n} of ${buf.length} bytes at ${item.offset}`);
      }
      // the next reads go out before this one is handed on
      await fill();
      const runs = o.minRun === null ? [[0, buf.length] as [number, number]] : dataRuns(buf, item.offset, o.minRun);
      let data = 0;
      for (const [a, b] of runs) data += b - a;
      yield { kind: 'read', offset: item.offset, buf, runs, copy: data <= buf.length * COPY_OUT_SHARE };
    }
  } finally {
    // reads still in flight write into buffers that are only dropped once they complete
    await Promise.allSettled(queue.flatMap((q) => (q.kind === 'read' ? [q.done] : [])));
    await steps.return(undefined);
  }
}

/** Holes as hole chunks (sparse) or as zero data of at most `chunkSize` bytes. */
function holeChunks(length: number, sparse: boolean, chunkSize: number, out: Chunk[]): void {
  if (sparse) {
    out.push({ kind: 'hole', length });
    return;
  }
  for (let left = length; left > 0; ) {
    const n = Math.min(left, chunkSize, ZERO_CHUNK_SIZE);
    out.push({ kind: 'data', bytes: zeroBytes(n) });
    left -= n;
  }
}

/**
 * The image's bytes [offset, offset+length) as chunks: data of at most `chunkSize` bytes and
 * holes (consecutive holes merged). Data chunks are views of read buffers or copies; a consumer
 * may keep them, except that bytes a connection sent (see `lendToWire`) may be read into again
 * (a consumer that hands them to a stream over a connection keeps no other reference to them).
 * Closing the iteration early (`break`) waits for the reads in flight.
 */
export async function* rbdReadChunks(image: RbdImage, opts: RbdReadOptions = {}): AsyncGenerator<Chunk> {
  const o = readSettings(image, opts);
  const sparse = opts.sparse ?? true;
  const chunkSize = positive('chunkSize', opts.chunkSize, LEGACY_PAYLOAD_MAX);
  if (o.start >= o.end) return;
  // free buffers kept: those of the reads in flight and as many again for the consumer's share
  const buffers = new ReadBuffers(o.readSize, 2 * (Math.min(o.depth, Math.ceil(o.maxBytes / o.readSize)) + 1));
  const slab = new CopySlab();
  const out: Chunk[] = [];
  let hole = 0;
  for await (const r of readsInOrder(image, o, buffers)) {
    if (r.kind === 'hole') {
      hole += r.length;
      continue;
    }
    const buf = r.buf;
    let at = 0;
    let lent = 0;
    for (const [a, b] of r.runs) {
      hole += a - at;
      if (hole > 0) holeChunks(hole, sparse, chunkSize, out);
      hole = 0;
      const bytes = r.copy ? slab.copy(buf.subarray(a, b)) : buf.subarray(a, b);
      for (let p = 0; p < bytes.length; p += chunkSize) out.push({ kind: 'data', bytes: bytes.subarray(p, Math.min(bytes.length, p + chunkSize)) });
      if (!r.copy) lent += b - a;
      at = b;
    }
    hole += buf.length - at;
    // copied out (or all zeros): the buffer is read into again; else it is lent to the wire,
    // and read into again once a connection sent all of it
    if (r.copy) buffers.give(buf);
    else lendToWire(buf, lent, buffers.give);
    for (const c of out) yield c;
    out.length = 0;
  }
  if (hole > 0) {
    holeChunks(hole, sparse, chunkSize, out);
    for (const c of out) yield c;
  }
}

const ZERO_PAGE = Buffer.alloc(4096);

/** Whether bytes [from, to) of `b` are all zero. */
function isZero(b: Buffer, from: number, to: number): boolean {
  // data rarely starts and ends a 4 KiB piece with zeros: two loads answer for most pieces of a
  // dense read, without a call into C++ for each (256 per MiB)
  if (b[from] !== 0 || b[to - 1] !== 0) return false;
  for (let at = from; at < to; at += ZERO_PAGE.length) {
    const n = Math.min(ZERO_PAGE.length, to - at);
    if (b.compare(ZERO_PAGE, 0, n, at, at + n) !== 0) return false;
  }
  return true;
}

/**
 * Bounds the operations in flight, each weighing the object requests it makes (one by default),
 * and their bytes; remembers the first failure. One operation may always start, whatever it weighs.
 */
class Window {
  readonly #depth: number;
  readonly #maxBytes: number;
  #inFlight = 0;
  #bytes = 0;
  #wake: (() => void) | null = null;
  #idle: (() => void) | null = null;
  error: unknown = null;
  constructor(depth: number, maxBytes: number) {
    this.#depth = depth;
    this.#maxBytes = maxBytes;
  }
  /** Waits for room for one more operation of `bytes` and `weight` (or the first failure, which it throws). */
  async slot(bytes: number, weight = 1): Promise<void> {
    while (this.#inFlight > 0 && (this.#inFlight + weight > this.#depth || this.#bytes + bytes > this.#maxBytes) && this.error === null) {
      await new Promise<void>((resolve) => (this.#wake = resolve));
    }
    if (this.error !== null) throw this.error;
  }
  /** Counts `p` in flight until it settles; `ok` runs when it succeeded. */
  run(p: Promise<void>, bytes: number, ok?: () => void, weight = 1): void {
    this.#inFlight += weight;
    this.#bytes += bytes;
    p.then(
      () => {
        ok?.();
        this.#settle(bytes, weight);
      },
      (err: unknown) => {
        if (this.error === null) this.error = err;
        this.#settle(bytes, weight);
      },
    );
  }
  #settle(bytes: number, weight: number): void {
    this.#inFlight -= weight;
    this.#bytes -= bytes;
    const w = this.#wake;
    this.#wake = null;
    w?.();
    if (this.#inFlight === 0) {
      const i = this.#idle;
      this.#idle = null;
      i?.();
    }
  }
  /** Waits until nothing is in flight. */
  async drain(): Promise<void> {
    while (this.#inFlight > 0) await new Promise<void>((resolve) => (this.#idle = resolve));
  }
}

/** A chunk's buffer split across writes: it is done once every part is written. */
class SplitBuffer {
  /** Parts in writes not yet completed, plus one while parts are still being taken. */
  parts = 1;
  constructor(readonly buf: Buffer) {}
}

/**
 * Writes `chunks` into the image from `offset` (see the module comment). The whole range must
 * lie within the image (ERR_INVALID_ARG before anything past its end is written: librbd would
 * cut it off silently). Data buffers are held until written: a producer must not reuse them
 * (with `release`, they are handed back once written). The source is always finished or closed,
 * also on error or abort.
 */
export async function rbdWriteChunks(
  image: RbdImage,
  chunks: AsyncIterable<Chunk | readonly Chunk[]>,
  opts: RbdWriteOptions = {},
): Promise<RbdWriteResult> {
  let pos = checkByteCount('offset', opts.offset ?? 0);
  const depth = positive('depth', opts.depth, DEFAULT_WRITE_DEPTH);
  const maxBytes = positive('maxBytesInFlight', opts.maxBytesInFlight, DEFAULT_BYTES_IN_FLIGHT);
  const writeSize = positive('writeSize', opts.writeSize, image.objectSize || DEFAULT_WRITE_SIZE);
  const zeroed = opts.zeroed ?? false;
  const release = opts.release === undefined ? releaseFramePayloads : opts.release;
  const signal = opts.signal;
  const size = image.size;
  const objectSize = image.objectSize || DEFAULT_WRITE_SIZE;
  const holeMax = objectSize * HOLE_OP_OBJECTS;
  const granularity = image.pool.discardGranularity;
  const ops = new Window(depth, maxBytes);
  const result: RbdWriteResult = { dataBytes: 0, holeBytes: 0 };

  // the write being gathered: contiguous data up to the next multiple of writeSize
  let batch: Buffer[] = [];
  let owned: Array<Buffer | SplitBuffer> = [];
  let batchAt = pos;
  let batchBytes = 0;
  let batchEnd = 0;
  let holeAt = pos;
  let holeBytes = 0;

  const written = (list: Array<Buffer | SplitBuffer>): void => {
    const done: Buffer[] = [];
    for (const b of list) {
      if (!(b instanceof SplitBuffer)) done.push(b);
      else if (--b.parts === 0) done.push(b.buf);
    }
    if (done.length) release?.(done);
  };
  const writeBatch = async (): Promise<void> => {
    if (batchBytes === 0) return;
    const bufs = batch;
    const mine = owned;
    const at = batchAt;
    const bytes = batchBytes;
    batch = [];
    owned = [];
    batchBytes = 0;
    await ops.slot(bytes);
    // (a failed write's buffers are not handed back: after a deadline, librbd may still hold them)
    ops.run(image.write(at, bufs), bytes, release ? () => written(mine) : undefined);
  };
  const writeHole = async (): Promise<void> => {
    let at = holeAt;
    let left = holeBytes;
    holeBytes = 0;
    if (zeroed) return;
    while (left > 0) {
      const n = Math.min(left, holeMax - (at % holeMax));
      const objects = Math.max(1, Math.ceil((at + n) / objectSize) - Math.floor(at / objectSize));
      await ops.slot(0, objects);
      const aligned = granularity > 0 && at % granularity === 0 && (at + n) % granularity === 0;
      ops.run(aligned ? image.discard(at, n) : image.writeZeroes(at, n), 0, undefined, objects);
      at += n;
      left -= n;
    }
  };
  /** Adds data at `pos` to the write being gathered; writes it out at each multiple of writeSize. */
  const takeData = async (bytes: Buffer): Promise<void> => {
    let split: SplitBuffer | null = null;
    for (let from = 0; from < bytes.length; ) {
      if (batchBytes === 0) {
        batchAt = pos;
        batchEnd = (Math.floor(pos / writeSize) + 1) * writeSize;
      }
      const n = Math.min(bytes.length - from, batchEnd - pos);
      if (n === bytes.length) {
        batch.push(bytes);
        owned.push(bytes);
      } else {
        split ??= new SplitBuffer(bytes);
        split.parts++;
        batch.push(bytes.subarray(from, from + n));
        owned.push(split);
      }
      batchBytes += n;
      pos += n;
      from += n;
      if (pos === batchEnd) await writeBatch();
    }
    if (split) written([split]);
  };
  const take = async (c: Chunk): Promise<void> => {
    const len = chunkLength(c);
    if (len === 0) return;
    if (pos + len > size) {
      throw new SparsevirtError('ERR_INVALID_ARG', `the data ends at ${pos + len}, past the end of RBD image '${image.pool.name}/${image.name}' (${size} bytes)`);
    }
    if (c.kind === 'hole') {
      await writeBatch();
      if (holeBytes === 0) holeAt = pos;
      holeBytes += len;
      result.holeBytes += len;
      pos += len;
    } else {
      if (holeBytes > 0) await writeHole();
      result.dataBytes += len;
      await takeData(c.bytes);
    }
  };

  const it = chunks[Symbol.asyncIterator]();
  let finished = false;
  try {
    for (;;) {
      if (signal?.aborted) throw abortError(signal);
      if (ops.error !== null) throw ops.error;
      const r = await it.next();
      if (r.done) {
        finished = true;
        break;
      }
      const v = r.value;
      if (Array.isArray(v)) for (const c of v as readonly Chunk[]) await take(c);
      else await take(v as Chunk);
    }
    await writeBatch();
    if (holeBytes > 0) await writeHole();
    await ops.drain();
    if (ops.error !== null) throw ops.error;
    if (opts.flush ?? true) await image.flush();
    return result;
  } finally {
    await ops.drain();
    if (!finished) await it.return?.().catch(() => undefined);
  }
}
