/**
 * sparsevirt: libvirt's sparse streams for Node.js.
 *
 * `connect(uri)` gives a `Connection`; its pools (`StoragePool`) and volumes (`StorageVol`) upload
 * and download through `Stream`s of `Chunk`s (data or hole). Errors are `SparsevirtError`s (match
 * on `err.code`), and `RemoteError`s keep libvirt's code, domain and message. Files as chunk
 * sources and sinks are in `sparsevirt/sparse`, the stream API alone in `sparsevirt/stream`, the
 * remote program's table in `sparsevirt/protocol`.
 */
export {
  connect, Connection, StoragePool, StorageVol, copyVolume, compareVolumes, volumeDigest,
  type ConnectOptions, type CopyOptions, type CopyProgress, type CopyResult, type PoolInfo, type VolInfo, type TransferOptions, type FileTransferOptions, type TransferResult,
} from './client/index.js';
export { SparsevirtError, RemoteError, VIR_ERR, VIR_ERR_CODE, VIR_DOMAIN, type RemoteErrorFields } from './errors.js';
export type { Chunk, ChunkSource, FileRange, FileRef, WrittenRange } from './chunk.js';
export { ContentDigest, DIGEST_NAME } from './digest.js';
export {
  Stream,
  type StreamOptions, type StreamDirection, type StreamState, type RecvOptions, type RecvResult, type HoleSignal,
  type ByteReader, type ByteSource, type ByteSink, type HoleSink, type HoleQuery, type HoleQueryResult, type HoleSkip,
  type ReceiveTarget, type ReadableOptions, type WritableOptions,
} from './stream/index.js';
export { parseUri, defaultUri, defaultDaemonSocket, type ParsedUri } from './transport/uri.js';
