/**
 * A file paired with a stream, in either direction: the one transfer loop of the client's
 * `uploadFile`/`downloadFile`, the CLI's vol-upload/vol-download and the daemon's transfers.
 *
 * - `sendFrom(stream, source)`: a file (read sparse; from tmpfs, ranges the socket takes by
 *   sendfile), a reader of batches (a pool backend's) or any chunk source → the stream.
 * - `receiveTo(stream, target)`: the stream → a file (holes left unallocated; large packets
 *   written in place by splice where the file lives in memory; frame buffers recycled) or a
 *   sink (a pool backend's writer, given the same hooks).
 *
 * Options for both: `signal` (the stream aborted, the pending step rejected at once),
 * `counts` and `onProgress`, `finish` (bring the stream to its end, or leave that to the
 * caller). Sending: a file's window (`offset`, `length`), `detectZeroes`, a `Pacer`. Receiving:
 * `offset`, `length` and the errors past the limits, `truncate`, `inPlace`, `endError`.
 *
 * What stays with each user: the client's public API, the CLI's progress display, signals and
 * virsh's steps and messages, the daemon's libvirt semantics (refused packets, the errors it
 * reports, the backends' readers and writers).
 */
export { sendFrom, type BatchReader, type SendItem, type SendOptions, type TransferSource } from './send.js';
export { receiveTo, type ReceivedItem, type ReceiveOptions, type SinkHooks, type TransferLimit, type TransferSink, type TransferTarget } from './receive.js';
export { Pacer, PACE_US } from './pacer.js';
export type { TransferCounts, TransferBaseOptions } from './shared.js';
