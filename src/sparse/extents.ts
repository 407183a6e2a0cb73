/**
 * The extent map of a file: where it holds data and where it has holes, from
 * SEEK_DATA/SEEK_HOLE, walked lazily so a 1 TiB image with millions of extents never needs
 * its whole map in memory.
 */
import { SparsevirtError } from '../errors.js';
import { ioError } from './file.js';
import * as sys from '../io/sys.js';

export interface Extent {
  offset: number;
  length: number;
  kind: 'data' | 'hole';
}

/**
 * Walks [start, end) of an open file one extent at a time, in order, never two of the same
 * kind in a row, covering the range exactly.
 *
 * ENXIO from SEEK_DATA means "hole from here to the end". EINVAL/EOPNOTSUPP (no hole support)
 * or ENOSYS (no native syscalls) mean "all data". `seekHoles: false` (block devices) skips
 * the syscalls: everything is data.
 *
 * A hole is read as zero; "data" may still be zeros (allocated or preallocated blocks).
 * Granularity is the filesystem's: ext4 reports whole 4 KiB blocks, so one byte written
 * makes its block data.
 */
export class ExtentWalker {
  readonly #fd: number;
  readonly #name: string;
  readonly #end: number;
  #pos: number;
  #seekHoles: boolean;
  /** Where the next data starts, when the SEEK_DATA that ended the last hole already said so. */
  #dataAt = -1;

  constructor(fd: number, name: string, start: number, end: number, seekHoles: boolean) {
    this.#fd = fd;
    this.#name = name;
    this.#pos = start;
    this.#end = end;
    this.#seekHoles = seekHoles;
  }

  /** The next extent, or null past the end. */
  next(): Extent | null {
    const pos = this.#pos;
    const end = this.#end;
    if (pos >= end) return null;
    if (!this.#seekHoles) return this.#take('data', end);

    let data = this.#dataAt;
    this.#dataAt = -1;
    if (data < 0) {
      data = sys.lseek(this.#fd, pos, sys.SEEK_DATA);
      if (data === -sys.ENXIO) return this.#take('hole', end);
      if (data < 0) return this.#unsupported(data, 'SEEK_DATA');
      if (data > pos) {
        this.#dataAt = data;
        return this.#take('hole', Math.min(data, end));
      }
    }
    const hole = sys.lseek(this.#fd, pos, sys.SEEK_HOLE);
    // ENXIO here: the file shrank below `pos` since we looked; past EOF reads as nothing.
    if (hole === -sys.ENXIO) return this.#take('hole', end);
    if (hole < 0) return this.#unsupported(hole, 'SEEK_HOLE');
    return this.#take('data', Math.min(hole, end));
  }

  #take(kind: Extent['kind'], to: number): Extent {
    const offset = this.#pos;
    this.#pos = to;
    return { offset, length: to - offset, kind };
  }

  #unsupported(negErrno: number, whence: string): Extent {
    if (negErrno === -sys.EINVAL || negErrno === -sys.EOPNOTSUPP || negErrno === -sys.ENOSYS) {
      this.#seekHoles = false;
      return this.#take('data', this.#end);
    }
    throw ioError(`lseek(${whence}) failed on`, this.#name, sys.errnoException(negErrno, 'lseek'));
  }
}

export interface ZeroDetection {
  /** Zero runs are found in pieces of this many bytes, aligned to file offsets. */
  minRun: number;
}

export const DEFAULT_MIN_ZERO_RUN = 4096;

/** Normalise the `detectZeroes` option: null when off. */
export function zeroDetection(opt: boolean | { minRun?: number } | undefined): ZeroDetection | null {
  if (!opt) return null;
  const minRun = opt === true ? DEFAULT_MIN_ZERO_RUN : (opt.minRun ?? DEFAULT_MIN_ZERO_RUN);
  if (!Number.isSafeInteger(minRun) || minRun < 1) {
    throw new SparsevirtError('ERR_INVALID_ARG', `detectZeroes.minRun must be a positive integer, got ${minRun}`);
  }
  return { minRun };
}
