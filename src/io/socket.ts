/**
 * A connection's socket as the kernel sees it: the fd a plain unix or TCP socket has, when the
 * data path may write and read it itself (sendfile, splice, `write(2)` around Node's queue), and
 * how much the kernel may hold for it.
 */
import { readFileSync } from 'node:fs';
import type { Duplex } from 'node:stream';
import * as sys from './sys.js';

/** SO_SNDBUF for unix sockets while file data goes out by sendfile (the kernel doubles it). */
const SOCKET_SEND_BUFFER = 1 << 20;

let wmemDefault = 0;
/** net.core.wmem_default: what a new socket gets. */
function defaultSendBuffer(): number {
  if (wmemDefault === 0) {
    try {
      wmemDefault = Number.parseInt(readFileSync('/proc/sys/net/core/wmem_default', 'latin1'), 10) || 212992;
    } catch {
      wmemDefault = 212992;
    }
  }
  return wmemDefault;
}

/**
 * Counters of the data path of one connection (or one stream): payload bytes the kernel took
 * straight from files (`sendfile`); direct frames that found the socket or Node's queue full
 * (later frames held back meanwhile); payload bytes of those that went through Node's queue
 * instead (the 16 KiB pieces whose completion says the socket has room again); large file frames
 * read into a buffer whole, because another frame was held or the socket was not ours to write.
 * Received in place: payload bytes spliced from the socket into files, and the packets that went
 * so. Reads: the socket reads (or 'data' events) that brought bytes.
 */
export interface DataPathStats {
  directBytes: number;
  directStalls: number;
  copiedBytes: number;
  bufferedFrames: number;
  splicedBytes: number;
  splicedFrames: number;
  reads: number;
}

export function newDataPathStats(): DataPathStats {
  return { directBytes: 0, directStalls: 0, copiedBytes: 0, bufferedFrames: 0, splicedBytes: 0, splicedFrames: 0, reads: 0 };
}

export class RawSocket {
  #fd: number | undefined;
  #bigBuffer = false;

  constructor(readonly socket: Duplex) {}

  /**
   * The socket's fd when the data path may use it directly (a plain unix or TCP socket, the
   * native syscalls loaded), else -1. Direct writes happen only while Node's own write queue is
   * empty, so they never overtake bytes handed to `socket.write` before them.
   */
  get fd(): number {
    // a destroyed socket's fd number may already belong to another file: never touch it again
    if (this.socket.destroyed) return -1;
    if (this.#fd !== undefined) return this.#fd;
    const handle = (this.socket as { _handle?: { fd?: number } })._handle;
    const fd = typeof handle?.fd === 'number' && handle.fd >= 0 && !(this.socket as { encrypted?: boolean }).encrypted ? handle.fd : -1;
    this.#fd = fd >= 0 && sys.nativeSyscallsAvailable() ? fd : -1;
    return this.#fd;
  }

  /** A syscall refused this socket (it is not ours to write, or not for this pair of fds): no direct I/O on it again. */
  disable(): void {
    this.#fd = -1;
  }

  get sendBufferIsBig(): boolean {
    return this.#bigBuffer;
  }

  /**
   * On a unix socket, let the kernel hold a few large packets while file data goes out by
   * sendfile (see `sys.setSendBuffer`), and go back to the default for everything else: with
   * small packets in a big buffer a daemon outpaces virsh, whose client queues every packet it
   * reads on a list it walks to the end for each new one (libvirt 9.0), and slows down
   * quadratically (100,000 extents take minutes instead of seconds). TCP keeps its own
   * autotuning.
   */
  bigSendBuffer(big: boolean): void {
    if (this.#bigBuffer === big) return;
    this.#bigBuffer = big;
    const handle = (this.socket as { _handle?: { constructor?: { name?: string } } })._handle;
    const fd = this.fd;
    if (fd < 0 || handle?.constructor?.name !== 'Pipe') return;
    // the kernel doubles what it is given; the default is net.core.wmem_default, undoubled
    sys.setSendBuffer(fd, big ? SOCKET_SEND_BUFFER : defaultSendBuffer() >> 1);
  }

  /** What the kernel holds that the peer has not read yet (falling: the peer reads), or -1. */
  outq(): number {
    const fd = this.fd;
    return fd >= 0 ? sys.socketOutq(fd) : -1;
  }
}
