/**
 * The content digest of a volume range: a SHA-256 that depends only on what the range reads as,
 * whatever its allocation and however it is cut into chunks: a hole and data of zeros give the
 * same digest. Zeros cost no hashing, so a 16 GiB image with 1 GiB of data is hashed in the time
 * of 1 GiB.
 *
 * Definition (`sparsevirt-content-sha256`, positions absolute in the volume):
 * - a page is an aligned 4 KiB of the volume, cut to the range at its two ends; a block is an
 *   aligned 1 MiB;
 * - a block's digest is SHA-256 over its pages that hold a non-zero byte, in order, each as its
 *   index in the block (u16 BE) followed by its bytes;
 * - the range's digest is SHA-256 over `sparsevirt-content-sha256\0`, the range's offset and
 *   length (u64 BE each), then every block that holds a non-zero page, in order, as its index
 *   (u64 BE) followed by its digest.
 *
 * Digests of sub-ranges use the same pages and blocks, so a mismatch can be narrowed down to the
 * first 1 MiB block that differs by digesting halves (see `firstDifferingBlock`).
 */
import { createHash, type Hash } from 'node:crypto';
import { SparsevirtError } from './errors.js';
import { isAllZero, type Chunk } from './chunk.js';

export const DIGEST_NAME = 'sparsevirt-content-sha256';
export const DIGEST_PAGE = 4096;
export const DIGEST_BLOCK = 1 << 20;
const PAGES_PER_BLOCK = DIGEST_BLOCK / DIGEST_PAGE;

function u64(n: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
}

/** A block's digest: its index and the SHA-256 of its non-zero pages. */
export interface BlockDigest {
  block: number;
  digest: Buffer;
}

/** Feeds the chunks of a range, in order, and gives its digest. */
export class ContentDigest {
  private readonly outer: Hash;
  private pos: number;
  private readonly end: number;
  /** The page being assembled from pieces (a chunk ended inside it). */
  private readonly page = Buffer.alloc(DIGEST_PAGE);
  private pageFill = 0;
  private pageStart = -1;
  private pageNonZero = false;
  private block = -1;
  private blockHash: Hash | null = null;
  private readonly keepBlocks: boolean;
  /** Block digests, when asked for (`keepBlocks`). */
  readonly blocks: BlockDigest[] = [];
  private done: string | null = null;

  constructor(readonly offset: number, readonly length: number, opts: { keepBlocks?: boolean } = {}) {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 || offset + length > Number.MAX_SAFE_INTEGER) {
      throw new SparsevirtError('ERR_INVALID_ARG', `digest range ${offset}+${length} is not a byte range below 2^53`);
    }
    this.pos = offset;
    this.end = offset + length;
    this.keepBlocks = opts.keepBlocks ?? false;
    this.outer = createHash('sha256').update(`${DIGEST_NAME}\0`).update(u64(offset)).update(u64(length));
  }

  /** Bytes fed so far, from the range's start. */
  get position(): number {
    return this.pos - this.offset;
  }

  update(chunk: Chunk): void {
    if (chunk.kind === 'hole') this.zeros(chunk.length);
    else this.data(chunk.bytes);
  }

  /** `n` bytes that read as zero. */
  zeros(n: number): void {
    this.advanceCheck(n);
    if (n === 0) return;
    const target = this.pos + n;
    if (this.pageStart >= 0) {
      // the rest of the page being assembled is zero (its start may be the range's, inside the page)
      const pageEnd = Math.min(this.pageStart - (this.pageStart % DIGEST_PAGE) + DIGEST_PAGE, this.end);
      const upto = Math.min(pageEnd, target);
      this.page.fill(0, this.pageFill, this.pageFill + (upto - this.pos));
      this.pageFill += upto - this.pos;
      this.pos = upto;
      if (this.pos === pageEnd) this.endPage();
    }
    this.pos = target;
  }

  data(bytes: Uint8Array): void {
    this.advanceCheck(bytes.length);
    let at = 0;
    while (at < bytes.length) {
      const pageBase = this.pos - (this.pos % DIGEST_PAGE);
      const pageEnd = Math.min(pageBase + DIGEST_PAGE, this.end);
      const n = Math.min(pageEnd - this.pos, bytes.length - at);
      const piece = bytes.subarray(at, at + n);
      if (this.pageStart < 0 && this.pos === Math.max(pageBase, this.offset) && n === pageEnd - this.pos) {
        // a whole page in this chunk: hashed in place
        if (!isAllZero(piece)) this.hashPage(this.pos, piece);
      } else {
        if (this.pageStart < 0) {
          this.pageStart = Math.max(pageBase, this.offset);
          this.pageFill = 0;
          this.pageNonZero = false;
          if (this.pos > this.pageStart) {
            // a hole came before this data inside the page
            this.page.fill(0, 0, this.pos - this.pageStart);
            this.pageFill = this.pos - this.pageStart;
          }
        }
        this.page.set(piece, this.pageFill);
        this.pageFill += n;
        if (!this.pageNonZero && !isAllZero(piece)) this.pageNonZero = true;
        if (this.pos + n === pageEnd) {
          this.pos += n;
          at += n;
          this.endPage();
          continue;
        }
      }
      this.pos += n;
      at += n;
    }
  }

  /** The range's digest (hex); every byte of the range must have been fed. */
  digest(): string {
    if (this.done !== null) return this.done;
    if (this.pos !== this.end) {
      throw new SparsevirtError('ERR_STREAM_STATE', `digest of ${this.length} bytes asked after ${this.pos - this.offset}`);
    }
    if (this.pageStart >= 0) this.endPage();
    this.endBlock();
    this.done = this.outer.digest('hex');
    return this.done;
  }

  private advanceCheck(n: number): void {
    if (this.done !== null) throw new SparsevirtError('ERR_STREAM_STATE', 'digest already taken');
    if (this.pos + n > this.end) {
      throw new SparsevirtError('ERR_PROTOCOL', `content runs past the digest's range (${this.pos - this.offset + n} > ${this.length} bytes)`);
    }
  }

  private endPage(): void {
    const start = this.pageStart;
    this.pageStart = -1;
    if (this.pageNonZero) this.hashPage(start, this.page.subarray(0, this.pageFill));
  }

  private hashPage(start: number, bytes: Uint8Array): void {
    const block = Math.floor(start / DIGEST_BLOCK);
    if (block !== this.block) {
      this.endBlock();
      this.block = block;
      this.blockHash = createHash('sha256');
    }
    const index = Buffer.allocUnsafe(2);
    index.writeUInt16BE(Math.floor((start % DIGEST_BLOCK) / DIGEST_PAGE) % PAGES_PER_BLOCK);
    this.blockHash!.update(index).update(bytes);
  }

  private endBlock(): void {
    if (this.blockHash === null) return;
    const digest = this.blockHash.digest();
    this.outer.update(u64(this.block)).update(digest);
    if (this.keepBlocks) this.blocks.push({ block: this.block, digest });
    this.blockHash = null;
  }
}

/** The digest of a whole sequence of chunks covering `offset`..`offset+length`. */
export async function digestChunks(chunks: AsyncIterable<Chunk | readonly Chunk[]>, offset: number, length: number): Promise<string> {
  const d = new ContentDigest(offset, length);
  for await (const c of chunks) {
    if (Array.isArray(c)) for (const x of c as readonly Chunk[]) d.update(x);
    else d.update(c as Chunk);
  }
  return d.digest();
}

/**
 * The first 1 MiB block (its byte offset) where two sides' contents differ, by bisection over
 * range digests; `digestOf` is asked for sub-ranges of `offset`..`offset+length` on each side.
 * Null when the whole range digests the same.
 */
export async function firstDifferingBlock(
  offset: number, length: number,
  digestOf: (side: 'source' | 'destination', offset: number, length: number) => Promise<string>,
): Promise<number | null> {
  const same = async (o: number, n: number) => {
    const [a, b] = await Promise.all([digestOf('source', o, n), digestOf('destination', o, n)]);
    return a === b;
  };
  if (await same(offset, length)) return null;
  let lo = offset;
  let hi = offset + length;
  // invariant: [lo, hi) differs; narrow to one aligned block
  while (Math.floor(lo / DIGEST_BLOCK) !== Math.floor((hi - 1) / DIGEST_BLOCK)) {
    const firstBlock = Math.floor(lo / DIGEST_BLOCK);
    const lastBlock = Math.floor((hi - 1) / DIGEST_BLOCK);
    const mid = Math.max(lo, (firstBlock + Math.ceil((lastBlock - firstBlock + 1) / 2)) * DIGEST_BLOCK);
    if (!(await same(lo, mid - lo))) hi = mid;
    else lo = mid;
  }
  return Math.floor(lo / DIGEST_BLOCK) * DIGEST_BLOCK;
}
