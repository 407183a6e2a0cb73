import { readFileRange, type Chunk, type WrittenRange } from '../chunk.js';
import { ZERO_CHUNK_SIZE, zeroBytes } from './zeros.js';

/**
 * The incoming FIFO of a receiving `Stream`.
 *
 * - Chunks delivered by the channel are stored as they are (never copied, never mutated: in
 *   the in-memory pair they are the sender's own objects). Partial consumption of the head is
 *   tracked with `offset`, and handed out as subarrays.
 * - Adjacent holes are merged (libvirt's client adds consecutive holes up as well), so a
 *   reader sees one hole per sparse section and a flood of holes costs one entry.
 * - `bytes` counts queued data bytes only: it is what the stream's window limits. Holes hold
 *   no memory, nor do ranges the stream wrote into its consumer's file (`WrittenRange`): a
 *   byte reader gets those read back from the file.
 *
 * An array with a moving head: O(1) push/shift without a linked list's per-node allocation;
 * compacted when the consumed prefix dominates.
 */
export class ChunkQueue {
  private items: Array<Chunk | WrittenRange | undefined> = [];
  private head = 0;
  /** Bytes of `items[head]` already consumed (data bytes, or hole length read as zeros). */
  private offset = 0;
  private dataBytes = 0;

  /** Queued data bytes not consumed yet (holes count 0). */
  get bytes(): number {
    return this.dataBytes;
  }

  get isEmpty(): boolean {
    return this.head === this.items.length;
  }

  /** Append a chunk (data non-empty, hole length > 0: the caller validated it). */
  push(chunk: Chunk | WrittenRange): void {
    if (chunk.kind !== 'hole') {
      if (chunk.kind === 'data') this.dataBytes += chunk.bytes.length;
      this.items.push(chunk);
      return;
    }
    const last = this.items.length - 1;
    if (last >= this.head) {
      const tail = this.items[last]!;
      if (tail.kind === 'hole') {
        // A new object: the tail may belong to the peer. `offset` stays valid if the tail is the head.
        this.items[last] = { kind: 'hole', length: tail.length + chunk.length };
        return;
      }
    }
    this.items.push(chunk);
  }

  /** Unconsumed length of the hole at the head; 0 when the head is data or the queue is empty. */
  headHole(): number {
    if (this.head === this.items.length) return 0;
    const c = this.items[this.head]!;
    return c.kind === 'hole' ? c.length - this.offset : 0;
  }

  /** Remove and return the whole head (its unconsumed rest). The queue must not be empty. */
  takeChunk(): Chunk | WrittenRange {
    const c = this.items[this.head]!;
    let out = c;
    const o = this.offset;
    if (o !== 0) {
      out = c.kind === 'data'
        ? { kind: 'data', bytes: c.bytes.subarray(o) }
        : c.kind === 'hole' ? { kind: 'hole', length: c.length - o } : { ...c, offset: c.offset + o, length: c.length - o };
    }
    if (out.kind === 'data') this.dataBytes -= out.bytes.length;
    this.advance();
    return out;
  }

  /**
   * Take up to `max` bytes from the head: a (sub)view of a data chunk, zeros for a hole (at
   * most ZERO_CHUNK_SIZE per call; the hole is consumed progressively), or the bytes of a
   * written range read back from its file (its error thrown, if it has one). Never crosses a
   * chunk boundary. The queue must not be empty.
   */
  takeBytes(max: number): Buffer {
    const c = this.items[this.head]!;
    const start = this.offset;
    if (c.kind === 'data') {
      const avail = c.bytes.length - start;
      if (avail <= max) {
        this.dataBytes -= avail;
        this.advance();
        return start === 0 ? c.bytes : c.bytes.subarray(start);
      }
      this.offset = start + max;
      this.dataBytes -= max;
      return c.bytes.subarray(start, start + max);
    }
    if (c.kind === 'written') {
      if (c.error) throw c.error;
      const n = Math.min(c.length - start, max, ZERO_CHUNK_SIZE);
      const bytes = readFileRange({ kind: 'written', file: c.file, offset: c.offset + start, length: n });
      if (start + n === c.length) this.advance();
      else this.offset = start + n;
      return bytes;
    }
    const left = c.length - start;
    const n = Math.min(left, max, ZERO_CHUNK_SIZE);
    if (n === left) this.advance();
    else this.offset = start + n;
    return zeroBytes(n);
  }

  /** Consume the hole at the head and return its (remaining) length; 0 if not at a hole. */
  takeHole(): number {
    const n = this.headHole();
    if (n !== 0) this.advance();
    return n;
  }

  /** Drop everything (finish early, abort, failure): frees the memory at once. */
  clear(): void {
    this.items = [];
    this.head = 0;
    this.offset = 0;
    this.dataBytes = 0;
  }

  private advance(): void {
    this.items[this.head++] = undefined; // let the consumed chunk be collected
    this.offset = 0;
    if (this.head === this.items.length) {
      this.items.length = 0;
      this.head = 0;
    } else if (this.head >= 1024 && this.head * 2 >= this.items.length) {
      this.items.splice(0, this.head);
      this.head = 0;
    }
  }
}
