/**
 * `sparsevirt/stream`: libvirt's stream API (virStreamSend/Recv/SendHole/RecvHole/Finish/
 * Abort and the *All helpers) over a `StreamChannel`, plus async-iterator and Node
 * Readable/Writable adapters and an in-memory stream pair. A channel of one's own calls the
 * stream's inbound side through the `k…` symbols.
 */
export {
  kDeliver, kDeliverEnd, kDeliverError, kDirectTarget, type StreamChannel, type StreamInbound, type DirectTarget,
} from '../channel.js';
export {
  Stream,
  DEFAULT_HIGH_WATER_MARK,
  streamCloseChannel,
  type StreamOptions,
  type StreamDirection,
  type StreamState,
  type RecvOptions,
  type RecvResult,
  type HoleSignal,
  type ByteReader,
  type ByteSource,
  type ByteSink,
  type HoleSink,
  type HoleQuery,
  type HoleQueryResult,
  type HoleSkip,
  type ReceiveTarget,
} from './stream.js';
export type { ReadableOptions, WritableOptions } from './adapters.js';
export { createStreamPair, copyChunks, type StreamPair, type StreamPairOptions, type CopyChunksOptions } from './pair.js';
export { ZERO_CHUNK_SIZE } from './zeros.js';
