/**
 * `sparsevirt/sparse`: files and block devices as chunk sources and sinks.
 *
 * - `readExtents` maps where a file holds data and where it has holes (SEEK_DATA/SEEK_HOLE).
 * - `fileChunks` / `ChunkReader`: file → `AsyncIterable<Chunk>`, holes as hole chunks.
 * - `writeChunks` / `SparseWriter`: chunks → file, holes punched or zeroed, final size set.
 * - `fileRef(fd)`: an open file in memory as a stream sends ranges of it, or writes into it
 *   (`Stream.sendFileRange`, `Stream.receiveInto`).
 *
 * Errors are `SparsevirtError`: `ERR_IO` (errno in `cause`), `ERR_INVALID_ARG`, `ERR_ABORTED`,
 * `ERR_UNSUPPORTED` (neither a regular file nor a block device), `ERR_STREAM_STATE`.
 */
export { DEFAULT_MIN_ZERO_RUN, type Extent } from './extents.js';
export type { FileTarget } from './file.js';
export { ChunkReader, fileChunks, fileSendBatches, fileSendChunks, readExtents, type ChunkReaderOptions, type WindowOptions } from './reader.js';
export { SparseWriter, writeChunks, type SparseWriterOptions, type WriteResult } from './writer.js';
export { fileRef } from '../io/file.js';
export { nativeSyscallsAvailable } from '../io/sys.js';
