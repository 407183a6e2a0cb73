/**
 * SPARSEVIRT_VOL_CONTENT_DIGEST on the daemon: the content digest (`../digest.ts`) of a volume
 * range, from the file's extent map, so that holes cost nothing and data is read once in 1 MiB
 * chunks, the event loop turning between them.
 */
import { ContentDigest, DIGEST_NAME } from '../digest.js';
import { fileChunks } from '../sparse/index.js';
import { CODE, storageError } from './errors.js';

const READ_CHUNK = 1 << 20;

/**
 * The digest of `length` bytes from `offset` of the open file `fd` of `size` bytes (`length` 0:
 * to the end). A range past the end is refused.
 */
export async function fileContentDigest(fd: number, size: number, offset: bigint, length: bigint): Promise<{ algorithm: string; digest: string }> {
  if (offset > BigInt(size)) throw storageError(CODE.INVALID_ARG, `offset ${offset} is past the end of the volume (${size} bytes)`);
  const from = Number(offset);
  const n = length === 0n ? size - from : length > BigInt(size - from) ? -1 : Number(length);
  if (n < 0) throw storageError(CODE.INVALID_ARG, `range ${offset}+${length} runs past the end of the volume (${size} bytes)`);
  const d = new ContentDigest(from, n);
  if (n > 0) {
    for await (const c of fileChunks({ fd }, { offset: from, length: n, sparse: true, chunkSize: READ_CHUNK })) d.update(c);
  }
  return { algorithm: DIGEST_NAME, digest: d.digest() };
}
