/**
 * Holes that must be materialised (read as zeros by `recv`/`recvAll`/byte-mode Readables, or sent
 * as data on a non-sparse stream) are served as views of the one shared zero buffer of the base
 * (`zeroBytes`), so a 100 GiB hole costs no memory beyond it. Treat every Buffer you get from a
 * stream as read-only (data buffers are passed through uncopied as well).
 */
export { ZERO_CHUNK_SIZE, zeroBytes } from '../chunk.js';
