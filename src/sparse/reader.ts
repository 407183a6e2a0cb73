/**
 * File → chunks. `ChunkReader` walks the extent map lazily and reads data extents ahead of the
 * consumer (a few reads in flight or ready), so disk and consumer overlap while memory stays
 * bounded by `readAhead × chunkSize` whatever the size of the file.
 */
import fs from 'node:fs';
import { LEGACY_PAYLOAD_MAX, chunkLength, type Chunk, type FileRange } from '../chunk.js';
import { SparsevirtError, checkByteCount } from '../errors.js';
import { fileRef } from '../io/file.js';
import * as sys from '../io/sys.js';
import { ExtentWalker, zeroDetection, type Extent, type ZeroDetection } from './extents.js';
import { abortError, certainlyAllHole, ioError, openFile, readFully, zeroes, type FileTarget, type OpenFile } from './file.js';

export interface WindowOptions {
  /** First byte of the window (default 0). */
  offset?: number;
  /** Bytes in the window (default: to the end); clipped to the file's size. */
  length?: number;
  /**
   * Also report allocated runs of zeros as holes: data is examined in `minRun`-byte pieces
   * aligned to file offsets (4096 by default, as qemu-img and nbdcopy); an all-zero piece is
   * a hole. Costs a compare of every data byte: opt-in.
   */
  detectZeroes?: boolean | { minRun?: number };
}

export interface ChunkReaderOptions extends WindowOptions {
  /** Emit holes as hole chunks (default). `false` materialises them as zero data. */
  sparse?: boolean;
  /** Largest data chunk (default 262120, libvirt's stream payload). */
  chunkSize?: number;
  /**
   * Bytes read ahead of the consumer, in flight or ready (default 1 MiB; at least one read). A
   * batch (`batches`, `fileSendBatches`) stands for about as many bytes again, read or not.
   */
  readAheadBytes?: number;
  signal?: AbortSignal;
}

/** A data read started ahead of the consumer. */
interface PendingRead {
  kind: 'data';
  offset: number;
  buf: Buffer;
  /** Bytes read (short only at EOF: the file shrank); null when the page cache served it in full. */
  read: Promise<number> | null;
}

interface PendingHole {
  kind: 'hole';
  length: number;
}



/**
 * Small extents make many small reads: keep up to this many in flight so the thread pool stays
 * busy (a round trip costs far more than a 4 KiB copy).
 */
const MAX_QUEUED_READS = 32;

/** Most chunks in one batch (see `ChunkReader.#batches`). */
const BATCH_ITEMS = 1024;

/** Reads up to a quarter of this share one allocation. */
const SLAB_SIZE = 256 << 10;

/** Read size when mapping extents with zero detection: the chunks never leave this module. */
const ZERO_SCAN_READ = 1 << 20;

/**
 * Reads a window of a regular file or block device as chunks: data of at most `chunkSize`
 * bytes (never empty, never crossing an extent boundary) and one hole chunk per hole region.
 *
 * Iterate once. Iteration closes the file (if opened here) at its end, on `break` or on error;
 * `close()` is for a reader that is opened but never iterated. Data buffers are fresh per chunk
 * (the consumer may keep them); materialised zeros are views of one shared buffer and must not
 * be written to.
 */
export class ChunkReader implements AsyncIterable<Chunk> {
  /** Window start. */
  readonly offset: number;
  /** Window end (exclusive): `offset + length` clipped to the file size. */
  readonly end: number;
  readonly file: OpenFile;
  readonly #sparse: boolean;
  readonly #chunkSize: number;
  readonly #readAheadBytes: number;
  readonly #zeroes: ZeroDetection | null;
  readonly #signal: AbortSignal | undefined;
  #iterated = false;
  /** Set by `fileSendChunks`: big data pieces of a file in memory come out as `FileRange`s. */
  #fileRanges = false;

  private constructor(file: OpenFile, offset: number, end: number, opts: ChunkReaderOptions, zd: ZeroDetection | null) {
    this.file = file;
    this.offset = offset;
    this.end = end;
    this.#sparse = opts.sparse ?? true;
    this.#chunkSize = opts.chunkSize ?? LEGACY_PAYLOAD_MAX;
    this.#readAheadBytes = opts.readAheadBytes ?? 1 << 20;
    this.#zeroes = this.#sparse ? zd : null;
    this.#signal = opts.signal;
  }

  static async open(target: FileTarget, opts: ChunkReaderOptions = {}): Promise<ChunkReader> {
    const offset = checkByteCount('offset', opts.offset ?? 0);
    if (opts.length !== undefined) checkByteCount('length', opts.length);
    for (const [name, v] of [['chunkSize', opts.chunkSize], ['readAheadBytes', opts.readAheadBytes]] as const) {
      if (v !== undefined && (!Number.isSafeInteger(v) || v < 1)) {
        throw new SparsevirtError('ERR_INVALID_ARG', `${name} must be a positive integer, got ${v}`);
      }
    }
    const zd = zeroDetection(opts.detectZeroes);
    if (opts.signal?.aborted) throw abortError(opts.signal);
    const file = await openFile(target, fs.constants.O_RDONLY);
    const end = Math.max(offset, Math.min(file.size, opts.length === undefined ? file.size : offset + opts.length));
    return new ChunkReader(file, offset, end, opts, zd);
  }

  /** Closes the file of a reader that will not be iterated. */
  close(): Promise<void> {
    return this.file.close();
  }

  [Symbol.asyncIterator](): AsyncIterator<Chunk> {
    return flatten(this.#iterate(), this.#signal) as AsyncIterator<Chunk>;
  }

  /**
   * The chunks in arrays of those ready at once (up to 1,024 chunks, or about `readAheadBytes`
   * of data): one promise per batch instead of one per chunk (see `Stream.sendBatch`). The
   * signal is checked between batches.
   */
  batches(): AsyncIterator<Chunk[]> {
    return this.#iterate() as AsyncIterator<Chunk[]>;
  }

  #iterate(): AsyncIterator<Array<Chunk | FileRange>> {
    if (this.#iterated) throw new SparsevirtError('ERR_STREAM_STATE', `${this.file.name}: a ChunkReader is iterated once`);
    this.#iterated = true;
    return this.#batches();
  }

  /** Internal: batches with `FileRange`s in place of big data pieces (see `fileSendBatches`). */
  static iterateRanges(reader: ChunkReader): AsyncIterator<Array<Chunk | FileRange>> {
    reader.#fileRanges = true;
    return reader.#iterate();
  }

  /**
   * The chunks, in batches: as many as are ready without waiting (up to BATCH_ITEMS chunks and
   * about `readAheadBytes` of buffered data), so that a consumer pays one promise per batch,
   * not per chunk: for 100,000 small extents the per-chunk promises of an async generator were
   * a third of an upload's CPU. A batch is yielded early when the next read is still in flight.
   */
  async *#batches(): AsyncGenerator<Array<Chunk | FileRange>, void, undefined> {
    const sparse = this.#sparse;
    const chunkSize = this.#chunkSize;
    const signal = this.#signal;
    const readAheadBytes = this.#readAheadBytes;
    let out: Array<Chunk | FileRange> = [];
    let outBytes = 0;
    /** Hole bytes seen but not yet emitted: adjacent holes leave as one chunk. */
    let hole = 0;
    const full = (): boolean => out.length >= BATCH_ITEMS || outBytes >= readAheadBytes;
    const take = (): Array<Chunk | FileRange> => {
      const batch = out;
      out = [];
      outBytes = 0;
      return batch;
    };
    // The pending hole: one chunk, or (not sparse) zeros, which may fill several batches.
    const holeOut = function* (): Generator<Array<Chunk | FileRange>> {
      for (const c of holeChunks(hole, sparse, chunkSize)) {
        out.push(c);
        if (full()) {
          yield take();
          if (signal?.aborted) throw abortError(signal);
        }
      }
      hole = 0;
    };
    if (certainlyAllHole(this.file)) {
      // Not one block allocated: one hole, without an extent walk (or loading the native library).
      try {
        if (signal?.aborted) throw abortError(signal);
        hole = this.end - this.offset;
        if (hole > 0) yield* holeOut();
        if (out.length > 0) yield take();
      } finally {
        await this.file.close();
      }
      return;
    }
    const { fd, name, isBlockDevice } = this.file;
    const walker = new ExtentWalker(fd, name, this.offset, this.end, !isBlockDevice);
    // planned items, oldest first from `head` on (an array's shift() would move all the others)
    let queue: Array<PendingRead | PendingHole | FileRange> = [];
    let head = 0;
    const zd = this.#zeroes;
    // With zero detection, reads end on multiples of the scan size so that every minRun piece
    // but those at extent edges is read whole: what is a hole depends on the file, not on reads.
    const readUnit = zd ? Math.max(zd.minRun, Math.floor(chunkSize / zd.minRun) * zd.minRun) : chunkSize;
    // Small reads are carved out of a shared slab: one ArrayBuffer for many 4 KiB extents
    // instead of one each (which the GC feels). A consumer keeping a chunk keeps its slab.
    let slab = Buffer.alloc(0);
    const carve = (length: number): Buffer => {
      if (length > SLAB_SIZE / 4) return Buffer.allocUnsafeSlow(length);
      if (slab.length < length) slab = Buffer.allocUnsafeSlow(SLAB_SIZE);
      const buf = slab.subarray(0, length);
      slab = slab.subarray(length);
      return buf;
    };
    let extent: Extent | null = null;
    let extentPos = 0;
    let queuedReads = 0;
    let queuedBytes = 0;
    // How much of a read to try inline, before the thread pool: all of it from a file in memory;
    // what the page cache holds elsewhere, until the filesystem says it cannot tell.
    let inline: 'memory' | 'cached' | 'none' = isBlockDevice ? 'cached' : sys.isMemoryBacked(fd) ? 'memory' : 'cached';
    const ranges = this.#fileRanges && inline === 'memory' && !zd;
    const file = ranges ? fileRef(fd) : null;
    const readInline = (buf: Buffer, at: number): number => {
      if (inline === 'memory') {
        try {
          return fs.readSync(fd, buf, 0, buf.length, at);
        } catch (err) {
          throw ioError('cannot read', name, err);
        }
      }
      const n = inline === 'cached' ? sys.preadNoWait(fd, buf, at) : 0;
      if (n < 0 && n !== -sys.EAGAIN) inline = 'none';
      return Math.max(n, 0);
    };

    // Plan and start reads until the read-ahead budget is used: the next piece of the extent.
    const fill = (): void => {
      while (queuedReads < MAX_QUEUED_READS && (queuedReads === 0 || queuedBytes < readAheadBytes)) {
        if (!extent || extentPos === extent.offset + extent.length) {
          extent = walker.next();
          if (!extent) return;
          extentPos = extent.offset;
        }
        const extentEnd = extent.offset + extent.length;
        if (extent.kind === 'hole') {
          queue.push({ kind: 'hole', length: extent.length });
          extentPos = extentEnd;
          continue;
        }
        const stop = zd ? (Math.floor(extentPos / readUnit) + 1) * readUnit : extentPos + readUnit;
        const length = Math.min(stop, extentEnd) - extentPos;
        if (ranges) {
          queue.push({ kind: 'file', file: file!, offset: extentPos, length });
          extentPos += length;
          queuedReads++; // (bounds how far the extent walk runs ahead; no bytes are held)
          continue;
        }
        const buf = carve(length);
        const cached = inline === 'none' ? 0 : readInline(buf, extentPos);
        let read: Promise<number> | null = null;
        if (cached < length) {
          read = readFully(fd, buf, extentPos, cached);
          // Settled later, in order; until then a failure must not count as unhandled.
          read.catch(() => undefined);
        }
        queue.push({ kind: 'data', offset: extentPos, buf, read });
        extentPos += length;
        queuedReads++;
        queuedBytes += length;
      }
    };

    const addData = (bytes: Buffer): void => {
      out.push({ kind: 'data', bytes });
      outBytes += bytes.length;
    };
    try {
      for (;;) {
        if (full()) yield take();
        fill();
        // checked before taking the item: a read still in flight stays in `queue`, where the
        // cleanup below waits for it before the file can be closed.
        if (signal?.aborted) throw abortError(signal);
        const item = queue[head];
        if (!item) break;
        if (item.kind === 'data' && item.read && out.length > 0) {
          // this one is still being read: hand over what is ready first
          yield take();
          continue;
        }
        head++;
        if (head === queue.length) {
          queue.length = 0;
          head = 0;
        } else if (head >= 64) {
          queue = queue.slice(head);
          head = 0;
        }
        if (item.kind === 'hole') {
          hole += item.length;
          continue;
        }
        // (with zero detection a hole may still grow into the data: it is emitted with it below)
        if (hole > 0 && !zd) {
          if (!sparse) yield* holeOut();
          else {
            out.push({ kind: 'hole', length: hole });
            hole = 0;
          }
        }
        if (item.kind === 'file') {
          queuedReads--;
          out.push(item);
          outBytes += item.length; // (a batch stands for a bounded part of the file: aborts, progress)
          continue;
        }
        let n = item.buf.length;
        if (item.read) {
          try {
            n = await item.read;
          } catch (err) {
            throw ioError('cannot read', name, err);
          }
        }
        queuedReads--;
        queuedBytes -= item.buf.length;
        if (n < item.buf.length) {
          throw ioError('cannot read', name, `file shrank while reading (EOF at ${item.offset + n})`);
        }
        fill();
        if (!zd) {
          addData(item.buf);
          continue;
        }
        for (const [isZero, from, to] of zeroRuns(item.buf, item.offset, zd.minRun)) {
          if (isZero) {
            hole += to - from;
            continue;
          }
          if (hole > 0) yield* holeOut();
          for (let p = from; p < to; p += chunkSize) {
            addData(item.buf.subarray(p, Math.min(p + chunkSize, to)));
            if (full()) yield take();
          }
        }
      }
      if (hole > 0) yield* holeOut();
      if (out.length > 0) yield take();
    } finally {
      // Reads still in flight target our fd: let them land before the fd can be closed and reused.
      await Promise.allSettled(queue.slice(head).map((q) => (q.kind === 'data' ? q.read : null)));
      await this.file.close();
    }
  }
}

/** A hole of `length` bytes: one hole chunk, or zero data (views of the shared zero buffer). */
function* holeChunks(length: number, sparse: boolean, chunkSize: number): Generator<Chunk> {
  if (sparse) {
    yield { kind: 'hole', length };
    return;
  }
  for (let left = length; left > 0; left -= chunkSize) {
    yield { kind: 'data', bytes: zeroes(Math.min(chunkSize, left)) };
  }
}

/**
 * Splits `buf` (read at file offset `offset`) into maximal runs of all-zero and other
 * `minRun`-aligned pieces: `[isZero, start, end)` with start/end as indexes into `buf`.
 */
function* zeroRuns(buf: Buffer, offset: number, minRun: number): Generator<[boolean, number, number]> {
  const zero = zeroes(minRun);
  let runStart = 0;
  let runZero = false;
  for (let from = 0; from < buf.length; ) {
    const to = Math.min(buf.length, (Math.floor((offset + from) / minRun) + 1) * minRun - offset);
    const isZero = buf.compare(zero, 0, to - from, from, to) === 0;
    if (from === 0) runZero = isZero;
    else if (isZero !== runZero) {
      yield [runZero, runStart, from];
      runStart = from;
      runZero = isZero;
    }
    from = to;
  }
  if (buf.length > 0) yield [runZero, runStart, buf.length];
}

/**
 * Chunks of a file or block device, opened lazily on first iteration (see `ChunkReader`).
 * A block device is all data, sized from the device.
 */
export function fileChunks(target: FileTarget, opts: ChunkReaderOptions = {}): AsyncIterable<Chunk> {
  return lazyIterable(() => ChunkReader.open(target, opts).then((r) => r[Symbol.asyncIterator]()));
}

/**
 * An iterable whose iterator is opened on the first `next()`, then called directly: an async
 * generator with `yield*` would add a promise hop to every chunk.
 */
function lazyIterable<T>(openIt: () => Promise<AsyncIterator<T>>): AsyncIterable<T> {
  return {
    [Symbol.asyncIterator]: (): AsyncIterator<T> => {
      let it: AsyncIterator<T> | null = null;
      let opening: Promise<AsyncIterator<T>> | null = null;
      const open = (): Promise<AsyncIterator<T>> => (opening ??= openIt().then((i) => (it = i)));
      return {
        next: () => (it ? it.next() : open().then((i) => i.next())),
        return: async () => {
          const i = it ?? (await opening);
          if (i?.return) return i.return();
          return { done: true, value: undefined };
        },
      };
    },
  };
}

/**
 * The items of batches one by one; the batch iterator moves on once a batch is used up. An abort
 * of `signal` stops it before the next item, as it stops the batches. Calls that overlap are
 * answered in order, as an async generator does.
 */
function flatten<T>(batches: AsyncIterator<T[]>, signal: AbortSignal | undefined): AsyncIterator<T> {
  const end: IteratorReturnResult<undefined> = { done: true, value: undefined };
  let batch: T[] = [];
  let i = 0;
  let closed = false;
  /** The next batch being fetched: calls meanwhile wait for it. */
  let fetching: Promise<unknown> | null = null;
  const first = (r: IteratorResult<T[]>): IteratorResult<T> | Promise<IteratorResult<T>> => {
    fetching = null;
    if (r.done || closed) {
      closed = true;
      return end;
    }
    batch = r.value;
    i = 0;
    return batch.length === 0 ? fetch() : { done: false, value: batch[i++]! };
  };
  const fetch = (): Promise<IteratorResult<T>> => {
    const p = batches.next().then(first, (err: unknown) => {
      fetching = null;
      closed = true;
      throw err;
    });
    fetching = p;
    return p;
  };
  const stop = async (): Promise<IteratorReturnResult<undefined>> => {
    if (closed) return end;
    closed = true;
    batch = [];
    i = 0;
    await batches.return?.();
    return end;
  };
  const next = (): Promise<IteratorResult<T>> => {
    if (fetching !== null) return fetching.then(next, next);
    if (closed) return Promise.resolve(end);
    if (i >= batch.length) return fetch();
    if (signal?.aborted) return stop().then(() => Promise.reject(abortError(signal)));
    return Promise.resolve({ done: false, value: batch[i++]! });
  };
  return { next, return: stop };
}

/**
 * `fileChunks` for a sender that can take `FileRange`s (`Stream.sendChunks`): from a file in
 * memory, data comes out as ranges of the file instead of buffers, read only where they go
 * (a socket takes large ones by `sendfile(2)`, small ones are read straight into its output
 * batch). Elsewhere (disks, block devices, zero detection) the same chunks as `fileChunks`.
 * A range is valid until the next `next()`.
 */
export function fileSendChunks(target: FileTarget, opts: ChunkReaderOptions = {}): AsyncIterable<Chunk | FileRange> {
  return lazyIterable(() => ChunkReader.open(target, opts).then((r) => flatten(ChunkReader.iterateRanges(r), opts.signal)));
}

/**
 * `fileSendChunks` in batches: arrays of the chunks and ranges ready at once, for
 * `Stream.sendBatch` (one promise per batch, not per chunk). The ranges of a batch are valid
 * until the next `next()`.
 */
export function fileSendBatches(target: FileTarget, opts: ChunkReaderOptions = {}): AsyncIterable<Array<Chunk | FileRange>> {
  return lazyIterable(() => ChunkReader.open(target, opts).then((r) => ChunkReader.iterateRanges(r)));
}

/**
 * The extent map of a window of a file: ordered, adjacent extents of different kinds,
 * covering exactly [offset, min(offset + length, size)).
 */
export async function readExtents(target: FileTarget, opts: WindowOptions = {}): Promise<Extent[]> {
  const extents: Extent[] = [];
  const add = (kind: Extent['kind'], offset: number, length: number): void => {
    const last = extents[extents.length - 1];
    if (last?.kind === kind) last.length += length;
    else extents.push({ offset, length, kind });
  };
  if (zeroDetection(opts.detectZeroes)) {
    // Zero detection has to read the data: let the reader do it, and map its chunks back.
    const reader = await ChunkReader.open(target, { ...opts, chunkSize: ZERO_SCAN_READ });
    let pos = reader.offset;
    for await (const c of reader) {
      const length = chunkLength(c);
      add(c.kind, pos, length);
      pos += length;
    }
    return extents;
  }
  const offset = checkByteCount('offset', opts.offset ?? 0);
  if (opts.length !== undefined) checkByteCount('length', opts.length);
  const file = await openFile(target, fs.constants.O_RDONLY);
  try {
    const end = Math.max(offset, Math.min(file.size, opts.length === undefined ? file.size : offset + opts.length));
    const walker = new ExtentWalker(file.fd, file.name, offset, end, !file.isBlockDevice);
    for (let e = walker.next(); e; e = walker.next()) add(e.kind, e.offset, e.length);
    return extents;
  } finally {
    await file.close();
  }
}
