import type { Chunk } from '../chunk.js';

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
  finish(): Promise<void>;
  abort(reason: Error): Promise<void>;
  pauseIncoming(): void;
  resumeIncoming(): void;
}

/** The side of a stream the channel feeds. */
export interface StreamInbound {
  /** A data or hole chunk arrived from the peer. */
  deliver(chunk: Chunk): void;
  /** The peer's end of data (download EOF / upload finish). */
  deliverEnd(): void;
  /** The stream failed (peer error, connection lost): pending and future calls reject with it. */
  deliverError(err: Error): void;
}
