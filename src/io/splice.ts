/**
 * Receiving in place: the payload of one data packet goes from the socket into the consumer's
 * file at its place, socket → pipe (the kernel passes the received pages along) → file (one copy,
 * in the kernel), never through a buffer of ours. The part of a packet that is not in the socket
 * yet arrives by an ordinary read (libuv tells us the socket is readable by reading it), is
 * written at its place, and splicing goes on.
 */
import fs from 'node:fs';
import type { OwnedFd } from './file.js';
import * as sys from './sys.js';

/** A read of the rest of an in-place packet takes at most this much while splicing works … */
const TAIL_READ = 16 * 1024;
/** … and this much when the socket cannot splice, or the bytes are dropped. */
const TAIL_MAX = 256 * 1024;
let tailBuffer: Buffer | null = null;

function tail(): Buffer {
  tailBuffer ??= Buffer.allocUnsafeSlow(TAIL_MAX);
  return tailBuffer;
}

/**
 * One pipe for the process, empty between two calls (both of its ends are used within one
 * synchronous step), or null where there is none.
 */
let pipe: [number, number] | null | undefined;

function splicePipe(): [number, number] | null {
  if (pipe === undefined) {
    const p = sys.makePipe(1 << 20);
    pipe = typeof p === 'number' ? null : p;
  }
  return pipe;
}

/**
 * Empty the pipe of `n` bytes that could not be written. A pipe that cannot be emptied is closed
 * and replaced: bytes left in it would land in the next packet's place.
 */
function drainPipe(p: [number, number], n: number): void {
  const buf = tail();
  while (n > 0) {
    let r = 0;
    try {
      r = fs.readSync(p[0], buf, 0, Math.min(n, buf.length), null);
    } catch {
      // (r stays 0)
    }
    if (r <= 0) {
      pipe = undefined;
      fs.close(p[0], () => undefined);
      fs.close(p[1], () => undefined);
      return;
    }
    n -= r;
  }
}

/** What `InPlaceWrite.pump` ended with. */
export type PumpResult =
  /** The whole payload is consumed (written, or dropped after `error`). */
  | 'done'
  /** The socket holds nothing more for now: the next read brings the rest (`readTarget`). */
  | 'wait'
  /** This socket cannot splice (the error, where a splice said why): the rest comes by reads. */
  | { off: Error | null };

/** One data packet being written into its consumer's file as it arrives. */
export class InPlaceWrite {
  /** Payload bytes consumed from the socket so far (written, or dropped after `error`). */
  done = 0;
  error: Error | null = null;

  /**
   * @param file the consumer's file (the stream's duplicate of it): written through at `offset`.
   * @param check asked before every write: null while the consumer still takes this packet in
   *   place, else why not (the packet then fails with that error, and nothing more is written).
   * @param spliced called with the bytes each splice moved into the file.
   */
  constructor(
    private readonly file: OwnedFd,
    readonly offset: number,
    readonly length: number,
    private readonly check: () => Error | null,
    private readonly spliced: (n: number) => void,
  ) {}

  get complete(): boolean {
    return this.done === this.length;
  }

  /** Move what the socket `sock` holds of the payload into the file. */
  pump(sock: number): PumpResult {
    while (this.done < this.length && this.live()) {
      const p = splicePipe();
      if (p === null || sock < 0) return { off: null };
      const r = sys.splice(sock, p[1], -1, this.length - this.done, sys.SPLICE_F_MOVE | sys.SPLICE_F_NONBLOCK);
      if (r === -sys.EAGAIN || r === 0) return 'wait'; // (0: the peer closed; the read that follows sees it)
      if (r < 0) return { off: sys.errnoException(r, 'splice') };
      let left = r;
      while (left > 0) {
        const w = this.error === null ? sys.splice(p[0], this.file.fd, this.offset + this.done, left, sys.SPLICE_F_MOVE) : -1;
        if (w > 0) {
          left -= w;
          this.done += w;
          this.spliced(w);
          continue;
        }
        // the file refused (ENOSPC, EIO…): these bytes are lost; the stream's consumer hears it
        this.error ??= sys.errnoException(w === 0 ? -5 : w, 'splice');
        drainPipe(p, left);
        this.done += left;
        left = 0;
      }
    }
    return this.complete ? 'done' : 'wait';
  }

  /**
   * Where the next read of the socket lands: at most 16 KiB of the packet's rest while splicing
   * works (the rest keeps going by splice), all of it (up to 256 KiB) when `splicing` is off or
   * the bytes are dropped anyway.
   */
  readTarget(splicing: boolean): Buffer {
    const max = !splicing || this.error !== null ? TAIL_MAX : TAIL_READ;
    return tail().subarray(0, Math.min(this.length - this.done, max));
  }

  /** `n` payload bytes that came by a read into `readTarget()`: written at their place, or dropped after an error. */
  tail(n: number, buf: Buffer): void {
    if (this.live()) {
      try {
        let have = 0;
        while (have < n) have += fs.writeSync(this.file.fd, buf, have, n - have, this.offset + this.done + have);
      } catch (err) {
        this.error = err as Error;
      }
    }
    this.done += n;
  }

  /** Whether the consumer still takes this packet (it stops, or the stream ends, in between reads). */
  private live(): boolean {
    if (this.error !== null) return false;
    this.error = this.check();
    return this.error === null;
  }
}
