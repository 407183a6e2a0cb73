/**
 * RBD image ⇄ chunks, the two primitives a sparse `vol-download` / `vol-upload` on an RBD pool
 * runs on.
 *
 * Reading: the allocated extents come from `rbd_diff_iterate2` (since creation, parent
 * included, whole_object off), a window at a time (the next window is asked for while the
 * current one is read); the rest is holes. Extents are read with aio, up to `depth` reads of
 * at most `readSize` bytes in flight, in order. An object store may report more than was
 * written (memstore reports from the start of an object to the end of its data), so
 * `detectZeroes` can turn all-zero pieces inside reported extents into holes as well.
 *
 * Writing: data is written with aio (`rbd_aio_writev`, contiguous chunks gathered up to
 * `writeSize` bytes without copying), up to `depth` operations in flight. A hole must read as
 * zeros afterwards whatever the image held there, and should not stay allocated: it becomes an
 * `rbd_aio_discard` where it starts and ends on the discard granularity (librbd leaves a
 * discard's unaligned edges as they were), else an `rbd_aio_write_zeroes` (zeroes exactly,
 * whole objects dropped). On an image known to read as zeros (`zeroed`, e.g. just created),
 * holes cost nothing. The writes end with `rbd_aio_flush`.
 *
 * Memory is bounded by `maxBytesInFlight` (and one read or write more) whatever the image's size.
 * Every operation has a deadline (the pool's), so a vanished OSD fails the transfer within a
 * bounded time (ERR_TIMEOUT, or ERR_IO with Ceph's ETIMEDOUT).
 */
import { LEGACY_PAYLOAD_MAX, chunkLength, type Chunk } from '../../chunk.js';
import { SparsevirtError, checkByteCount } from '../../errors.js';
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
  /** … and bytes (default 32 MiB; at least one read). */
  maxBytesInFlight?: number;
  /** Bytes per read (default 1 MiB). */
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
  /** Operations in flight at once (default 32) … */
  depth?: number;
  /** … and bytes of data (default 32 MiB; at least one write). */
  maxBytesInFlight?: number;
  /** Contiguous data is gathered into writes of up to this many bytes (default 4 MiB). */
  writeSize?: number;
  /** The image reads as zeros where holes come (just created): holes are skipped. */
  zeroed?: boolean;
  /** `rbd_aio_flush` at the end (default true). */
  flush?: boolean;
  signal?: AbortSignal;
}

export interface RbdWriteResult {
  dataBytes: number;
  holeBytes: number;
}

/** Small operations need many in flight (each is a round trip to an OSD); large ones are bounded by bytes. */
const DEFAULT_DEPTH = 32;
const DEFAULT_BYTES_IN_FLIGHT = 32 << 20;
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

interface QueuedRead {
  kind: 'read';
  offset: number;
  buf: Buffer;
  done: Promise<number>;
}

/**
 * The image's bytes [offset, offset+length) as chunks: data of at most `chunkSize` bytes and
 * holes (consecutive holes merged). Data chunks are views of the read buffers (the consumer
 * may keep them). Closing the iteration early (`break`) waits for the reads in flight.
 */
export async function* rbdReadChunks(image: RbdImage, opts: RbdReadOptions = {}): AsyncGenerator<Chunk> {
  const size = image.size;
  const start = checkByteCount('offset', opts.offset ?? 0);
  const end = Math.min(size, opts.length === undefined ? size : start + checkByteCount('length', opts.length));
  const sparse = opts.sparse ?? true;
  const chunkSize = positive('chunkSize', opts.chunkSize, LEGACY_PAYLOAD_MAX);
  const depth = positive('depth', opts.depth, DEFAULT_DEPTH);
  const maxBytes = positive('maxBytesInFlight', opts.maxBytesInFlight, DEFAULT_BYTES_IN_FLIGHT);
  const readSize = positive('readSize', opts.readSize, DEFAULT_READ_SIZE);
  const windowSize = Math.max(positive('windowSize', opts.windowSize, DEFAULT_WINDOW), readSize);
  const zero = zeroDetection(opts.detectZeroes);
  const signal = opts.signal;
  if (start >= end) return;

  const steps = plan(image, start, end, windowSize, readSize);
  const queue: Array<QueuedRead | { kind: 'hole'; length: number }> = [];
  let reading = 0;
  let readingBytes = 0;
  let held: Planned | null = null;
  let planned = false;
  let hole = 0;

  const fill = async (): Promise<void> => {
    // holes are free: the queue is bounded by reads, and by a few holes between them
    while (reading < depth && queue.length < depth * 4) {
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
      if (reading > 0 && readingBytes + step.length > maxBytes) {
        held = step;
        break;
      }
      const buf = Buffer.allocUnsafe(step.length);
      const done = image.read(step.offset, buf);
      done.catch(() => undefined);
      reading++;
      readingBytes += step.length;
      queue.push({ kind: 'read', offset: step.offset, buf, done });
    }
  };

  function* holeOut(length: number): Generator<Chunk> {
    if (sparse) {
      yield { kind: 'hole', length };
      return;
    }
    for (let left = length; left > 0; ) {
      const n = Math.min(left, chunkSize, ZERO_CHUNK_SIZE);
      yield { kind: 'data', bytes: zeroBytes(n) };
      left -= n;
    }
  }

  function* dataOut(buf: Buffer): Generator<Chunk> {
    for (let at = 0; at < buf.length; ) {
      const n = Math.min(chunkSize, buf.length - at);
      yield { kind: 'data', bytes: buf.subarray(at, at + n) };
      at += n;
    }
  }

  try {
    for (;;) {
      if (signal?.aborted) throw abortError(signal);
      await fill();
      const item = queue.shift();
      if (!item) break;
      if (item.kind === 'hole') {
        hole += item.length;
        continue;
      }
      let n: number;
      try {
        n = await item.done;
      } finally {
        reading--;
        readingBytes -= item.buf.length;
      }
      if (n !== item.buf.length) {
        throw new SparsevirtError('ERR_IO', `short read of RBD image '${image.pool.name}/${image.name}': ${n} of ${item.buf.length} bytes at ${item.offset}`);
      }
      // the next reads go out before this one is handed on
      await fill();
      if (!zero) {
        if (hole > 0) yield* holeOut(hole);
        hole = 0;
        yield* dataOut(item.buf);
        continue;
      }
      // pieces of minRun bytes aligned to image offsets; runs of data between zero pieces
      const run = zero.minRun;
      let dataFrom = -1;
      for (let at = 0; at < item.buf.length; ) {
        const pieceEnd = Math.min(item.buf.length, (Math.floor((item.offset + at) / run) + 1) * run - item.offset);
        const piece = item.buf.subarray(at, pieceEnd);
        if (isZero(piece)) {
          if (dataFrom >= 0) {
            if (hole > 0) yield* holeOut(hole);
            hole = 0;
            yield* dataOut(item.buf.subarray(dataFrom, at));
            dataFrom = -1;
          }
          hole += piece.length;
        } else if (dataFrom < 0) {
          dataFrom = at;
        }
        at = pieceEnd;
      }
      if (dataFrom >= 0) {
        if (hole > 0) yield* holeOut(hole);
        hole = 0;
        yield* dataOut(item.buf.subarray(dataFrom));
      }
    }
    if (hole > 0) yield* holeOut(hole);
  } finally {
    // reads still in flight write into buffers that are only dropped once they complete
    await Promise.allSettled(queue.flatMap((q) => (q.kind === 'read' ? [q.done] : [])));
    await steps.return(undefined);
  }
}

const ZERO_PAGE = Buffer.alloc(4096);

/** Whether every byte of `b` is zero. */
function isZero(b: Buffer): boolean {
  for (let at = 0; at < b.length; at += ZERO_PAGE.length) {
    const n = Math.min(ZERO_PAGE.length, b.length - at);
    if (b.compare(ZERO_PAGE, 0, n, at, at + n) !== 0) return false;
  }
  return true;
}

/** Bounds the operations in flight; remembers the first failure. */
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
  /** Waits for room for one more operation of `bytes` (or the first failure, which it throws). */
  async slot(bytes: number): Promise<void> {
    while ((this.#inFlight >= this.#depth || (this.#inFlight > 0 && this.#bytes + bytes > this.#maxBytes)) && this.error === null) {
      await new Promise<void>((resolve) => (this.#wake = resolve));
    }
    if (this.error !== null) throw this.error;
  }
  run(p: Promise<void>, bytes: number): void {
    this.#inFlight++;
    this.#bytes += bytes;
    p.then(
      () => this.#settle(bytes),
      (err: unknown) => {
        if (this.error === null) this.error = err;
        this.#settle(bytes);
      },
    );
  }
  #settle(bytes: number): void {
    this.#inFlight--;
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

/**
 * Writes `chunks` into the image from `offset` (see the module comment). The whole range must
 * lie within the image (ERR_INVALID_ARG before anything past its end is written: librbd would
 * cut it off silently). Data buffers are held until written: a producer must not reuse them.
 * The source is always finished or closed, also on error or abort.
 */
export async function rbdWriteChunks(
  image: RbdImage,
  chunks: AsyncIterable<Chunk | readonly Chunk[]>,
  opts: RbdWriteOptions = {},
): Promise<RbdWriteResult> {
  let pos = checkByteCount('offset', opts.offset ?? 0);
  const depth = positive('depth', opts.depth, DEFAULT_DEPTH);
  const maxBytes = positive('maxBytesInFlight', opts.maxBytesInFlight, DEFAULT_BYTES_IN_FLIGHT);
  const writeSize = positive('writeSize', opts.writeSize, DEFAULT_WRITE_SIZE);
  const zeroed = opts.zeroed ?? false;
  const signal = opts.signal;
  const size = image.size;
  const holeMax = image.objectSize * HOLE_OP_OBJECTS;
  const granularity = image.pool.discardGranularity;
  const ops = new Window(depth, maxBytes);
  const result: RbdWriteResult = { dataBytes: 0, holeBytes: 0 };

  let batch: Buffer[] = [];
  let batchAt = pos;
  let batchBytes = 0;
  let holeAt = pos;
  let holeBytes = 0;

  const writeBatch = async (): Promise<void> => {
    if (batchBytes === 0) return;
    const bufs = batch;
    const at = batchAt;
    const bytes = batchBytes;
    batch = [];
    batchBytes = 0;
    await ops.slot(bytes);
    ops.run(image.write(at, bufs), bytes);
  };
  const writeHole = async (): Promise<void> => {
    let at = holeAt;
    let left = holeBytes;
    holeBytes = 0;
    if (zeroed) return;
    while (left > 0) {
      const n = Math.min(left, holeMax - (at % holeMax));
      await ops.slot(0);
      const aligned = granularity > 0 && at % granularity === 0 && (at + n) % granularity === 0;
      ops.run(aligned ? image.discard(at, n) : image.writeZeroes(at, n), 0);
      at += n;
      left -= n;
    }
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
    } else {
      if (holeBytes > 0) await writeHole();
      if (batchBytes === 0) batchAt = pos;
      batch.push(c.bytes);
      batchBytes += len;
      result.dataBytes += len;
      if (batchBytes >= writeSize) await writeBatch();
    }
    pos += len;
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
