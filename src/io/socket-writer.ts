/**
 * The write side of a connection's socket: bytes go through Node's queue, or, for a frame whose
 * payload is a range of a file in memory, the head by `write(2)` and the payload by
 * `sendfile(2)` (the kernel passes the file's pages to the socket, no copy through user space).
 * Order is kept across both: while a direct frame waits for the socket, every later write is
 * held back until it is out.
 */
import type { Duplex } from 'node:stream';
import type { FileRef } from '../chunk.js';
import { fdOf, OwnedFd, readFileInto } from './file.js';
import type { DataPathStats, RawSocket } from './socket.js';
import * as sys from './sys.js';

/** What goes through Node's queue when a direct frame stalls: its completion means "writable". */
const STALL_PIECE = 16 * 1024;

/** Counters a file frame adds its sendfile bytes to (besides the connection's). */
export interface SendfileCounter {
  sendfileBytes: number;
}

export class SocketWriter {
  /** Bytes handed to the socket so far (keepalive reads the peer's progress from it). */
  bytesQueued = 0;
  /** While a direct frame waits for the socket: what was written after it, in order (with its callback). */
  #held: Array<Buffer | (() => void)> | null = null;
  #heldBytes = 0;
  #frameOut: Promise<void> | null = null;
  #abortFrame: (() => void) | null = null;
  #drainWaiters: Array<() => void> = [];
  #closed = false;
  readonly #socket: Duplex;

  constructor(readonly raw: RawSocket, readonly stats: DataPathStats) {
    this.#socket = raw.socket;
    this.#socket.on('drain', () => this.#flushDrain());
  }

  /** Bytes written but not yet taken by the kernel, and bytes held behind a direct frame. */
  get pendingBytes(): number {
    return this.#socket.writableLength + this.#heldBytes;
  }

  /** A direct frame is half out: later writes are held (see `sendFile`). */
  get holding(): boolean {
    return this.#held !== null;
  }

  /**
   * Queue `buf` for the socket after everything before it. Returns false when it is held behind
   * a direct frame: it goes out once that frame is out, and `done` is never called.
   */
  write(buf: Buffer, done?: () => void): boolean {
    if (this.#held !== null) {
      this.#held.push(buf);
      this.#heldBytes += buf.length;
      return false;
    }
    this.#socket.write(buf, done);
    this.bytesQueued += buf.length;
    return true;
  }

  /**
   * A frame whose payload is written beside its head, never copied. `sent`, if given, is called
   * once the socket references the payload no more: its write completed (or failed, or the
   * connection went before it was written).
   */
  writeFrame(head: Buffer, payload: Uint8Array, sent?: () => void): void {
    if (this.#held !== null) {
      this.#held.push(head, payload as Buffer);
      if (sent) this.#held.push(sent);
      this.#heldBytes += head.length + payload.length;
      return;
    }
    this.#socket.cork();
    this.#socket.write(head);
    if (sent) this.#socket.write(payload, sent);
    else this.#socket.write(payload);
    this.#socket.uncork();
    this.bytesQueued += head.length + payload.length;
  }

  /**
   * Resolves when Node's queue can take more (immediately if it can). A direct frame half out
   * is not waited for here: see `frameOut`.
   */
  drained(): Promise<void> {
    if (!(this.#socket as { writableNeedDrain?: boolean }).writableNeedDrain || this.#closed) return Promise.resolve();
    return new Promise((resolve) => this.#drainWaiters.push(resolve));
  }

  /** While a direct frame is half out: a promise of it being out (never rejects); else null. */
  get frameOut(): Promise<void> | null {
    return this.#frameOut;
  }

  #flushDrain(): void {
    const w = this.#drainWaiters;
    this.#drainWaiters = [];
    for (const f of w) f();
  }

  /**
   * The frame `head` + `length` bytes of `file` at `offset` (a file in memory: reading it never
   * waits for a disk). When the socket can take it, the head is written and the payload handed
   * over by `sendfile(2)`. If the socket fills up mid-frame, a small piece goes through Node's
   * queue (its completion says the socket has room again) and `sendfile` goes on; frames queued
   * meanwhile are held back so that nothing overtakes this one.
   *
   * Returns null when the frame is on its way, a promise of that when it stalled, or false when
   * it cannot go this way (another frame is held, the socket or the file is not ours to hand to
   * the kernel): the caller then sends it from a buffer. The file's bytes are read by the time
   * the frame is on its way; the caller may close its file then.
   */
  sendFile(head: Buffer, file: FileRef, offset: number, length: number, counter: SendfileCounter): Promise<void> | null | false {
    const sfd = this.#held === null && !this.#socket.destroyed ? this.raw.fd : -1;
    let fd = fdOf(file);
    if (sfd < 0 || fd < 0) return false;
    this.raw.bigSendBuffer(true);
    sys.tuneMallocForStreaming();
    // Node's queue still holds earlier bytes: nothing may pass them, so the head joins them and
    // the payload follows by sendfile once they are out (below), not through a copy (against
    // libvirtd the queue is often not empty: a copy there costs a 256 KiB buffer per packet)
    const w = this.#socket.writableLength > 0 ? -sys.EAGAIN : sys.writeRaw(sfd, head);
    if (w < 0 && w !== -sys.EAGAIN) {
      this.raw.disable(); // not ours to write (never again)
      return false;
    }
    this.bytesQueued += head.length + length;
    let sent = 0;
    // The socket or Node's queue was full before the head was all in: the rest of the head goes
    // through Node's queue, whose completion says there is room again, and the payload by
    // sendfile after it.
    const headRest = w < 0 ? Buffer.from(head) : w < head.length ? Buffer.from(head.subarray(w)) : null;
    if (headRest === null) {
      sent = this.#pump(sfd, fd, offset, length, counter);
      if (sent === length) return null;
    }
    // Mid-frame and the socket is full: hold every other write until this frame is out. The
    // caller may close its file before the frame is out (the stream died meanwhile): the rest is
    // read through a duplicate of it, never through a number that may name another file by then.
    // A file that shrinks under a frame already announced cannot take the frame back: the rest
    // goes out as zeros (the length on the wire holds), and the promise rejects with the reason
    // once the frame is out, so that the stream fails; the connection and its other streams go on.
    let shrunk: Error | null = null;
    const readOrZeros = (from: number, at: number, n: number): Buffer => {
      if (shrunk === null) {
        const buf = Buffer.allocUnsafe(n);
        try {
          readFileInto(from, at, buf);
          return buf;
        } catch (err) {
          shrunk = err as Error;
        }
      }
      return Buffer.alloc(n);
    };
    const own = OwnedFd.dup(fd);
    if (own === null) {
      // no duplicate: finish the frame through Node's queue now, as a buffered frame would
      if (headRest !== null) this.#socket.write(headRest);
      this.#socket.write(readOrZeros(fd, offset + sent, length - sent));
      this.stats.copiedBytes += length - sent;
      return shrunk === null ? null : Promise.reject(shrunk);
    }
    fd = own.fd;
    this.#held = [];
    this.stats.directStalls++;
    let resolve!: () => void;
    const frameOut = new Promise<void>((r) => (resolve = r));
    this.#frameOut = frameOut;
    const finished = frameOut.then(() => {
      if (shrunk !== null) throw shrunk;
    });
    let ended = false;
    const done = (): void => {
      // once only: `destroy` ends it, and the socket's last write callback may try again
      if (ended) return;
      ended = true;
      this.#abortFrame = null;
      const held = this.#held ?? [];
      this.#held = null;
      this.#heldBytes = 0;
      this.#frameOut = null;
      own.close();
      // (a callback follows the buffer it is for: it goes with its write, or is called now when
      // nothing more is written)
      for (let i = 0; i < held.length; i++) {
        const b = held[i]!;
        if (typeof b === 'function') {
          b();
          continue;
        }
        if (this.#closed) continue;
        const sent = held[i + 1];
        if (typeof sent === 'function') {
          i++;
          this.#socket.write(b, sent);
        } else {
          this.#socket.write(b);
        }
        this.bytesQueued += b.length;
      }
      resolve();
    };
    const step = (): void => {
      if (this.#closed || this.#socket.destroyed) return done();
      if (sent < length && shrunk === null && this.#socket.writableLength === 0) sent += this.#pump(sfd, fd, offset + sent, length - sent, counter);
      if (sent === length) return done();
      const piece = readOrZeros(fd, offset + sent, Math.min(STALL_PIECE, length - sent));
      sent += piece.length;
      this.stats.copiedBytes += piece.length;
      this.#socket.write(piece, stepAfter);
    };
    // a failed write (EPIPE) comes before the socket is destroyed: read no further pieces
    const stepAfter = (err?: Error | null): void => (err ? done() : step());
    this.#abortFrame = done;
    if (headRest !== null) this.#socket.write(headRest, stepAfter);
    else step(); // (may finish at once: the frame's promise is set first)
    return finished;
  }

  /** `sendfile` until the socket is full or `length` bytes are out: the bytes sent. */
  #pump(sfd: number, fd: number, offset: number, length: number, counter: SendfileCounter): number {
    let sent = 0;
    while (sent < length) {
      const r = sys.sendfile(sfd, fd, offset + sent, length - sent);
      if (r <= 0) {
        if (r < 0 && r !== -sys.EAGAIN) this.raw.disable(); // e.g. EINVAL: not for this pair of fds
        break;
      }
      sent += r;
    }
    this.stats.directBytes += sent;
    counter.sendfileBytes += sent;
    return sent;
  }

  /** The connection is gone: a half-out frame ends (nothing held is written), waiters go on. */
  destroy(): void {
    this.#closed = true;
    this.#flushDrain();
    this.#abortFrame?.();
  }
}
