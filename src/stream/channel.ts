import type { Chunk, FileRange, WrittenRange } from '../chunk.js';

/**
 * What a `Stream` needs from whatever carries it: the rpc `Peer` (one stream of a
 * connection, keyed by proc+serial) or the in-memory pair.
 *
 * Outgoing: the stream calls `write` for each chunk (holes already merged, data
 * non-empty; the channel may split data into wire-sized packets) and awaits it: the
 * promise resolves when the channel can take more (backpressure reaches the socket).
 *
 * Incoming: the channel calls the stream's `StreamInbound` methods; when the stream's
 * queue passes its window it calls `pauseIncoming()`, and `resumeIncoming()` once drained.
 *
 * `finish()` means "I am done": the sender's end of data (upload finish / download EOF)
 * or the receiver's acknowledgement of EOF. It resolves when the peer has confirmed,
 * or rejects with the peer's error. `abort()` tells the peer and resolves when it confirmed
 * (bounded by the channel's own timeout).
 */
export interface StreamChannel {
  write(chunk: Chunk): Promise<void>;
  /**
   * Optional: data straight from a file in memory, `length` bytes of `fd` at `offset` (the
   * channel may hand them to the kernel without reading them). The bytes are consumed when the
   * returned promise settles. Channels without it get the bytes read into a buffer by the stream.
   */
  writeFile?(fd: number, offset: number, length: number): Promise<void>;
  /**
   * Optional fast path of `write` and `writeFile`, for streams that send many small chunks.
   * Returns null when the item was taken and the channel can take more at once, or a promise to
   * await before the next call: backpressure, or the rest of a file range that had to wait for
   * the socket (its fd must stay open until the promise settles). Throws what `write` would
   * reject with.
   */
  send?(item: Chunk | FileRange): Promise<void> | null;
  finish(): Promise<void>;
  abort(reason: Error): Promise<void>;
  pauseIncoming(): void;
  resumeIncoming(): void;
  /**
   * Optional: the receiving stream's consumer takes large data packets written in place into
   * the file `fd` (see `Stream.receiveInto`), from now on, or (`null`) no more; returns whether
   * the channel will do it. A channel that can, asks `StreamInbound.directTarget` for each
   * packet and delivers a `WrittenRange`. Its writes span I/O callbacks, so it writes through a
   * duplicate of `fd` of its own, closed when this stops: the consumer may close `fd` then.
   */
  receiveDirect?(fd: number | null): boolean;
}

/** Where a data packet goes when the stream's consumer takes it in place. */
export interface DirectTarget {
  fd: number;
  offset: number;
  /** The same object for as long as this target holds (an fd number may be reused after it). */
  key: object;
}

/** The side of a stream the channel feeds. */
export interface StreamInbound {
  /** A data or hole chunk arrived from the peer, or data the channel wrote in place. */
  deliver(chunk: Chunk | WrittenRange): void;
  /**
   * Where a data packet of `length` bytes that arrives now is to be written, or null: deliver it
   * as data. Asked again mid-packet (with 0) before each write: the answer can turn null, or
   * its key change, when the consumer stops.
   */
  directTarget?(length: number): DirectTarget | null;
  /** The peer's end of data (download EOF / upload finish). */
  deliverEnd(): void;
  /** The stream failed (peer error, connection lost): pending and future calls reject with it. */
  deliverError(err: Error): void;
}
