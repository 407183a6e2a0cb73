/**
 * Sans-I/O frame parser: bytes in, messages out, partial tails kept.
 *
 * Zero copy where the kernel allows it: a frame that lies whole inside one received chunk is
 * emitted as a view of that chunk. A frame that spans chunks is assembled once into a buffer
 * of exactly its size (allocated only when its length word has been validated, so one message
 * never costs more than the frame limit). Emitted payloads are never overwritten afterwards.
 */
import { SparsevirtError } from '../errors.js';
import { FRAME_MAX, FRAME_OVERHEAD, LEN_SIZE, readMessage, u32, type Message } from './message.js';

export class ProtocolError extends SparsevirtError {
  constructor(message: string) {
    super('ERR_PROTOCOL', message);
    this.name = 'ProtocolError';
  }
}

/** A frame alone in an owned buffer keeps it from this size; a smaller one is copied out. */
const OWN_BUFFER_MIN = 64 * 1024;

export class FrameParser {
  private readonly maxFrame: number;
  /** Bytes of the length word seen so far when it was split across chunks. */
  private lenBuf = Buffer.alloc(LEN_SIZE);
  private lenHave = 0;
  /** The frame being assembled across chunks, and how much of it is filled. */
  private partial: Buffer | null = null;
  private partialHave = 0;
  /** Input not yet parsed because an onMessage callback threw (a private copy). */
  private backlog: Buffer | null = null;
  /** While true, whole frames inside a pushed chunk are copied out instead of viewed. */
  private copyOut = false;
  /** Set by the first framing error: the byte stream cannot be resynchronised after it. */
  private failed: ProtocolError | null = null;

  /** Where a frame that spans reads is assembled (a buffer of exactly `len` bytes). */
  private readonly alloc: (len: number) => Buffer;

  constructor(opts: { maxFrame?: number; alloc?: (len: number) => Buffer } = {}) {
    this.maxFrame = opts.maxFrame ?? FRAME_MAX;
    this.alloc = opts.alloc ?? ((len) => Buffer.allocUnsafe(len));
  }

  /** True when no partial frame is pending (a clean boundary). */
  get idle(): boolean {
    return this.partial === null && this.lenHave === 0 && this.backlog === null;
  }

  private checkLength(len: number): void {
    if (len < FRAME_OVERHEAD) this.fail(`frame length ${len} is below the minimum ${FRAME_OVERHEAD}`);
    if (len > this.maxFrame) this.fail(`frame length ${len} exceeds the limit ${this.maxFrame}`);
  }

  private fail(message: string): never {
    this.failed = new ProtocolError(message);
    throw this.failed;
  }

  /**
   * Where the next socket read may land to skip a copy: the unfilled rest of the frame being
   * assembled, so the kernel writes straight into it. Null when no frame is in progress (read
   * into any buffer and `push` it). Used with net's `onread`.
   */
  readTarget(): Buffer | null {
    if (this.partial === null || this.backlog !== null || this.failed) return null;
    return this.partial.subarray(this.partialHave);
  }

  /** Whether `n` more bytes complete the frame being assembled. */
  completes(n: number): boolean {
    return this.partial !== null && this.partialHave + n >= this.partial.length;
  }

  /** `n` bytes were read into the buffer `readTarget()` returned. */
  filled(n: number, onMessage: (m: Message) => void): void {
    const frame = this.partial!;
    this.partialHave += n;
    if (this.partialHave < frame.length) return;
    this.partial = null;
    this.partialHave = 0;
    onMessage(readMessage(frame, 0, frame.length));
  }

  /**
   * Like `push(buf.subarray(0, n))`, for a buffer handed over for good (a fresh read buffer):
   * a frame that starts at its beginning and fits in it, but is not complete yet, is then
   * assembled in place (`readTarget()` is the rest of it) instead of being copied out.
   */
  pushOwned(buf: Buffer, n: number, onMessage: (m: Message) => void): 'kept' | 'free' {
    if (this.idle && !this.failed && n >= LEN_SIZE) {
      const len = buf.readUInt32BE(0);
      this.checkLength(len);
      if (len > n && len <= buf.length) {
        this.partial = buf.subarray(0, len);
        this.partialHave = n;
        return 'kept';
      }
      if (len === n && len >= OWN_BUFFER_MIN) {
        // one big frame alone in the buffer: it keeps the buffer (no copy)
        this.push(buf.subarray(0, n), onMessage);
        return 'kept';
      }
    }
    // Several frames, or the tail of one: each is copied out, so `buf` can be reused at once.
    this.pushCopy(buf, n, onMessage);
    return 'free';
  }

  /**
   * `push(buf.subarray(0, n))` for a buffer that is reused after this call (a read scratch):
   * every whole frame in it is copied out at its exact size, and a partial frame is assembled
   * elsewhere, so nothing keeps a view of `buf`.
   */
  pushCopy(buf: Buffer, n: number, onMessage: (m: Message) => void): void {
    this.copyOut = true;
    try {
      this.push(buf.subarray(0, n), onMessage);
    } finally {
      this.copyOut = false;
    }
  }

  /** Whether the frame being assembled lives in `buf` (adopted by `pushOwned`). */
  assemblingIn(buf: Buffer): boolean {
    return this.partial !== null && this.partial.buffer === buf.buffer;
  }

  /**
   * `push` for a chunk the caller can extend in place (the rest of a read slab): whole frames
   * are emitted as views of it, and an incomplete frame at its end of at most `keepMax` bytes
   * (or a length word cut short) is left unconsumed, neither copied nor assembled apart. The
   * caller lets the next read land right behind those bytes and passes them again, extended: a
   * small frame cut by a read then costs no read of its own (4 KiB extents: half the reads, and
   * half the wake-ups of the consumer). Returns the bytes consumed. A larger incomplete frame is
   * assembled apart as `push` does (`readTarget()` is the rest of it), and so is everything when
   * the parser is not idle.
   */
  pushKeepingTail(chunk: Buffer, onMessage: (m: Message) => void, keepMax: number): number {
    if (this.failed) throw this.failed;
    if (!this.idle) {
      this.push(chunk, onMessage);
      return chunk.length;
    }
    let pos = 0;
    const end = chunk.length;
    while (end - pos >= LEN_SIZE) {
      const len = u32(chunk, pos);
      this.checkLength(len);
      if (end - pos < len) {
        if (len <= keepMax) return pos;
        this.push(chunk.subarray(pos), onMessage);
        return end;
      }
      pos += len;
      this.deliver(readMessage(chunk, pos - len, pos), onMessage, chunk, pos, end);
    }
    return pos;
  }

  /**
   * Feed bytes; calls onMessage for each whole frame, in order. Throws ProtocolError on a bad
   * frame, and again on every later push (framing is lost for good). If onMessage throws, the
   * exception propagates and the bytes after that frame are kept: the next push (even with an
   * empty chunk) delivers them first, so no frame is lost or misparsed.
   */
  push(chunk: Buffer, onMessage: (m: Message) => void): void {
    if (this.failed) throw this.failed;
    if (this.backlog !== null) {
      chunk = chunk.length === 0 ? this.backlog : Buffer.concat([this.backlog, chunk]);
      this.backlog = null;
    }
    let pos = 0;
    const end = chunk.length;
    while (pos < end) {
      let msg: Message;
      if (this.partial !== null) {
        const n = Math.min(this.partial.length - this.partialHave, end - pos);
        chunk.copy(this.partial, this.partialHave, pos, pos + n);
        this.partialHave += n;
        pos += n;
        if (this.partialHave < this.partial.length) continue;
        const frame = this.partial;
        this.partial = null;
        this.partialHave = 0;
        msg = readMessage(frame, 0, frame.length);
      } else if (this.lenHave > 0 || end - pos < LEN_SIZE) {
        const n = Math.min(LEN_SIZE - this.lenHave, end - pos);
        chunk.copy(this.lenBuf, this.lenHave, pos, pos + n);
        this.lenHave += n;
        pos += n;
        if (this.lenHave < LEN_SIZE) return;
        this.lenHave = 0;
        const len = this.lenBuf.readUInt32BE(0);
        this.checkLength(len);
        this.partial = this.alloc(len);
        this.lenBuf.copy(this.partial, 0);
        this.partialHave = LEN_SIZE;
        continue;
      } else {
        const len = u32(chunk, pos);
        this.checkLength(len);
        if (end - pos < len) {
          this.partial = this.alloc(len);
          chunk.copy(this.partial, 0, pos, end);
          this.partialHave = end - pos;
          return;
        }
        if (this.copyOut) {
          const copy = this.alloc(len);
          chunk.copy(copy, 0, pos, pos + len);
          msg = readMessage(copy, 0, len);
        } else {
          msg = readMessage(chunk, pos, pos + len);
        }
        pos += len;
      }
      // State is at the next frame boundary before user code runs.
      this.deliver(msg, onMessage, chunk, pos, end);
    }
  }

  /** Hands `msg` over; if the consumer throws, the frames after it (`chunk[pos, end)`) are kept. */
  private deliver(msg: Message, onMessage: (m: Message) => void, chunk: Buffer, pos: number, end: number): void {
    try {
      onMessage(msg);
    } catch (err) {
      if (pos < end) this.backlog = Buffer.from(chunk.subarray(pos, end));
      throw err;
    }
  }
}

