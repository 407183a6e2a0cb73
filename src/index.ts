/** sparsevirt: libvirt's sparse streams for Node.js. Match errors on `err.code`. */
export * from './client/index.js';
export * from './errors.js';
export type { Chunk, ChunkSource } from './chunk.js';
export { Stream } from './stream/index.js';
export { parseUri, defaultUri, defaultDaemonSocket } from './transport/uri.js';
