/**
 * One shared, lazily allocated buffer of zeros. Holes that must be materialised (read as
 * zeros by `recv`/`recvAll`/byte-mode Readables, or sent as data on a non-sparse stream) are
 * served as views of it, so a 100 GiB hole costs no memory beyond this one buffer.
 *
 * The buffer is shared process-wide: treat every Buffer you get from a stream as read-only
 * (data buffers are passed through uncopied as well, so this is the general rule anyway).
 */

/** Largest zero slice handed out at once (1 MiB, the size virsh uses to zero block devices). */
export const ZERO_CHUNK_SIZE = 1 << 20;

let zeros: Buffer | undefined;

/** A read-only view of `n` zero bytes, `0 < n <= ZERO_CHUNK_SIZE`. */
export function zeroBytes(n: number): Buffer {
  zeros ??= Buffer.alloc(ZERO_CHUNK_SIZE);
  return n === ZERO_CHUNK_SIZE ? zeros : zeros.subarray(0, n);
}
