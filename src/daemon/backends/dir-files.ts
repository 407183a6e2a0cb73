/**
 * File work of the dir backend: allocation, the sparse copy of a clone, reflinks, wiping.
 */
import { randomFill } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import * as sys from '../../io/sys.js';
import { ExtentWalker } from '../../sparse/extents.js';
import { isAllZero, ZERO_CHUNK_SIZE, zeroBytes } from '../../chunk.js';
import { readFully } from '../../sparse/file.js';
import { writeChunks } from '../../sparse/index.js';
import { systemError } from '../errors.js';

/** Read and write size for copying a volume and for filling one with random bytes. */
const PIECE = 1 << 20;

export function isErrno(err: unknown, code: string): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === code;
}

/** Make [0, size) of `fh` read as zeros keeping its size: holes punched where the filesystem can, else zeros written. */
export async function zeroFile(fh: fsp.FileHandle, size: number): Promise<void> {
  if (size === 0) return;
  async function* oneHole() {
    yield { kind: 'hole' as const, length: size };
  }
  await writeChunks({ fd: fh.fd }, oneHole(), { offset: 0 });
}

/** Overwrite [0, size) of `fh` with random bytes. */
export async function randomizeFile(fh: fsp.FileHandle, size: number): Promise<void> {
  const buf = Buffer.allocUnsafe(Math.min(PIECE, Math.max(size, 1)));
  for (let at = 0; at < size; at += buf.length) {
    const n = Math.min(buf.length, size - at);
    await new Promise<void>((resolve, reject) => randomFill(buf, 0, n, (err) => (err ? reject(err) : resolve())));
    await fh.write(buf, 0, n, at);
  }
}


/**
 * Copy the data of [0, size) of `fromFd` into `to` at the same offsets, as libvirt's sparse
 * copy does: holes are skipped, and so is each all-zero block (the target's block size,
 * aligned to the file) of the data, so that they stay unallocated where nothing else put blocks.
 */
export async function copyData(fromFd: number, fromName: string, to: fsp.FileHandle, toName: string, size: number): Promise<void> {
  const block = Math.max(512, Number((await to.stat()).blksize) || 4096);
  const buf = Buffer.allocUnsafe(PIECE);
  const walker = new ExtentWalker(fromFd, fromName, 0, size, true);
  for (let e = walker.next(); e; e = walker.next()) {
    if (e.kind === 'hole') continue;
    for (let at = e.offset; at < e.offset + e.length;) {
      const want = Math.min(buf.length, e.offset + e.length - at);
      const n = await readFully(fromFd, buf.subarray(0, want), at);
      if (n === 0) return; // the source shrank meanwhile
      // write the runs of blocks that are not all zero
      let runStart = -1;
      const flush = async (end: number): Promise<void> => {
        if (runStart < 0) return;
        await writeAll(to, buf.subarray(runStart, end), at + runStart, toName);
        runStart = -1;
      };
      for (let off = 0; off < n;) {
        const next = Math.min(n, (Math.floor((at + off) / block) + 1) * block - at);
        if (isAllZero(buf.subarray(off, next))) await flush(off);
        else if (runStart < 0) runStart = off;
        off = next;
      }
      await flush(n);
      at += n;
    }
  }
}

async function writeAll(fh: fsp.FileHandle, data: Buffer, at: number, name: string): Promise<void> {
  for (let done = 0; done < data.length;) {
    let n: number;
    try {
      n = (await fh.write(data, done, data.length - done, at + done)).bytesWritten;
    } catch (err) {
      throw systemError(`cannot write to '${name}'`, err);
    }
    if (n === 0) throw systemError(`cannot write to '${name}'`, Object.assign(new Error('short write'), { code: 'EIO', errno: -5 }));
    done += n;
  }
}

/** libvirt's reflink clone (FICLONE): the filesystem shares the source's blocks, or it fails. */
export async function reflinkInto(from: string, to: string): Promise<void> {
  try {
    await fsp.copyFile(from, to, fs.constants.COPYFILE_FICLONE_FORCE);
  } catch (err) {
    throw systemError(`failed to clone files from '${from}'`, err);
  }
}

/** Allocate [offset, offset + length) (fallocate mode 0), or write zeros where that is unsupported. */
export async function allocate(fd: number, offset: number, length: number, name: string): Promise<void> {
  if (length <= 0) return;
  const r = sys.fallocate(fd, 0, offset, length);
  if (r === 0) return;
  if (r !== -sys.EOPNOTSUPP && r !== -sys.ENOSYS) {
    throw systemError(`cannot allocate ${length} bytes in file '${name}'`, sys.errnoException(r, 'fallocate'));
  }
  const zeros = zeroBytes(Math.min(ZERO_CHUNK_SIZE, length));
  for (let at = offset; at < offset + length; at += zeros.length) {
    const n = Math.min(zeros.length, offset + length - at);
    await new Promise<void>((resolve, reject) => fs.write(fd, zeros, 0, n, at, (err) => (err ? reject(err) : resolve())));
  }
}
