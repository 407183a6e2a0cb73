/**
 * The seam between a `Stream` (stream/) and whatever carries it: the rpc layer's `WireStream`
 * (one stream of a connection, keyed by proc+serial) or the in-memory pair. It lives at the
 * bottom, beside `Chunk`, so that both sides see it and no arrow points up: `stream/` knows
 * nothing of sockets, `rpc/` nothing of `Stream`.
 *
 * Outgoing: the stream calls `write` (or `send`) for each chunk (holes already merged, data
 * non-empty; the channel may split data into wire-sized packets) and awaits it: the promise
 * resolves when the channel can take more (backpressure reaches the socket).
 *
 * Incoming: the channel calls the stream's `StreamInbound` methods, keyed by the symbols below
 * (what a channel calls on a stream is not what a user calls). When the stream's queue passes its
 * window it calls `pauseIncoming()`, and `resumeIncoming()` once drained.
 *
 * `finish()` means "I am done": the sender's end of data (upload finish / download EOF) or the
 * receiver's acknowledgement of EOF. It resolves when the peer has confirmed, or rejects with the
 * peer's error. `abort()` tells the peer and resolves when it confirmed (bounded by the channel's
 * own timeout).
 */
import type { Chunk, FileRange, FileRef, WrittenRange } from './chunk.js';

export interface StreamChannel {
  write(chunk: Chunk): Promise<void>;
  /**
   * Optional fast path of `write`, for streams that send many small chunks, which also takes
   * file ranges (the channel may hand them to the kernel without reading them; a channel without
   * `send` gets their bytes read by the stream). Returns null when the item was taken and the
   * channel can take more at once, or a promise to await before the next call: backpressure, or
   * the rest of a file range that had to wait for the socket (the file must stay open until the
   * promise settles). Throws what `write` would reject with.
   */
  send?(item: Chunk | FileRange): Promise<void> | null;
  finish(): Promise<void>;
  abort(reason: Error): Promise<void>;
  pauseIncoming(): void;
  resumeIncoming(): void;
  /**
   * Optional: the receiving stream's consumer takes large data packets written in place into
   * `file` (see `Stream.receiveInto`), from now on, or (`null`) no more; returns whether the
   * channel will do it. A channel that can, asks `[kDirectTarget]` for each packet and delivers a
   * `WrittenRange`. Its writes span I/O callbacks, so it writes through a duplicate of the file of
   * its own, closed when this stops: the consumer may close its file then.
   */
  receiveDirect?(file: FileRef | null): boolean;
}

/** Where a data packet goes when the stream's consumer takes it in place. */
export interface DirectTarget {
  file: FileRef;
  offset: number;
  /** The same object for as long as this target holds (the consumer may stop and start again). */
  key: object;
}

/** `StreamInbound`: a data or hole chunk arrived from the peer, or data the channel wrote in place. */
export const kDeliver = Symbol('sparsevirt.stream.deliver');
/** `StreamInbound`: the peer's end of data (download EOF / upload finish). */
export const kDeliverEnd = Symbol('sparsevirt.stream.deliverEnd');
/** `StreamInbound`: the stream failed (peer error, connection lost): pending and future calls reject with it. */
export const kDeliverError = Symbol('sparsevirt.stream.deliverError');
/**
 * `StreamInbound`, optional: where a data packet of `length` bytes that arrives now is to be
 * written, or null (deliver it as data). Asked again mid-packet (with 0) before each write: the
 * answer can turn null, or its key change, when the consumer stops.
 */
export const kDirectTarget = Symbol('sparsevirt.stream.directTarget');

/** The side of a stream the channel feeds. */
export interface StreamInbound {
  [kDeliver](chunk: Chunk | WrittenRange): void;
  [kDeliverEnd](): void;
  [kDeliverError](err: Error): void;
  [kDirectTarget]?(length: number): DirectTarget | null;
}
