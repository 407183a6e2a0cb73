/**
 * Files as the data path holds them: `FileRef`s (the opaque handles that travel through streams
 * in `FileRange`s and `WrittenRange`s) made from an fd, and resolved back to it here, below the
 * streams, by whoever hands the file's pages to the kernel (sendfile, splice).
 */
import fs from 'node:fs';
import type { FileRef } from '../chunk.js';
import { SparsevirtError } from '../errors.js';
import * as sys from './sys.js';

/** A file open on `fd`, whose owner (not this object) closes it. */
class FdFile implements FileRef {
  readonly #fd: number;

  constructor(fd: number) {
    this.#fd = fd;
  }

  readInto(offset: number, target: Buffer): void {
    readFileInto(this.#fd, offset, target);
  }

  static fdOf(ref: FileRef): number {
    return #fd in (ref as object) ? (ref as FdFile).#fd : -1;
  }
}

/**
 * A `FileRef` for the open file `fd` (in memory: tmpfs, ramfs), for `Stream.sendFileRange` and
 * `Stream.receiveInto`. The caller keeps the fd open while ranges of it travel, and closes it.
 */
export function fileRef(fd: number): FileRef {
  if (!Number.isSafeInteger(fd) || fd < 0) throw new SparsevirtError('ERR_INVALID_ARG', `fd must be a non-negative integer, got ${fd}`);
  return new FdFile(fd);
}

/** The fd behind a `FileRef` made by `fileRef`, or -1 (another kind of file: read it instead). */
export function fdOf(ref: FileRef): number {
  return FdFile.fdOf(ref);
}

/**
 * Fill all of `buf` with the bytes of `fd` at `offset` (`pread`; short reads continue). Throws a
 * system error, or ERR_IO when the file ends first (it shrank since its extents were mapped).
 */
export function readFileInto(fd: number, offset: number, buf: Buffer): void {
  for (let have = 0; have < buf.length; ) {
    const n = sys.pread(fd, have === 0 ? buf : buf.subarray(have), offset + have);
    if (n < 0) throw sys.errnoException(n, 'pread');
    if (n === 0) throw new SparsevirtError('ERR_IO', `file shrank while reading (EOF at ${offset + have})`);
    have += n;
  }
}

/**
 * A duplicate fd of a file, owned by the data path: its writes or reads span I/O callbacks, and
 * the file's owner may close its own fd meanwhile (the number may then name another file).
 */
export class OwnedFd {
  #fd: number;

  private constructor(fd: number) {
    this.#fd = fd;
  }

  /** A duplicate of `fd` (close-on-exec), or null where there is none (no native syscalls). */
  static dup(fd: number): OwnedFd | null {
    if (fd < 0) return null;
    const copy = sys.dupFd(fd);
    return copy < 0 ? null : new OwnedFd(copy);
  }

  /** A duplicate of the file behind `ref`, or null (not a file of `fileRef`, or no duplicate). */
  static of(ref: FileRef): OwnedFd | null {
    return OwnedFd.dup(fdOf(ref));
  }

  /** The fd; -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  close(): void {
    const fd = this.#fd;
    if (fd < 0) return;
    this.#fd = -1;
    fs.close(fd, () => undefined);
  }

  /**
   * Closes on this thread, for a file in memory (tmpfs, ramfs), whose close never waits on a
   * device: when it returns, the file is no longer open through this duplicate (an answer sent
   * next may say the transfer ended, and a peer may check that nothing holds the file).
   */
  closeNow(): void {
    const fd = this.#fd;
    if (fd < 0) return;
    this.#fd = -1;
    try {
      fs.closeSync(fd);
    } catch {
      // (EINTR, EIO: the number is released all the same)
    }
  }
}
