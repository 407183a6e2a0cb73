/**
 * What the reader and the writer share: opening a path or adopting a caller's fd, telling a
 * regular file from a block device, the shared zero buffer, and error wrapping.
 */
import fs from 'node:fs';
import { SparsevirtError } from '../errors.js';
import * as sys from '../io/sys.js';

/** A file by path (opened and closed here) or an fd the caller owns (never closed here). */
export type FileTarget = string | { fd: number };

export interface OpenFile {
  readonly fd: number;
  /** For messages: the path, or `fd N`. */
  readonly name: string;
  /** Apparent size: `st_size` for a regular file, the device size for a block device. */
  readonly size: number;
  /** `st_blocks` of a regular file when opened (-1 for a block device). */
  readonly blocks: number;
  readonly isBlockDevice: boolean;
  /** Closes the fd if this module opened it; idempotent. */
  close(): Promise<void>;
}

/** Wrap a failed file operation: `ERR_IO`, the operation and the file in the message, errno in `cause`. */
export function ioError(what: string, name: string, cause: unknown): SparsevirtError {
  const detail = cause instanceof Error ? cause.message : String(cause);
  return new SparsevirtError('ERR_IO', `${what} ${name}: ${detail}`, { cause });
}

export function abortError(signal: AbortSignal): SparsevirtError {
  return new SparsevirtError('ERR_ABORTED', 'the operation was aborted', { cause: signal.reason });
}

export async function openFile(target: FileTarget, flags: number, mode = 0o644): Promise<OpenFile> {
  let fd: number;
  let name: string;
  let handle: fs.promises.FileHandle | null = null;
  if (typeof target === 'string') {
    name = target;
    try {
      handle = await fs.promises.open(target, flags, mode);
    } catch (err) {
      throw ioError('cannot open', name, err);
    }
    fd = handle.fd;
  } else {
    fd = target.fd;
    name = `fd ${fd}`;
  }
  const close = async (): Promise<void> => {
    const h = handle;
    handle = null;
    if (h) await h.close();
  };
  try {
    let stat: fs.Stats;
    try {
      stat = await new Promise<fs.Stats>((resolve, reject) => {
        fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st)));
      });
    } catch (err) {
      throw ioError('cannot stat', name, err);
    }
    if (stat.isFile()) return { fd, name, size: stat.size, blocks: stat.blocks, isBlockDevice: false, close };
    if (stat.isBlockDevice()) {
      const size = sys.blockDeviceSize(fd);
      if (size < 0) throw ioError('cannot get the size of block device', name, sys.errnoException(size, 'ioctl'));
      return { fd, name, size, blocks: -1, isBlockDevice: true, close };
    }
    throw new SparsevirtError('ERR_UNSUPPORTED', `${name} is neither a regular file nor a block device`);
  } catch (err) {
    await close().catch(() => undefined);
    throw err;
  }
}

/** The write/punch granularity we align zeroing on block devices to (covers 512 and 4096 sectors). */
export const DEVICE_ALIGN = 4096;

/** statfs f_type of filesystems whose st_blocks counts every allocated byte (no FUSE, no network). */
const TRUE_BLOCK_COUNT = new Set([0x01021994 /* tmpfs */, 0xef53 /* ext2/3/4 */, 0x58465342 /* xfs */, 0x9123683e /* btrfs */]);

/**
 * Whether a regular file with `st_blocks` 0 is certainly one hole: on tmpfs, ext4, xfs and btrfs
 * (checked by statfs, in plain Node) every stored byte counts in st_blocks, inline data included.
 * Elsewhere (FUSE, NFS: st_blocks may be 0 for data) only the extent map can tell.
 */
export function certainlyAllHole(file: OpenFile): boolean {
  if (file.isBlockDevice || file.blocks !== 0 || file.size === 0) return false;
  try {
    return TRUE_BLOCK_COUNT.has(fs.statfsSync(`/proc/self/fd/${file.fd}`).type);
  } catch {
    return false;
  }
}

/**
 * `n` zero bytes, a view of the base's one shared buffer (`zeroBytes`): callers must never write
 * into it. Used for holes materialised as data and for zeroing ranges by writes.
 */
export { zeroBytes as zeroes } from '../chunk.js';

/**
 * `fs.read` on a raw fd as a promise: fills `buf` from index `filled` on (`buf[0]` is at file
 * offset `position`), unless EOF comes first. Resolves with the bytes in `buf`.
 */
export function readFully(fd: number, buf: Buffer, position: number, filled = 0): Promise<number> {
  return new Promise((resolve, reject) => {
    let done = filled;
    const step = (err: Error | null, n: number): void => {
      if (err) return reject(err);
      done += n;
      if (n === 0 || done === buf.length) return resolve(done);
      fs.read(fd, buf, done, buf.length - done, position + done, step);
    };
    fs.read(fd, buf, done, buf.length - done, position + done, step);
  });
}
