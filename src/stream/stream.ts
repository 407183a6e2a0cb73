import type { Readable, Writable } from 'node:stream';
import { kDeliver, kDeliverEnd, kDeliverError, kDirectTarget, type DirectTarget, type StreamChannel, type StreamInbound } from '../channel.js';
import { type Chunk, type FileRange, type FileRef, type WrittenRange, LEGACY_PAYLOAD_MAX, MAX_SAFE_BYTES, chunkLength, isBatch, readFileRange } from '../chunk.js';
import { streamCloseChannel } from '../diagnostics.js';
import { SparsevirtError } from '../errors.js';
import { type ReadableOptions, type WritableOptions, streamToReadable, streamToWritable } from './adapters.js';
import { ChunkQueue } from './queue.js';
import { ZERO_CHUNK_SIZE, zeroBytes } from './zeros.js';

/**
 * libvirt's stream model (virStream*) over a `StreamChannel`.
 *
 * A stream carries data one way: it is either sending (upload client, download server) or
 * receiving (download client, upload server). The direction is fixed by `options.direction`
 * or, if omitted, by the first call (`send*` → sending; `recv*`/iteration or an incoming
 * chunk → receiving). Channel implementations should pass `direction`: an end of stream
 * arriving before anything else is otherwise read as "EOF of an empty download".
 *
 * Sending: `send`, `sendHole`, `finish`, `abort`, and the helpers `sendAll`, `sparseSendAll`,
 * `sendChunk(s)`. One call at a time: each awaits `channel.write`, which is how
 * backpressure reaches the caller. Holes are merged: a pending hole is kept and written just
 * before the next data or at finish, so the channel never sees two holes in a row from us.
 *
 * Receiving: `recv`, `recvHole`, `for await (const chunk of stream)`, and the helpers
 * `recvAll`, `sparseRecvAll`, `toReadable`. Incoming chunks are queued (data passed through,
 * never copied; adjacent holes merged); once more than `highWaterMark` data bytes are
 * queued the channel is paused, and resumed when the queue drains to half of it.
 *
 * Ending: `finish()` is libvirt's virStreamFinish: the sender's "no more data" (resolves when
 * the peer confirmed), or the receiver's acknowledgement of EOF — a receiver may also finish
 * before EOF, which asks the peer to stop. `abort()` is virStreamAbort. If the receiving side
 * finishes early, the sender's pending and later sends reject with ERR_STREAM_STATE and
 * `finishedByPeer` becomes true; the sending helpers treat that as a normal end.
 *
 * Errors (match on `err.code`):
 * - ERR_STREAM_STATE: a call out of order (send after finish, recv after abort, two
 *   concurrent recv calls, sending on a receiving stream, …).
 * - ERR_ABORTED: the stream was aborted (by `abort()`, the AbortSignal, or the peer) while the
 *   call was pending; `cause` is the abort reason.
 * - ERR_STREAM_NOT_SPARSE: a hole on a stream that was not opened sparse.
 * - ERR_INVALID_ARG, ERR_PROTOCOL, and whatever the channel reports (e.g. a RemoteError).
 * After a failure reported by the channel (`[kDeliverError]`, a rejected write or finish) every
 * later call rejects with that same error, as libvirt reports a dead stream's error on the
 * next call.
 *
 * Buffers handed out by a stream are views (of the peer's buffers, of the receive buffer, or
 * of a shared zero buffer for holes): treat them as read-only.
 *
 * Unlike libvirt's virStream*All, which leave virStreamFinish to the caller, the helpers here
 * finish the stream themselves on success (and abort it on failure).
 *
 * For channel implementers (the rpc layer's `WireStream`, the in-memory pair), who call the
 * stream's `StreamInbound` side through the symbols of `channel.ts`:
 * - `[kDeliverEnd]()` on a receiving stream is EOF (download: the empty CONTINUE; upload
 *   server: the client's STREAM/OK). On a sending stream it means the receiver finished early;
 *   the receiver's acknowledgement of our own finish must resolve `finish()` instead.
 * - Deliveries after the stream finished, aborted or failed are dropped silently, so the
 *   channel need not filter what the peer had queued before it saw our finish/abort.
 * - When the stream stops reading (finish early, abort, failure) a paused channel is resumed:
 *   it must keep draining the socket until the peer confirms.
 * - After `[kDeliverError]` or a rejected write/finish the stream never calls the channel again
 *   (libvirt: no finish/abort after the server reported an error). Protocol violations the
 *   stream detects itself (a hole on a non-sparse stream, a bad hole length, data after EOF)
 *   fail it like `[kDeliverError]` and call `channel.abort(err)` so the peer stops.
 */

export type StreamDirection = 'send' | 'recv';

/**
 * - open: usable.
 * - finishing: finish() is waiting for the peer.
 * - finished: done cleanly (our finish confirmed, or the receiver finished early).
 * - aborted: aborted locally (abort(), the AbortSignal, a helper's failure).
 * - failed: the channel or the peer reported an error (including the peer's abort, as
 *   ERR_ABORTED), or the peer broke the protocol.
 */
export type StreamState = 'open' | 'finishing' | 'finished' | 'aborted' | 'failed';

export interface StreamOptions {
  /** The stream was opened with libvirt's sparse flag: holes may travel. */
  sparse: boolean;
  /** Data bytes queued incoming before `channel.pauseIncoming()`. Default 2 MiB (eight full packets). */
  highWaterMark?: number;
  /** Aborts the stream; pending calls reject with ERR_ABORTED (`cause` = `signal.reason`). */
  signal?: AbortSignal;
  /** Fix the direction up front (recommended for channels); otherwise the first call decides. */
  direction?: StreamDirection;
}

export interface RecvOptions {
  /** libvirt's VIR_STREAM_RECV_STOP_AT_HOLE: report a hole instead of reading it as zeros. */
  stopAtHole?: boolean;
}

/** `recv(…, { stopAtHole: true })` at a hole: a signal; the hole is consumed by `recvHole()`. */
export interface HoleSignal {
  hole: number;
}

/** A Buffer of data (or zeros), a hole signal, or `null` at EOF. */
export type RecvResult = Buffer | HoleSignal | null;

/** Pull-style byte source, as libvirt's virStreamSourceFunc: `null` or empty = EOF. */
export type ByteReader = (max: number) => Promise<Buffer | null>;
export type ByteSource = AsyncIterable<Buffer> | ByteReader;
export type ByteSink = (bytes: Buffer) => Promise<void> | void;
export type HoleSink = (length: number) => Promise<void> | void;

/** libvirt's virStreamSourceHoleFunc: where the source stands; `length` 0 = end of source. */
export interface HoleQueryResult {
  inData: boolean;
  length: number;
}
export type HoleQuery = () => Promise<HoleQueryResult>;
/** libvirt's virStreamSourceSkipFunc: advance the source past a hole that was sent. */
export type HoleSkip = (length: number) => Promise<void>;

/** Where a receiving stream may write large data packets itself (`Stream.receiveInto`). */
export interface ReceiveTarget {
  /** The consumer's file (in memory: tmpfs, ramfs; see `fileRef`); the channel writes through a duplicate of it. */
  file: FileRef;
  /** The file offset of stream position 0. */
  base: number;
  /** No packet is written in place past this file offset (default: none). */
  limit?: number;
}

export const DEFAULT_HIGH_WATER_MARK = 2 * 1024 * 1024;

/** Published when a stream reaches a final state: `{ stream, state, error }`. */
export { streamCloseChannel };

const DONE: IteratorReturnResult<undefined> = Object.freeze({ done: true, value: undefined });

function noop(): void {}

function stateError(message: string, cause?: unknown): SparsevirtError {
  return new SparsevirtError('ERR_STREAM_STATE', message, cause === undefined ? undefined : { cause });
}

function abortedError(reason: unknown): SparsevirtError {
  const why = reason === undefined ? '' : `: ${reason instanceof Error ? reason.message : String(reason)}`;
  return new SparsevirtError('ERR_ABORTED', `stream aborted${why}`, { cause: reason });
}

function toError(err: unknown): Error {
  return err instanceof Error ? err : new SparsevirtError('ERR_PROTOCOL', `stream channel failed: ${String(err)}`, { cause: err });
}

function isChunk(v: unknown): v is Chunk {
  if (typeof v !== 'object' || v === null) return false;
  const c = v as { kind?: unknown; bytes?: unknown; length?: unknown };
  return (c.kind === 'data' && Buffer.isBuffer(c.bytes)) || (c.kind === 'hole' && typeof c.length === 'number');
}

/** A non-negative integer below 2^53 (an offset or a length). */
function isByteCount(v: number): boolean {
  return Number.isSafeInteger(v) && v >= 0;
}

/** A file handle from the floor below (`fileRef`): what a file range's bytes are read through. */
function isFileRef(v: unknown): v is FileRef {
  return typeof v === 'object' && v !== null && typeof (v as FileRef).readInto === 'function';
}

/** What the iterator yields: chunks (ranges written in place read back), chunks and ranges, or arrays of those. */
type IterMode = 'bytes' | 'in-place' | 'batches';

/** Most chunks a batch of received chunks holds (`recvBatch`, `batchesInPlace`). */
const BATCH_MAX = 1024;

type DataChunk = Extract<Chunk, { kind: 'data' }>;

export class Stream implements StreamInbound, AsyncIterable<Chunk> {
  readonly sparse: boolean;
  readonly highWaterMark: number;
  private readonly channel: StreamChannel;

  private dir: StreamDirection | undefined;
  private st: StreamState = 'open';
  /** The abort error (aborted) or the failure (failed). */
  private err: Error | undefined;
  private peerFinished = false;
  private peerFinishedErr: SparsevirtError | undefined;
  /** Bytes (data + holes) handed to the channel, or consumed by the reader. */
  private pos = 0;

  // --- sending
  private pendingHole = 0;
  /** A send/sendHole/finish call is outstanding: sending calls are strictly sequential. */
  private sending = false;

  // --- receiving
  private readonly queue = new ChunkQueue();
  /** The peer's end of data arrived. */
  private ended = false;
  /** Bytes delivered so far, to refuse a stream longer than 2^53. */
  private delivered = 0;
  private paused = false;
  /** Who holds the read side: 'recv' during one call, or a helper/iterator for its lifetime. */
  private reader: string | undefined;
  private iterated = false;
  private iterDone = false;
  /** Where large incoming packets go in place (`receiveInto`). */
  private direct: { file: FileRef; base: number; limit: number } | null = null;

  // --- the one outstanding channel call (write/finish) and the one waiting reader.
  // Settled through fields and methods bound once, so the hot path allocates no closures;
  // a late settlement after the stream died finds the fields cleared and is a no-op.
  private opResolve: (() => void) | undefined;
  private opReject: ((err: Error) => void) | undefined;
  private readerResolve: (() => void) | undefined;
  private readerReject: ((err: Error) => void) | undefined;

  private signal: AbortSignal | undefined;

  constructor(channel: StreamChannel, options: StreamOptions) {
    const hwm = options.highWaterMark ?? DEFAULT_HIGH_WATER_MARK;
    if (!Number.isSafeInteger(hwm) || hwm <= 0) {
      throw new SparsevirtError('ERR_INVALID_ARG', `highWaterMark must be a positive integer, got ${hwm}`);
    }
    if (options.direction !== undefined && options.direction !== 'send' && options.direction !== 'recv') {
      throw new SparsevirtError('ERR_INVALID_ARG', `direction must be 'send' or 'recv', got ${String(options.direction)}`);
    }
    this.channel = channel;
    this.sparse = options.sparse === true;
    this.highWaterMark = hwm;
    this.dir = options.direction;
    const signal = options.signal;
    if (signal !== undefined) {
      if (signal.aborted) {
        void this.abort(signal.reason);
      } else {
        this.signal = signal;
        signal.addEventListener('abort', this.onSignalAbort, { once: true });
      }
    }
  }

  // ------------------------------------------------------------------ introspection

  get state(): StreamState {
    return this.st;
  }

  /** 'send', 'recv', or undefined until the first call decides. */
  get direction(): StreamDirection | undefined {
    return this.dir;
  }

  /** Stream position: bytes (data + holes) sent so far, or consumed by the reader so far. */
  get position(): number {
    return this.pos;
  }

  /** Data bytes received and not consumed yet (holes count 0). */
  get queuedBytes(): number {
    return this.queue.bytes;
  }

  /** The receiving side finished before our end of data: it wants no more. */
  get finishedByPeer(): boolean {
    return this.peerFinished;
  }

  // ------------------------------------------------------------------ sending

  /**
   * virStreamSend: send all of `bytes` (passed to the channel as is, not copied) and resolve
   * with its length once the channel can take more. An empty buffer is a no-op returning 0.
   */
  async send(bytes: Buffer): Promise<number> {
    if (!Buffer.isBuffer(bytes)) {
      throw new SparsevirtError('ERR_INVALID_ARG', 'send() takes a Buffer');
    }
    this.beginSend('send');
    try {
      if (bytes.length !== 0) await this.sendData({ kind: 'data', bytes });
      return bytes.length;
    } finally {
      this.sending = false;
    }
  }

  /**
   * virStreamSendHole: the next `length` bytes read as zero. Only on a sparse stream
   * (ERR_STREAM_NOT_SPARSE otherwise, and nothing is sent). The hole is merged with adjacent
   * ones and written just before the next data, or at finish.
   */
  async sendHole(length: number): Promise<void> {
    if (!Number.isSafeInteger(length) || length < 0) {
      throw new SparsevirtError('ERR_INVALID_ARG', `hole length must be an integer from 0 to 2^53, got ${length}`);
    }
    this.beginSend('sendHole');
    try {
      if (!this.sparse) {
        throw new SparsevirtError('ERR_STREAM_NOT_SPARSE', 'sendHole(): the stream was not opened sparse; send the zeros as data instead');
      }
      this.addHole(length);
    } finally {
      this.sending = false;
    }
  }

  /**
   * Send one chunk: data is passed through untouched; a hole becomes `sendHole` on a sparse
   * stream and is materialised as zeros on a non-sparse one (holes never travel without the
   * sparse flag).
   */
  async sendChunk(chunk: Chunk): Promise<void> {
    if (!isChunk(chunk)) {
      throw new SparsevirtError('ERR_INVALID_ARG', 'sendChunk() takes a Chunk: { kind: "data", bytes: Buffer } or { kind: "hole", length }');
    }
    if (chunk.kind === 'hole' && (!Number.isSafeInteger(chunk.length) || chunk.length < 0)) {
      throw new SparsevirtError('ERR_INVALID_ARG', `hole length must be an integer from 0 to 2^53, got ${chunk.length}`);
    }
    this.beginSend('sendChunk');
    try {
      if (chunk.kind === 'data') {
        if (chunk.bytes.length !== 0) await this.sendData(chunk);
      } else if (this.sparse) {
        this.addHole(chunk.length);
      } else {
        await this.sendZeros(chunk.length);
      }
    } finally {
      this.sending = false;
    }
  }

  // ------------------------------------------------------------------ receiving

  /**
   * virStreamRecvFlags: up to `max` bytes from the head of the queue (a view, no copy; never
   * spans two incoming chunks), waiting if nothing is queued. `null` at EOF (every time).
   *
   * At a hole: without `stopAtHole` the hole reads as zeros (consumed progressively, at most
   * 1 MiB per call); with `stopAtHole` the call returns `{ hole: n }` without consuming
   * anything — libvirt's -3 — and `recvHole()` then consumes it.
   */
  async recv(max: number, options?: RecvOptions): Promise<RecvResult> {
    if (!Number.isSafeInteger(max) || max <= 0) {
      throw new SparsevirtError('ERR_INVALID_ARG', `recv() max must be a positive integer, got ${max}`);
    }
    this.beginRead('recv');
    this.reader = 'recv';
    try {
      if (this.queue.isEmpty && !(await this.waitReadable())) return null;
      if (options?.stopAtHole === true) {
        const hole = this.queue.headHole();
        if (hole !== 0) return { hole };
      }
      return this.consumeBytes(max);
    } finally {
      this.reader = undefined;
    }
  }

  /**
   * virStreamRecvHole: consume the hole at the head of the queue and return its length; 0
   * if the stream is not at a hole (this does not wait). Sparse streams only.
   */
  async recvHole(): Promise<number> {
    this.beginRead('recvHole');
    if (!this.sparse) {
      throw new SparsevirtError('ERR_STREAM_NOT_SPARSE', 'recvHole(): the stream was not opened sparse');
    }
    const n = this.queue.takeHole();
    this.pos += n;
    return n;
  }

  /**
   * The next incoming chunk whole: a data view, a merged hole, or (after `receiveInto`) a
   * `WrittenRange`; `null` at EOF. Unlike the iterator it does not finish the stream at EOF: for
   * a consumer that acknowledges only once everything is stored (the daemon's upload).
   */
  async recvChunk(): Promise<Chunk | WrittenRange | null> {
    this.beginRead('recvChunk');
    this.reader = 'recvChunk';
    try {
      if (this.queue.isEmpty && !(await this.waitReadable())) return null;
      const chunk = this.queue.takeChunk();
      this.pos += chunkLength(chunk);
      this.afterConsume();
      return chunk;
    } finally {
      this.reader = undefined;
    }
  }

  /**
   * `recvChunk` for everything queued (at least one chunk, at most `max`), with one promise for
   * them all: 100,000 small packets arrive many per socket read. Null at EOF (not acknowledged).
   */
  async recvBatch(max = BATCH_MAX): Promise<Array<Chunk | WrittenRange> | null> {
    if (!Number.isSafeInteger(max) || max < 1) throw new SparsevirtError('ERR_INVALID_ARG', `recvBatch(): max must be a positive integer, got ${max}`);
    this.beginRead('recvBatch');
    this.reader = 'recvBatch';
    try {
      if (this.queue.isEmpty && !(await this.waitReadable())) return null;
      return this.takeBatch(max);
    } finally {
      this.reader = undefined;
    }
  }

  private takeBatch(max: number): Array<Chunk | WrittenRange> {
    const batch: Array<Chunk | WrittenRange> = [];
    while (!this.queue.isEmpty && batch.length < max) {
      const chunk = this.queue.takeChunk();
      this.pos += chunkLength(chunk);
      batch.push(chunk);
    }
    this.afterConsume();
    return batch;
  }

  /**
   * Let the channel write large incoming data packets straight into the consumer's file: stream
   * position p lands at file offset `base + p`, and a packet that would pass `limit` comes as
   * data. Over a socket the rpc layer splices them (splice(2): socket → pipe → file), so their
   * bytes never pass through a buffer of ours. They then come out as `WrittenRange`s, from
   * `recvChunk()` and `chunksInPlace()`; byte reads (`recv`, the plain iterator) read them back.
   *
   * The file must live in memory (tmpfs, ramfs): the writes happen on the event loop. Pass
   * `null` before closing the file, to stop. Ranges name `file`: reading them back needs it open
   * for reading. Returns whether the channel will do it (not on an in-memory pair, a stream that
   * is not receiving, or without the native syscalls).
   */
  receiveInto(target: ReceiveTarget | null): boolean {
    if (target === null) {
      this.stopDirect();
      return false;
    }
    if (this.direct !== null || this.st !== 'open' || this.dir === 'send' || this.channel.receiveDirect === undefined) return false;
    const limit = target.limit ?? MAX_SAFE_BYTES;
    if (!Number.isSafeInteger(target.base) || target.base < 0 || !Number.isSafeInteger(limit)) {
      throw new SparsevirtError('ERR_INVALID_ARG', 'receiveInto(): base and limit must be byte offsets');
    }
    if (!isFileRef(target.file)) throw new SparsevirtError('ERR_INVALID_ARG', 'receiveInto(): file must be a file reference (fileRef)');
    if (!this.channel.receiveDirect(target.file)) return false;
    this.dir = 'recv';
    this.direct = { file: target.file, base: target.base, limit };
    return true;
  }

  private stopDirect(): void {
    if (this.direct === null) return;
    this.direct = null;
    this.channel.receiveDirect?.(null);
  }

  /** StreamInbound: where a data packet of `length` bytes arriving now goes. */
  [kDirectTarget](length: number): DirectTarget | null {
    const d = this.direct;
    if (d === null || this.st !== 'open' || this.ended) return null;
    const offset = d.base + this.delivered;
    if (offset + length > d.limit) return null;
    return { file: d.file, offset, key: d };
  }

  /**
   * Like the iterator, but ranges the channel wrote in place (`receiveInto`) come as they are,
   * not read back: for a consumer that writes everything else into that same file. Like the
   * stream itself, it is iterated once, and the stream is claimed only when that starts.
   */
  chunksInPlace(): AsyncIterable<Chunk | WrittenRange> {
    return { [Symbol.asyncIterator]: () => this.iterate('in-place') as AsyncIterableIterator<Chunk | WrittenRange> };
  }

  /**
   * `chunksInPlace()` in arrays: everything queued when the consumer asks (up to 1,024 chunks),
   * one promise for them all (see `writeChunks`, `SparseWriter.writeBatch`). The end is
   * acknowledged when the iteration ends (`done`); leaving the loop early aborts the stream, also
   * after the last batch: a batch counts as processed only once the next one is asked for.
   */
  batchesInPlace(): AsyncIterable<Array<Chunk | WrittenRange>> {
    return { [Symbol.asyncIterator]: () => this.iterate('batches') as AsyncIterableIterator<Array<Chunk | WrittenRange>> };
  }

  /**
   * The received chunks as they arrive: data views (whole incoming chunks where possible) and
   * merged holes. At EOF it calls `finish()` (acknowledges) and ends. Leaving the loop early
   * (`break`, `return`, an exception) aborts the stream — or finishes it if everything up to
   * EOF had already been read. Iterate once.
   */
  [Symbol.asyncIterator](): AsyncIterableIterator<Chunk> {
    return this.iterate('bytes') as AsyncIterableIterator<Chunk>;
  }

  private iterate(mode: IterMode): AsyncIterableIterator<Chunk | WrittenRange | Array<Chunk | WrittenRange>> {
    if (this.iterated) throw stateError('a Stream can be iterated only once');
    this.beginRead('iterate');
    this.iterated = true;
    this.reader = 'its iterator';
    const iterator: AsyncIterableIterator<Chunk | WrittenRange | Array<Chunk | WrittenRange>> = {
      next: () => this.iterNext(mode),
      return: () => this.iterReturn(mode),
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  // ------------------------------------------------------------------ ending

  /**
   * virStreamFinish. Sending: write the pending hole, then tell the peer we are done; resolves
   * when it confirmed (every byte is stored), rejects with its error. Receiving: acknowledge
   * EOF — or, before EOF, ask the peer to stop (queued data is dropped; a pending `recv`
   * resolves with `null`). On a stream the receiver already finished, resolves at once.
   */
  async finish(): Promise<void> {
    if (this.peerFinished) return;
    this.checkLive('finish');
    if (this.dir === 'recv') {
      this.st = 'finishing';
      this.queue.clear();
      this.releaseIncoming();
      this.wakeReader();
      await this.track(this.channel.finish());
    } else {
      if (this.sending) throw stateError('cannot finish(): a send is in progress; await it first');
      this.dir = 'send'; // nothing sent yet: an empty upload
      this.sending = true;
      this.st = 'finishing';
      try {
        if (this.pendingHole !== 0) {
          await this.flushHole();
          this.ensureLive();
        }
        await this.track(this.channel.finish());
      } catch (err) {
        if (this.peerFinished) return; // the receiver finished meanwhile: nothing left to confirm
        throw err;
      } finally {
        this.sending = false;
      }
    }
    if (this.st === 'finishing') {
      this.st = 'finished';
      this.closed();
    }
  }

  /**
   * virStreamAbort: tell the peer to drop the stream. Pending calls reject at once with
   * ERR_ABORTED (`cause` = `reason`); later calls reject with ERR_STREAM_STATE. Resolves when
   * the channel confirmed; never rejects (the stream is dead either way). A no-op on a stream
   * that already ended.
   */
  abort(reason?: unknown): Promise<void> {
    if (this.st === 'finished' || this.st === 'aborted' || this.st === 'failed') return Promise.resolve();
    const err = abortedError(reason);
    this.terminate('aborted', err);
    try {
      return this.channel.abort(err).then(noop, noop);
    } catch {
      return Promise.resolve();
    }
  }

  // ------------------------------------------------------------------ helpers (libvirt's *All)

  /**
   * virStreamSendAll: send everything `source` yields (an AsyncIterable of Buffers, e.g. a
   * byte-mode Readable, or a reader called with 262120 that returns null/empty at EOF), then
   * finish. On failure the stream is aborted and the original error rethrown.
   */
  async sendAll(source: ByteSource): Promise<void> {
    try {
      if (typeof source === 'function') {
        for (;;) {
          const bytes = await source(LEGACY_PAYLOAD_MAX);
          if (bytes === null || bytes === undefined || bytes.length === 0) break;
          await this.send(bytes);
        }
      } else {
        for await (const bytes of source) await this.send(bytes);
      }
      await this.finish();
    } catch (err) {
      await this.helperFailed(err);
    }
  }

  /**
   * virStreamSparseSendAll: loop { holeQuery(); in a hole of length > 0 → sendHole + skip; in
   * data → read ≤ min(section left, 262120) and send; length 0 (or the reader's EOF) → stop },
   * then finish. A sparse stream is required for holes (ERR_STREAM_NOT_SPARSE, as libvirt).
   * On failure the stream is aborted and the original error rethrown.
   */
  async sparseSendAll(source: ByteReader, holeQuery: HoleQuery, skip: HoleSkip): Promise<void> {
    try {
      sections: for (;;) {
        const { inData, length } = await holeQuery();
        if (!Number.isSafeInteger(length) || length < 0) {
          throw new SparsevirtError('ERR_INVALID_ARG', `holeQuery() returned an invalid length ${length}`);
        }
        if (length === 0) break;
        if (!inData) {
          await this.sendHole(length);
          await skip(length);
          continue;
        }
        let left = length;
        while (left > 0) {
          const want = Math.min(left, LEGACY_PAYLOAD_MAX);
          const bytes = await source(want);
          if (bytes === null || bytes === undefined || bytes.length === 0) break sections;
          if (bytes.length > want) {
            throw new SparsevirtError('ERR_INVALID_ARG', `source returned ${bytes.length} bytes, more than the ${want} asked for`);
          }
          await this.send(bytes);
          left -= bytes.length;
        }
      }
      await this.finish();
    } catch (err) {
      await this.helperFailed(err);
    }
  }

  /**
   * Send every chunk of `source` (see `sendChunk`: holes merged, or zeros on a non-sparse
   * stream; arrays of them as `sendBatch`), then finish. The chunk-level upload everyone uses.
   * On failure the stream is aborted and the original error rethrown; if the receiver finished
   * early it resolves.
   */
  async sendChunks(source: AsyncIterable<Chunk | FileRange | ReadonlyArray<Chunk | FileRange>>): Promise<void> {
    try {
      for await (const chunk of source) {
        if (isBatch(chunk)) await this.sendBatch(chunk);
        else if (chunk.kind === 'file') await this.sendFileRange(chunk.file, chunk.offset, chunk.length);
        else await this.sendChunk(chunk);
      }
      await this.finish();
    } catch (err) {
      await this.helperFailed(err);
    }
  }

  /**
   * virStreamRecvAll: hand every received byte to `sink` (holes as zeros, ≤ 1 MiB per call),
   * then finish. On failure the stream is aborted and the original error rethrown.
   */
  async recvAll(sink: ByteSink): Promise<void> {
    this.beginRead('recvAll');
    this.reader = 'recvAll()';
    try {
      for (;;) {
        if (this.queue.isEmpty && !(await this.waitReadable())) break;
        const r = sink(this.consumeBytes(MAX_SAFE_BYTES));
        if (r !== undefined) await r;
      }
      this.reader = undefined;
      if (this.st === 'open') await this.finish();
    } catch (err) {
      this.reader = undefined;
      await this.helperFailed(err);
    }
  }

  /**
   * virStreamSparseRecvAll: data to `sink`, each hole (merged) to `onHole(length)`, then
   * finish. On failure the stream is aborted and the original error rethrown.
   */
  async sparseRecvAll(sink: ByteSink, onHole: HoleSink): Promise<void> {
    this.beginRead('sparseRecvAll');
    this.reader = 'sparseRecvAll()';
    try {
      for (;;) {
        if (this.queue.isEmpty && !(await this.waitReadable())) break;
        const hole = this.queue.takeHole();
        let r: Promise<void> | void;
        if (hole !== 0) {
          this.pos += hole;
          r = onHole(hole);
        } else {
          r = sink(this.consumeBytes(MAX_SAFE_BYTES));
        }
        if (r !== undefined) await r;
      }
      this.reader = undefined;
      if (this.st === 'open') await this.finish();
    } catch (err) {
      this.reader = undefined;
      await this.helperFailed(err);
    }
  }

  // ------------------------------------------------------------------ Node adapters

  /**
   * A Readable of the received stream, pulled by its `read()` (backpressure reaches the
   * channel). `holes: 'zeros'` (default): byte mode, holes as zeros. `holes: 'chunks'`:
   * objectMode, yielding Chunks. Uses the stream's iterator: EOF finishes the stream,
   * destroying the Readable early aborts it.
   */
  toReadable(options?: ReadableOptions): Readable {
    return streamToReadable(this, options);
  }

  /**
   * A Writable that sends what is written: Buffers, and in objectMode also Chunks. `final`
   * calls finish(); destroying it before that (e.g. pipeline() failing) aborts the stream.
   */
  toWritable(options?: WritableOptions): Writable {
    return streamToWritable(this, options);
  }

  // ------------------------------------------------------------------ StreamInbound (the channel calls these)

  [kDeliver](chunk: Chunk | WrittenRange): void {
    // Late packets after finish/abort/failure are dropped: the peer may have queued some
    // before it saw our finish or abort (libvirt: "must be discarded until the STREAM/OK").
    if (this.st !== 'open') return;
    if (this.dir === 'send') {
      this.protocolError(new SparsevirtError('ERR_PROTOCOL', 'received stream data on a stream used for sending'));
      return;
    }
    if (this.ended) {
      this.protocolError(new SparsevirtError('ERR_PROTOCOL', 'received stream data after the end of the stream'));
      return;
    }
    this.dir = 'recv';
    if (chunk.kind === 'data') {
      const n = chunk.bytes.length;
      if (n === 0) return; // nothing to queue; EOF is [kDeliverEnd](), never an empty chunk
      this.delivered += n;
      this.queue.push(chunk);
      if (!this.paused && this.queue.bytes > this.highWaterMark) {
        this.paused = true;
        this.channel.pauseIncoming();
      }
    } else if (chunk.kind === 'written') {
      // in the consumer's file already: no memory held, nothing for the window to count
      if (!(chunk.length > 0)) return;
      this.delivered += chunk.length;
      this.queue.push(chunk);
    } else {
      if (!this.sparse) {
        this.protocolError(new SparsevirtError('ERR_STREAM_NOT_SPARSE', 'received a hole on a stream that was not opened sparse'));
        return;
      }
      const length = chunk.length;
      if (!Number.isSafeInteger(length) || length < 0) {
        this.protocolError(new SparsevirtError('ERR_PROTOCOL', `received a hole of invalid length ${length}`));
        return;
      }
      if (length === 0) return; // libvirt's API allows an empty hole: nothing to deliver
      if (this.delivered + length > MAX_SAFE_BYTES) {
        this.protocolError(new SparsevirtError('ERR_PROTOCOL', 'received stream is longer than 2^53 bytes'));
        return;
      }
      this.delivered += length;
      this.queue.push(chunk);
    }
    this.wakeReader();
  }

  [kDeliverEnd](): void {
    if (this.dir === 'send') {
      if (this.st !== 'open' && this.st !== 'finishing') return;
      // On a sending stream the peer's "end" can only mean it finished before our end of data
      // (libvirt: a client may finish early during a download; the server stops and confirms).
      // Nothing more to send or to confirm. (Its acknowledgement of *our* finish is not an
      // end: it resolves channel.finish().)
      this.peerFinished = true;
      this.peerFinishedErr = stateError('the receiving side finished the stream early; it accepts no more data');
      this.pendingHole = 0;
      this.st = 'finished';
      const reject = this.opReject;
      this.clearOp();
      reject?.(this.peerFinishedErr);
      this.closed();
      return;
    }
    if (this.st !== 'open') return;
    this.dir = 'recv';
    this.ended = true;
    this.wakeReader();
  }

  [kDeliverError](err: Error): void {
    if (this.st === 'finished' || this.st === 'aborted' || this.st === 'failed') return;
    this.terminate('failed', toError(err));
  }

  // ------------------------------------------------------------------ internals: sending

  private beginSend(op: string): void {
    this.claim('send', op);
    this.checkLive(op);
    if (this.sending) {
      throw stateError(`cannot ${op}(): another send, sendHole or finish call is in progress; await it first`);
    }
    this.sending = true;
  }

  private addHole(length: number): void {
    if (this.pos + length > MAX_SAFE_BYTES) {
      throw new SparsevirtError('ERR_INVALID_ARG', 'stream position would pass 2^53 bytes');
    }
    this.pendingHole += length;
    this.pos += length;
  }

  /**
   * Send `length` bytes of `file` (in memory: tmpfs, ramfs; see `fileRef`) at `offset` as data:
   * the same as `sendChunk` with those bytes, but a socket channel hands the file's pages to the
   * kernel (sendfile) rather than reading them here. When it resolves the range is handed over
   * (the file may be closed), but pages passed by sendfile are the file's own until the peer
   * reads them: do not rewrite that part of the file meanwhile (up to the socket's 2 MiB).
   */
  async sendFileRange(file: FileRef, offset: number, length: number): Promise<void> {
    if (!isFileRef(file)) throw new SparsevirtError('ERR_INVALID_ARG', 'sendFileRange(): file must be a file reference (fileRef)');
    if (!isByteCount(offset) || !isByteCount(length)) {
      const [name, v] = !isByteCount(offset) ? ['offset', offset] : ['length', length];
      throw new SparsevirtError('ERR_INVALID_ARG', `${name} must be a non-negative integer, got ${v}`);
    }
    this.beginSend('sendFileRange');
    try {
      if (length === 0) return;
      if (this.pos + length > MAX_SAFE_BYTES) {
        throw new SparsevirtError('ERR_INVALID_ARG', 'stream position would pass 2^53 bytes');
      }
      if (this.pendingHole !== 0) {
        await this.flushHole();
        this.ensureLive();
      }
      this.pos += length;
      const p = this.toChannel({ kind: 'file', file, offset, length });
      if (p !== null) await this.track(p);
    } finally {
      this.sending = false;
    }
  }

  /**
   * Send several chunks and file ranges (as `sendChunk` and `sendFileRange` would, in order) with
   * one promise for all of them: a channel that can take them at once (the rpc layer, until the
   * socket is full) is called synchronously, and only backpressure is awaited. For 100,000 small
   * extents, one promise per chunk was a third of the sender's CPU. Resolves when all are
   * handed over (ranges read or given to the kernel: the caller may move on). Ranges are of files
   * in memory, as for `sendFileRange`. Items are checked one by one: an invalid one rejects with
   * ERR_INVALID_ARG after those before it were sent.
   */
  async sendBatch(items: ReadonlyArray<Chunk | FileRange>): Promise<void> {
    if (!isBatch(items)) throw new SparsevirtError('ERR_INVALID_ARG', 'sendBatch() takes an array of chunks and file ranges');
    this.beginSend('sendBatch');
    try {
      for (let i = 0; i < items.length; i++) {
        const c = items[i]!;
        let n: number;
        if (c?.kind === 'hole') {
          if (!isChunk(c) || !Number.isSafeInteger(c.length) || c.length < 0) throw new SparsevirtError('ERR_INVALID_ARG', `sendBatch(): item ${i} is not a valid hole chunk`);
          if (this.sparse) this.addHole(c.length);
          else await this.sendZeros(c.length);
          continue;
        } else if (c?.kind === 'file') {
          if (!isFileRef(c.file) || !isByteCount(c.offset) || !isByteCount(c.length)) throw new SparsevirtError('ERR_INVALID_ARG', `sendBatch(): item ${i} is not a valid file range`);
          n = c.length;
        } else {
          if (!isChunk(c)) throw new SparsevirtError('ERR_INVALID_ARG', `sendBatch(): item ${i} is not a chunk or a file range`);
          n = c.bytes.length;
        }
        if (n === 0) continue;
        if (this.pos + n > MAX_SAFE_BYTES) throw new SparsevirtError('ERR_INVALID_ARG', 'stream position would pass 2^53 bytes');
        if (this.pendingHole !== 0) {
          const length = this.pendingHole;
          this.pendingHole = 0;
          const h = this.toChannel({ kind: 'hole', length });
          if (h !== null) await this.track(h);
          this.ensureLive();
        }
        this.pos += n;
        const p = this.toChannel(c);
        if (p !== null) {
          await this.track(p);
          this.ensureLive();
        }
      }
    } finally {
      this.sending = false;
    }
  }

  /**
   * Hand one item to the channel: by its synchronous `send` when it has one (null: it can take
   * more at once; a promise: await it first), else by `write` (a file range read first). A
   * channel that fails the item fails the stream, as a rejected write does.
   */
  private toChannel(c: Chunk | FileRange): Promise<void> | null {
    const ch = this.channel;
    try {
      if (ch.send) return ch.send(c);
      return ch.write(c.kind === 'file' ? { kind: 'data', bytes: readFileRange(c) } : c);
    } catch (err) {
      // (a file range that cannot be read, a channel that throws: the stream is out of step)
      if (this.st === 'open' || this.st === 'finishing') this.terminate('failed', toError(err));
      throw err;
    }
  }

  private async sendData(chunk: DataChunk): Promise<void> {
    const n = chunk.bytes.length;
    if (this.pos + n > MAX_SAFE_BYTES) {
      throw new SparsevirtError('ERR_INVALID_ARG', 'stream position would pass 2^53 bytes');
    }
    if (this.pendingHole !== 0) {
      await this.flushHole();
      this.ensureLive(); // the stream may have died between the write and this continuation
    }
    this.pos += n;
    const p = this.toChannel(chunk);
    if (p !== null) await this.track(p);
  }

  /** Holes on a non-sparse stream travel as zeros (views of the shared zero buffer). */
  private async sendZeros(length: number): Promise<void> {
    let left = length;
    while (left > 0) {
      const n = Math.min(left, ZERO_CHUNK_SIZE);
      await this.sendData({ kind: 'data', bytes: zeroBytes(n) });
      this.ensureLive();
      left -= n;
    }
  }

  private async flushHole(): Promise<void> {
    const length = this.pendingHole;
    this.pendingHole = 0;
    const p = this.toChannel({ kind: 'hole', length });
    if (p !== null) await this.track(p);
  }

  /**
   * Wrap a channel call so the caller's promise also settles when the stream dies (abort,
   * signal, peer error), even if the channel never settles its own.
   */
  private track(channelCall: Promise<void>): Promise<void> {
    const op = new Promise<void>(this.captureOp);
    channelCall.then(this.onOpDone, this.onOpFailed);
    return op;
  }

  private readonly captureOp = (resolve: () => void, reject: (err: Error) => void): void => {
    this.opResolve = resolve;
    this.opReject = reject;
  };

  private readonly onOpDone = (): void => {
    const resolve = this.opResolve;
    this.clearOp();
    resolve?.();
  };

  /** The channel rejected a write or finish: the stream failed with that error. */
  private readonly onOpFailed = (err: unknown): void => {
    if (this.opReject === undefined) return; // the stream already died; its call was settled
    this.terminate('failed', toError(err));
  };

  private clearOp(): void {
    this.opResolve = undefined;
    this.opReject = undefined;
  }

  // ------------------------------------------------------------------ internals: receiving

  private beginRead(op: string): void {
    this.claim('recv', op);
    this.checkLive(op);
    if (this.reader !== undefined) {
      throw stateError(this.reader === 'recv'
        ? `cannot ${op}(): another recv() is in progress; await it first`
        : `cannot ${op}(): the stream is being read by ${this.reader}`);
    }
  }

  /**
   * Wait until something is queued (true) or the stream ended (false: EOF, or finished early).
   * Rejects if the stream is aborted or fails meanwhile.
   */
  private async waitReadable(): Promise<boolean> {
    for (;;) {
      if (this.st === 'aborted' || this.st === 'failed') throw this.err!;
      if (!this.queue.isEmpty) return true;
      if (this.ended || this.st !== 'open') return false;
      if (this.readerResolve !== undefined) throw stateError('concurrent reads on one stream: await the previous one');
      await new Promise<void>(this.captureReader);
    }
  }

  private readonly captureReader = (resolve: () => void, reject: (err: Error) => void): void => {
    this.readerResolve = resolve;
    this.readerReject = reject;
  };

  private wakeReader(): void {
    const resolve = this.readerResolve;
    if (resolve === undefined) return;
    this.readerResolve = undefined;
    this.readerReject = undefined;
    resolve();
  }

  private consumeBytes(max: number): Buffer {
    const bytes = this.queue.takeBytes(max);
    this.pos += bytes.length;
    this.afterConsume();
    return bytes;
  }

  /** Resume the channel once the queue drained to half the window (hysteresis). */
  private afterConsume(): void {
    if (this.paused && this.queue.bytes <= this.highWaterMark / 2) {
      this.paused = false;
      this.channel.resumeIncoming();
    }
  }

  /**
   * When we stop reading (finish, abort, failure) the channel must not stay paused: it has to
   * drain and discard what the peer still sends until the peer confirms.
   */
  private releaseIncoming(): void {
    if (!this.paused) return;
    this.paused = false;
    try {
      this.channel.resumeIncoming();
    } catch {
      // a dying channel may refuse; nothing to resume then
    }
  }

  private async iterNext(mode: IterMode): Promise<IteratorResult<Chunk | WrittenRange | Array<Chunk | WrittenRange>>> {
    if (this.iterDone) return DONE;
    if (this.readerResolve !== undefined) {
      throw stateError('next() called again before the previous next() settled');
    }
    try {
      if (this.queue.isEmpty && !(await this.waitReadable())) {
        this.endIteration();
        if (this.st === 'open') await this.finish(); // acknowledge EOF
        return DONE;
      }
    } catch (err) {
      this.endIteration();
      throw err;
    }
    if (mode === 'batches') return { done: false, value: this.takeBatch(BATCH_MAX) };
    let chunk = this.queue.takeChunk();
    this.pos += chunkLength(chunk);
    this.afterConsume();
    if (chunk.kind === 'written' && mode === 'bytes') {
      try {
        if (chunk.error) throw chunk.error;
        chunk = { kind: 'data', bytes: readFileRange(chunk) };
      } catch (err) {
        // a failed next() ends a for-await without return(): stop the stream here
        this.endIteration();
        await this.abort(err);
        throw err;
      }
    }
    return { done: false, value: chunk };
  }

  private async iterReturn(mode: IterMode): Promise<IteratorResult<Chunk>> {
    if (this.iterDone) return DONE;
    this.endIteration();
    if (this.st === 'open') {
      // Everything was read: acknowledge. Not for batches: the last one, which takes all that is
      // left, may be what the consumer failed on (it is processed once the next one is asked for).
      if (this.ended && this.queue.isEmpty && mode !== 'batches') await this.finish();
      else await this.abort(new SparsevirtError('ERR_ABORTED', 'the consumer stopped reading before the end of the stream'));
    }
    return DONE;
  }

  private endIteration(): void {
    this.iterDone = true;
    this.reader = undefined;
  }

  // ------------------------------------------------------------------ internals: state

  /** Fix the direction on first use; refuse the other direction afterwards. */
  private claim(dir: StreamDirection, op: string): void {
    if (this.dir === undefined) {
      this.dir = dir;
    } else if (this.dir !== dir) {
      throw stateError(`cannot ${op}(): this stream is used for ${this.dir === 'send' ? 'sending' : 'receiving'}; a stream carries data one way`);
    }
  }

  /** For a new call: throw if the stream cannot take it. */
  private checkLive(op: string): void {
    switch (this.st) {
      case 'open':
        return;
      case 'failed':
        throw this.err!;
      case 'aborted':
        throw stateError(`cannot ${op}(): the stream was aborted`, this.err);
      case 'finishing':
        throw stateError(`cannot ${op}(): finish() is in progress`);
      case 'finished':
        throw this.peerFinished ? this.peerFinishedErr! : stateError(`cannot ${op}(): the stream is finished`);
    }
  }

  /** Inside a call, after an await: throw what a pending call gets if the stream died. */
  private ensureLive(): void {
    if (this.st === 'open' || this.st === 'finishing') return;
    throw this.peerFinished ? this.peerFinishedErr! : this.err!;
  }

  /** The stream dies: settle everything pending with `err`, free the queue, tell observers. */
  private terminate(state: 'aborted' | 'failed', err: Error): void {
    this.st = state;
    this.err = err;
    this.pendingHole = 0;
    this.queue.clear();
    this.releaseIncoming();
    const opReject = this.opReject;
    const readerReject = this.readerReject;
    this.clearOp();
    this.readerResolve = undefined;
    this.readerReject = undefined;
    opReject?.(err);
    readerReject?.(err);
    this.closed();
  }

  /** We detected a protocol violation: fail like [kDeliverError], and tell the peer to stop. */
  private protocolError(err: SparsevirtError): void {
    this.terminate('failed', err);
    try {
      this.channel.abort(err).then(noop, noop);
    } catch {
      // the channel is already gone
    }
  }

  /** A helper failed: abort (a no-op if the stream already died) and rethrow the original error. */
  private async helperFailed(err: unknown): Promise<void> {
    if (this.peerFinished) return; // the receiver finished early: a normal end for a sender
    await this.abort(err);
    throw err;
  }

  /** Final state reached: drop the signal listener and publish. */
  private closed(): void {
    this.stopDirect();
    if (this.signal !== undefined) {
      this.signal.removeEventListener('abort', this.onSignalAbort);
      this.signal = undefined;
    }
    if (streamCloseChannel.hasSubscribers) {
      streamCloseChannel.publish({ stream: this, state: this.st, error: this.err });
    }
  }

  private readonly onSignalAbort = (): void => {
    const signal = this.signal;
    void this.abort(signal?.reason);
  };
}
