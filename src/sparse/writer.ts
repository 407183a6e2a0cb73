/**
 * Chunks → file. `SparseWriter` writes data at its position (contiguous chunks coalesced into
 * one writev), makes every hole read as zero without allocating it where the filesystem allows,
 * and sets the final size.
 */
import fs from 'node:fs';
import { chunkLength, isBatch, type Chunk, type FileRef, type WrittenRange } from '../chunk.js';
import { SparsevirtError, checkByteCount } from '../errors.js';
import { DEVICE_ALIGN, abortError, certainlyAllHole, ioError, openFile, zeroes, type FileTarget, type OpenFile } from './file.js';
import { fileRef } from '../io/file.js';
import * as sys from '../io/sys.js';

export interface SparseWriterOptions {
  /** Where the first chunk lands (default 0). */
  offset?: number;
  /**
   * Make the file end exactly where the chunks end. Default false: a longer target is never
   * shrunk (only grown to cover a trailing hole). With true, a regular file is cut to `offset`
   * up front, so holes past it cost nothing.
   */
  truncate?: boolean;
  /** fdatasync before close (default false). */
  sync?: boolean;
  /** Mode for a file created here (default 0o644, less the umask). */
  mode?: number;
  /**
   * Called with the data buffers of each write once it has landed: for a producer that hands
   * its buffers over for good and takes them back for reuse (the rpc layer's frame buffers).
   */
  release?: (buffers: Buffer[]) => void;
  signal?: AbortSignal;
  /**
   * `writeChunks` only. A receiving stream's `receiveInto` (for a source that is that stream's
   * `chunksInPlace()`, or taps it): called once large data comes (a chunk of 64 KiB or more), if
   * the file lives in memory (tmpfs, ramfs), with where the source's position 0 lands, so that
   * the large packets after it are written there as they arrive and come as `WrittenRange`s;
   * called with null before the file is closed. (Not at once: an all-hole or small transfer
   * does not pay for loading the native syscalls, ~10 ms.)
   */
  receiveInto?: (target: { file: FileRef; base: number } | null) => unknown;
}

export interface WriteResult {
  dataBytes: number;
  holeBytes: number;
}

/** Coalesced data is written once it reaches this many bytes … */
const MAX_BATCH_BYTES = 1 << 20;
/** … or this many buffers (IOV_MAX). */
const MAX_BATCH_BUFFERS = 1024;
/** A data chunk this large starts receiving in place (`receiveInto`): packets of the rpc layer's size. */
const IN_PLACE_MIN = 64 * 1024;
/** Largest single write when zeroing by writes. */
const ZERO_WRITE_MAX = 1 << 20;
/**
 * Large writes kept in flight in the thread pool at once, and their bytes. The kernel serialises
 * writes to one inode, so more than two only contend for its lock (measured: more CPU, no
 * speed); two keep the next write queued behind the running one. The ranges never overlap, so
 * their order does not matter.
 */
const MAX_WRITES_IN_FLIGHT = 2;
const MAX_BYTES_IN_FLIGHT = 2 << 20;
/** Writes up to this size go straight into the page cache from the event loop. */
const INLINE_WRITE_MAX = 128 << 10;

/** How this writer makes a range read as zeros, best first; a method that fails as unsupported is dropped. */
type ZeroMethod = 'punch' | 'zero-range' | 'write';

const UNSUPPORTED = new Set([-sys.EOPNOTSUPP, -sys.ENOSYS]);

/**
 * Writes a sequence of chunks into a regular file or a block device.
 *
 * A hole must read back as zero even where the target held data, so the part of it below the
 * target's original size is punched (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE); where punching is not
 * supported, and on block devices, it is zeroed (FALLOC_FL_ZERO_RANGE), and failing that written
 * with zeros. Past the original size nothing is needed: it is already a hole.
 *
 * Data buffers are held by reference until written (a 1 MiB batch being built, 4 MiB in flight):
 * like a Writable, a producer must not reuse a buffer it has handed over. Await each `write()`
 * before the next. Errors are `SparsevirtError` `ERR_IO` with the errno in `cause`; a failed
 * write in flight surfaces on a later `write()` or on `close()`. After an error, call `abort()`.
 */
export class SparseWriter {
  readonly file: OpenFile;
  /**
   * Holes below this offset need zeroing: the target's size when opened (after the up-front cut
   * of `truncate`), or 0 when the target had not one block allocated (a new volume): nothing
   * there to zero. (A stream only moves forward, so a hole never lands on data written here.)
   */
  readonly #originalSize: number;
  readonly #truncate: boolean;
  readonly #sync: boolean;
  readonly #signal: AbortSignal | undefined;
  readonly #zeroMethods: ZeroMethod[];
  readonly #release: ((buffers: Buffer[]) => void) | undefined;
  #position: number;
  #batch: Buffer[] = [];
  #batchBytes = 0;
  #writesInFlight = 0;
  #bytesInFlight = 0;
  /** Callers waiting for a write in flight to land. */
  #waiters: Array<() => void> = [];
  /** The first failed write in flight: every later call throws it. */
  #failure: SparsevirtError | null = null;
  #dataBytes = 0;
  #holeBytes = 0;
  #closed = false;

  private constructor(file: OpenFile, originalSize: number, opts: SparseWriterOptions, start: number) {
    this.file = file;
    this.#originalSize = originalSize;
    this.#position = start;
    this.#truncate = opts.truncate ?? false;
    this.#sync = opts.sync ?? false;
    this.#signal = opts.signal;
    this.#release = opts.release;
    this.#zeroMethods = file.isBlockDevice ? ['zero-range', 'write'] : ['punch', 'zero-range', 'write'];
  }

  /** Opens (creating it if missing, never truncating on open) or adopts the target. */
  static async open(target: FileTarget, opts: SparseWriterOptions = {}): Promise<SparseWriter> {
    const start = checkByteCount('offset', opts.offset ?? 0);
    if (opts.signal?.aborted) throw abortError(opts.signal);
    const { O_WRONLY, O_CREAT } = fs.constants;
    const file = await openFile(target, O_WRONLY | O_CREAT, opts.mode ?? 0o644);
    let originalSize = file.size;
    if (opts.truncate && !file.isBlockDevice && originalSize > start) {
      try {
        await fdCall<void>((cb) => fs.ftruncate(file.fd, start, cb));
      } catch (err) {
        await file.close();
        throw ioError('cannot truncate', file.name, err);
      }
      originalSize = start;
    }
    // 100,000 holes in a fresh volume are 100,000 punches of nothing otherwise
    if (certainlyAllHole(file)) originalSize = 0;
    return new SparseWriter(file, originalSize, opts, start);
  }

  /** Where the next chunk lands. */
  get position(): number {
    return this.#position;
  }

  /**
   * Write a chunk at the position. A `WrittenRange` is data the source already wrote in place
   * (`writeChunks`' `receiveInto`): it must start at the position; its error is this writer's.
   */
  async write(chunk: Chunk | WrittenRange): Promise<void> {
    this.#check();
    const p = this.#put(chunk);
    if (p !== null) await p;
  }

  /**
   * `write` for each chunk in turn, without a promise per chunk: data is coalesced and written
   * at once up to 128 KiB (into the page cache, inline), and only what has to wait (a large write
   * going to the thread pool, room in flight, zeroing a range) is awaited. On a failure, the
   * chunks before it are written or under way.
   */
  async writeBatch(chunks: ReadonlyArray<Chunk | WrittenRange>): Promise<void> {
    // (checked again only after a wait: nothing can close, fail or abort this writer meanwhile)
    this.#check();
    for (let i = 0; i < chunks.length; i++) {
      const p = this.#put(chunks[i]!);
      if (p !== null) {
        await p;
        this.#check();
      }
    }
  }

  /** Throws if no more chunks may come: closed, failed, or aborted. */
  #check(): void {
    if (this.#closed) throw new SparsevirtError('ERR_STREAM_STATE', `${this.file.name}: write after close`);
    if (this.#failure) throw this.#failure;
    if (this.#signal?.aborted) throw abortError(this.#signal);
  }

  /** Takes a chunk (after `#check()`): null when it is done, or a promise of it (await it before the next). */
  #put(chunk: Chunk | WrittenRange): Promise<void> | null {
    const length = checkByteCount('chunk length', chunkLength(chunk));
    if (length === 0) return null;
    const at = this.#position;
    checkByteCount('end of write', at + length);
    if (chunk.kind === 'data') {
      if (this.#batchBytes + length > MAX_BATCH_BYTES && this.#batch.length > 0) {
        // the pending data first; a write that has to wait for room is awaited before this chunk
        const flushing = this.#flush();
        if (flushing !== null) {
          return flushing.then(() => {
            this.#check();
            return this.#put(chunk);
          }).then(noop);
        }
      }
      this.#batch.push(chunk.bytes);
      this.#batchBytes += length;
      this.#position = at + length;
      this.#dataBytes += length;
      return this.#batchBytes >= MAX_BATCH_BYTES || this.#batch.length >= MAX_BATCH_BUFFERS ? this.#flush() : null;
    }
    if (chunk.kind === 'written' && chunk.error) {
      this.#failure ??= ioError('cannot write', this.file.name, chunk.error);
      throw this.#failure;
    }
    // coalesced data first: a batch ends at the position
    const flushing = this.#flush();
    if (flushing !== null) return flushing.then(() => this.#placed(chunk, at, length)).then(noop);
    return this.#placed(chunk, at, length);
  }

  /** A hole, or data written in place, at the position `at` (nothing pending before it). */
  #placed(chunk: Extract<Chunk, { kind: 'hole' }> | WrittenRange, at: number, length: number): Promise<void> | null {
    if (chunk.kind === 'written') {
      if (chunk.offset !== at) {
        throw new SparsevirtError('ERR_STREAM_STATE', `${this.file.name}: data written in place at ${chunk.offset}, where the next write goes to ${at}`);
      }
      this.#position = at + length;
      this.#dataBytes += length;
      return null;
    }
    if (this.file.isBlockDevice && at + length > this.file.size) {
      throw ioError('cannot write', this.file.name, `hole ends at ${at + length}, past the end of the device (${this.file.size})`);
    }
    const zeroEnd = Math.min(at + length, this.#originalSize);
    if (at < zeroEnd) {
      return this.#zeroRange(at, zeroEnd).then(() => {
        this.#position = at + length;
        this.#holeBytes += length;
      });
    }
    this.#position = at + length;
    this.#holeBytes += length;
    return null;
  }

  /**
   * Writes what is pending, sets the size (grown over a trailing hole; cut only with
   * `truncate`), syncs if asked, and closes the file if it was opened here.
   */
  async close(): Promise<WriteResult> {
    if (this.#closed) throw new SparsevirtError('ERR_STREAM_STATE', `${this.file.name}: already closed`);
    this.#closed = true;
    try {
      await this.#finish();
    } finally {
      this.#batch = [];
      // Writes in flight target our fd: let them land before it can be closed and reused.
      await this.#settle(0, 0);
      await this.file.close();
    }
    return { dataBytes: this.#dataBytes, holeBytes: this.#holeBytes };
  }

  async #finish(): Promise<void> {
    await this.#flush();
    await this.#settle(0, 0);
    if (this.#failure) throw this.#failure;
    const { fd, name } = this.file;
    if (!this.file.isBlockDevice) {
      const end = this.#position;
      const { size } = await fdCall<fs.Stats>((cb) => fs.fstat(fd, cb)).catch((err: unknown) => {
        throw ioError('cannot stat', name, err);
      });
      if (size < end || (this.#truncate && size !== end)) {
        await fdCall<void>((cb) => fs.ftruncate(fd, end, cb)).catch((err: unknown) => {
          throw ioError('cannot set the size of', name, err);
        });
      }
    }
    if (this.#sync) {
      await fdCall<void>((cb) => fs.fdatasync(fd, cb)).catch((err: unknown) => {
        throw ioError('cannot sync', name, err);
      });
    }
  }

  /**
   * Ends without finishing: the data that arrived and waits in the batch is still written (data
   * after it may already be in place, written by the receiver itself: dropping the batch would
   * leave a run of zeros inside what arrived), unless a write failed; nothing is synced and the
   * size is left as is. Closes the file if it was opened here.
   */
  async abort(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#failure === null) {
      try {
        await this.#flush();
      } catch {
        // the failure is the caller's to report, if it asks: abort() only ends
      }
    }
    this.#batch = [];
    // Writes in flight target our fd: let them land before it can be closed and reused.
    await this.#settle(0, 0);
    await this.file.close();
  }

  /** Starts writing the coalesced data (taken from the batch at once): null when done, else a promise. */
  #flush(): Promise<void> | null {
    if (this.#batch.length === 0) return null;
    const buffers = this.#batch;
    const bytes = this.#batchBytes;
    this.#batch = [];
    this.#batchBytes = 0;
    return this.#startWrite(buffers, bytes, this.#position - bytes, this.#release);
  }

  /**
   * Starts a write once there is room in flight for it; its failure surfaces on a later call.
   * Small writes are done inline: into the page cache they are a memcpy, and a round trip
   * through libuv's thread pool costs several times more (100,000 extents of 4 KiB: 1.1 s of
   * submissions alone). Large writes go to the pool, several at once, so that the event loop
   * keeps reading the socket meanwhile (inline 256 KiB writes leave the sender waiting). Ranges
   * never overlap: the two paths need no ordering.
   */
  #startWrite(buffers: Buffer[], bytes: number, at: number, release?: (buffers: Buffer[]) => void): Promise<void> | null {
    if (this.#failure) throw this.#failure;
    if (bytes <= INLINE_WRITE_MAX) {
      try {
        writevFullySync(this.file.fd, buffers, at);
      } catch (err) {
        this.#failure ??= ioError('cannot write', this.file.name, err);
        throw this.#failure;
      }
      release?.(buffers);
      return null;
    }
    return this.#startWriteLater(buffers, bytes, at, release);
  }

  /** A large write: to the thread pool, once there is room in flight for it. */
  async #startWriteLater(buffers: Buffer[], bytes: number, at: number, release?: (buffers: Buffer[]) => void): Promise<void> {
    await this.#settle(MAX_WRITES_IN_FLIGHT - 1, MAX_BYTES_IN_FLIGHT - bytes);
    if (this.#failure) throw this.#failure;
    this.#writesInFlight++;
    this.#bytesInFlight += bytes;
    writevFully(this.file.fd, buffers, at).then(
      () => {
        release?.(buffers);
        this.#landed(bytes);
      },
      (err: unknown) => {
        this.#failure ??= ioError('cannot write', this.file.name, err);
        this.#landed(bytes);
      },
    );
  }

  #landed(bytes: number): void {
    this.#writesInFlight--;
    this.#bytesInFlight -= bytes;
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }

  /** Waits until at most `writes` writes and `bytes` bytes (or just nothing) are in flight. */
  async #settle(writes: number, bytes: number): Promise<void> {
    while (this.#writesInFlight > 0 && (this.#writesInFlight > writes || this.#bytesInFlight > bytes)) {
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
  }

  /**
   * Makes [from, to) read as zeros, deallocating it where the filesystem can. A block device
   * takes fallocate only on whole logical blocks (EINVAL otherwise): there it covers the
   * aligned middle, and the unaligned edges are written.
   */
  async #zeroRange(from: number, to: number): Promise<void> {
    const { fd, isBlockDevice } = this.file;
    const methods = this.#zeroMethods;
    const a = isBlockDevice ? Math.ceil(from / DEVICE_ALIGN) * DEVICE_ALIGN : from;
    const b = isBlockDevice ? Math.floor(to / DEVICE_ALIGN) * DEVICE_ALIGN : to;
    while (a < b && methods[0] !== 'write') {
      const mode = methods[0] === 'punch' ? sys.FALLOC_FL_PUNCH_HOLE : sys.FALLOC_FL_ZERO_RANGE;
      const r = sys.fallocate(fd, mode | sys.FALLOC_FL_KEEP_SIZE, a, b - a);
      if (r === 0) {
        if (from < a) await this.#writeZeroes(from, a);
        if (b < to) await this.#writeZeroes(b, to);
        return;
      }
      if (!UNSUPPORTED.has(r) && !(isBlockDevice && r === -sys.EINVAL)) {
        throw ioError('cannot zero a range of', this.file.name, sys.errnoException(r, 'fallocate'));
      }
      methods.shift();
    }
    await this.#writeZeroes(from, to);
  }

  async #writeZeroes(from: number, to: number): Promise<void> {
    for (let at = from; at < to; at += ZERO_WRITE_MAX) {
      const bytes = Math.min(ZERO_WRITE_MAX, to - at);
      await this.#startWrite([zeroes(bytes)], bytes, at);
    }
  }
}

function noop(): void {}

/** A data chunk worth receiving in place (see `writeChunks`' `receiveInto`). */
function isLargeData(c: Chunk | WrittenRange): boolean {
  return c.kind === 'data' && c.bytes.length >= IN_PLACE_MIN;
}

/** Callback-style fs call on a raw fd, as a promise. */
function fdCall<T>(call: (cb: (err: Error | null, value?: T) => void) => void): Promise<T> {
  return new Promise((resolve, reject) => call((err, value) => (err ? reject(err) : resolve(value as T))));
}

/** `writevSync` at `position` until every byte is written. */
function writevFullySync(fd: number, buffers: Buffer[], position: number): void {
  if (buffers.length === 1) {
    // (one small extent per write, for a file of many: no list to copy and sum)
    const b = buffers[0]!;
    const n = pwriteSync(fd, b, position);
    if (n === b.length) return;
    if (n === 0) throw new Error(`writev wrote nothing at ${position}`);
    writevFullySync(fd, [b.subarray(n)], position + n);
    return;
  }
  let bufs = buffers.slice(); // (trimmed below: the caller's list stays whole, for `release`)
  let at = position;
  for (;;) {
    const total = bufs.reduce((n, b) => n + b.length, 0);
    const n = bufs.length === 1 ? pwriteSync(fd, bufs[0]!, at) : fs.writevSync(fd, bufs, at);
    if (n === total) return;
    if (n === 0) throw new Error(`writev wrote nothing at ${at}`);
    at += n;
    let skip = n;
    while (skip >= bufs[0]!.length) skip -= bufs.shift()!.length;
    bufs = [bufs[0]!.subarray(skip), ...bufs.slice(1)];
  }
}

function pwriteSync(fd: number, buf: Buffer, at: number): number {
  const n = sys.pwrite(fd, buf, at);
  if (n < 0) throw sys.errnoException(n, 'write');
  return n;
}

/** `writev` at `position` until every byte is written (a short write continues where it stopped). */
async function writevFully(fd: number, buffers: Buffer[], position: number): Promise<void> {
  let bufs = buffers.slice(); // (trimmed below: the caller's list stays whole, for `release`)
  let at = position;
  for (;;) {
    const total = bufs.reduce((n, b) => n + b.length, 0);
    const written = await new Promise<number>((resolve, reject) => {
      fs.writev(fd, bufs, at, (err, n) => (err ? reject(err) : resolve(n)));
    });
    if (written === total) return;
    if (written === 0) throw new Error(`writev wrote nothing at ${at}`);
    at += written;
    let skip = written;
    while (skip >= bufs[0]!.length) skip -= bufs.shift()!.length;
    bufs = [bufs[0]!.subarray(skip), ...bufs.slice(1)];
  }
}

/**
 * Writes `chunks` into `target` (see `SparseWriter`) and returns how many bytes came as data and
 * as holes. The source may yield arrays of chunks (`Stream.batchesInPlace`, `recvBatch`): each is
 * written with one promise (`writeBatch`). The source is always finished or returned (closed),
 * also on error or abort.
 */
export async function writeChunks(target: FileTarget, chunks: AsyncIterable<Chunk | WrittenRange | ReadonlyArray<Chunk | WrittenRange>>, opts: SparseWriterOptions = {}): Promise<WriteResult> {
  const writer = await SparseWriter.open(target, opts);
  // Large packets straight into the file, where it lives in memory (writes on the event loop).
  // Decided at the first large chunk: the native syscalls are loaded by then anyway.
  const base = writer.position;
  let arm = opts.receiveInto && !writer.file.isBlockDevice ? opts.receiveInto : undefined;
  let inPlace: typeof arm;
  const startInPlace = (): void => {
    const f = arm;
    arm = undefined;
    if (f && sys.isMemoryBacked(writer.file.fd)) {
      inPlace = f;
      f({ file: fileRef(writer.file.fd), base });
    }
  };
  const stopInPlace = (): void => {
    arm = undefined;
    const f = inPlace;
    inPlace = undefined;
    f?.(null);
  };
  let it: AsyncIterator<Chunk | WrittenRange | ReadonlyArray<Chunk | WrittenRange>>;
  try {
    it = chunks[Symbol.asyncIterator]();
  } catch (err) {
    await writer.abort().catch(() => undefined);
    throw err;
  }
  const signal = opts.signal;
  // A stalled source must not outlive an abort: the pull in progress is rejected on abort.
  // (Not Promise.race against one long-lived promise: every race would stay subscribed to it
  // and keep its chunk alive until the end, which is the whole image.)
  let rejectPull: ((err: Error) => void) | undefined;
  const onAbort = signal && ((): void => rejectPull?.(abortError(signal)));
  if (signal && onAbort) signal.addEventListener('abort', onAbort, { once: true });
  const pull = (resolve: (r: IteratorResult<Chunk | WrittenRange | ReadonlyArray<Chunk | WrittenRange>>) => void, reject: (err: Error) => void): void => {
    rejectPull = reject;
    if (signal!.aborted) reject(abortError(signal!));
    else it.next().then(resolve, reject);
  };
  let sourceDone = false;
  let sourceFailed = false;
  try {
    for (;;) {
      let next: IteratorResult<Chunk | WrittenRange | ReadonlyArray<Chunk | WrittenRange>>;
      try {
        next = signal ? await new Promise<IteratorResult<Chunk | WrittenRange | ReadonlyArray<Chunk | WrittenRange>>>(pull) : await it.next();
      } catch (err) {
        sourceFailed = !signal?.aborted;
        throw err;
      }
      rejectPull = undefined;
      if (next.done) {
        sourceDone = true;
        break;
      }
      const item = next.value;
      if (isBatch(item)) {
        if (arm !== undefined && item.some(isLargeData)) startInPlace();
        await writer.writeBatch(item);
      } else {
        if (arm !== undefined && isLargeData(item)) startInPlace();
        await writer.write(item);
      }
    }
    stopInPlace();
    return await writer.close();
  } catch (err) {
    stopInPlace();
    // The source failed (e.g. a limit it enforces): what it had handed over is written, as a
    // write(2) that stops at the limit would. On an abort the writer still writes what it holds
    // (data after it may be in place already), never what the source has not handed over.
    if (sourceFailed) await writer.close().catch(() => writer.abort().catch(() => undefined));
    else await writer.abort().catch(() => undefined);
    if (!sourceDone) {
      // After an abort the source may be stuck in next(): do not wait for it to notice.
      const closing = it.return?.().catch(() => undefined);
      if (!signal?.aborted) await closing;
    }
    throw err;
  } finally {
    if (onAbort) signal?.removeEventListener('abort', onAbort);
  }
}
