/**
 * The syscall module of the kernel floor: the few Linux calls Node does not offer, bound once
 * through koffi: `lseek` with SEEK_DATA/SEEK_HOLE, `fallocate`, `ioctl(BLKGETSIZE64, SIOCOUTQ)`,
 * `preadv2(RWF_NOWAIT)`, `fstatfs`; for the data path `sendfile`, `splice`, `pipe2`, `write`,
 * `setsockopt(SO_SNDBUF)`, `fcntl(F_DUPFD, F_SETPIPE_SZ)` and glibc's `mallopt`; `flock` for the daemon's state lock.
 *
 * Calls are synchronous: none of them waits for a disk (sendfile is used on files in memory
 * only; at most metadata, or the blocks a punch frees), and a call costs about a microsecond
 * through koffi, far less than a round trip through the libuv thread pool.
 *
 * Failures are returned, not thrown: a negative result is `-errno`, as the kernel does it.
 * ENXIO from SEEK_DATA is an ordinary answer ("hole to the end") on the hot path, and
 * throwing it would cost a stack trace per file.
 *
 * When koffi cannot be loaded (or `SPARSEVIRT_NO_KOFFI=1`, or `setNativeSyscalls(false)`
 * in tests), the pure-JS fallback answers ENOSYS for lseek/fallocate, so callers take the
 * same path they take on a filesystem without hole support: every byte is data, and holes
 * are written as zeros; data is read into buffers instead of sent by sendfile.
 */
import fs from 'node:fs';
import { createRequire } from 'node:module';
import util from 'node:util';
import { bigToSafe } from '../errors.js';

export const SEEK_END = 2;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** preadv2 flag: fail with EAGAIN rather than wait for the disk. */
export const RWF_NOWAIT = 0x08;

export const ENXIO = 6;
export const EAGAIN = 11;
export const EINVAL = 22;
export const ENOSYS = 38;
export const EOPNOTSUPP = 95;

/** statfs f_type of filesystems whose files live in memory. */
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

/** `_IOR(0x12, 114, size_t)`: the size of a block device in bytes. */
const BLKGETSIZE64 = 0x80081272;

interface Syscalls {
  lseek(fd: number, offset: number, whence: number): number;
  preadNoWait(fd: number, buf: Buffer, offset: number): number;
  pread(fd: number, buf: Buffer, offset: number): number;
  pwrite(fd: number, buf: Buffer, offset: number): number;
  isMemoryBacked(fd: number): boolean;
  fallocate(fd: number, mode: number, offset: number, length: number): number;
  blockDeviceSize(fd: number): number;
  sendfile(outFd: number, inFd: number, offset: number, count: number): number;
  write(fd: number, buf: Buffer): number;
  mallopt(param: number, value: number): boolean;
  mallocTrim(): boolean;
  setSendBuffer(fd: number, bytes: number): number;
  dup(fd: number): number;
  outq(fd: number): number;
  splice(fdIn: number, fdOut: number, outOffset: number, length: number, flags: number): number;
  pipe(size: number): [number, number] | number;
  flock(fd: number, operation: number): number;
}

/** koffi hands back a BigInt for 64-bit results past 2^53; refuse those rather than round. */
function toSafe(name: string, v: number | bigint): number {
  return typeof v === 'bigint' ? bigToSafe(name, v) : v;
}

function loadNative(): Syscalls | null {
  if (process.platform !== 'linux' || process.env.SPARSEVIRT_NO_KOFFI === '1') return null;
  try {
    const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    const libc = koffi.load('libc.so.6');
    const lseek = libc.func('int64_t lseek(int fd, int64_t offset, int whence)');
    const fallocate = libc.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
    const ioctl = libc.func('int ioctl(int fd, unsigned long request, _Out_ uint64_t *out)');
    koffi.struct('iovec', { base: 'void *', len: 'size_t' });
    const preadv2 = libc.func('int64_t preadv2(int fd, const iovec *iov, int iovcnt, int64_t offset, int flags)');
    const pread = libc.func('int64_t pread(int fd, _Out_ void *buf, size_t count, int64_t offset)');
    const pwrite = libc.func('int64_t pwrite(int fd, const void *buf, size_t count, int64_t offset)');
    const fstatfs = libc.func('int fstatfs(int fd, void *buf)');
    const sendfile = libc.func('int64_t sendfile(int out_fd, int in_fd, _Inout_ int64_t *offset, size_t count)');
    const write = libc.func('int64_t write(int fd, const void *buf, size_t count)');
    const mallopt = libc.func('int mallopt(int param, int value)');
    const mallocTrim = libc.func('int malloc_trim(size_t pad)');
    const ioctlInt = libc.func('int ioctl(int fd, unsigned long request, _Out_ int *out)');
    const intBox: [number] = [0];
    const dup = libc.func('int fcntl(int fd, int cmd, int arg)');
    const setsockopt = libc.func('int setsockopt(int fd, int level, int name, _In_ int *value, uint32_t len)');
    const offBox: [number | bigint] = [0];
    const splice = libc.func('int64_t splice(int fd_in, void *off_in, int fd_out, _Inout_ int64_t *off_out, size_t len, unsigned int flags)');
    const pipe2 = libc.func('int pipe2(_Out_ int *fds, int flags)');
    const flock = libc.func('int flock(int fd, int operation)');
    const spliceOff: [number | bigint] = [0];
    const pipeFds = new Int32Array(2);
    // struct statfs is 120 bytes on 64-bit Linux; f_type (a long) comes first.
    const statfsBuf = Buffer.alloc(256);
    // One reusable out-parameter box: koffi writes the u64 into out[0].
    const sizeBox: [number | bigint] = [0];
    return {
      lseek(fd, offset, whence) {
        const r = toSafe('lseek result', lseek(fd, offset, whence) as number | bigint);
        return r < 0 ? -koffi.errno() : r;
      },
      preadNoWait(fd, buf, offset) {
        const r = preadv2(fd, { base: buf, len: buf.length }, 1, offset, RWF_NOWAIT) as number;
        return r < 0 ? -koffi.errno() : r;
      },
      pread(fd, buf, offset) {
        const r = pread(fd, buf, buf.length, offset) as number;
        return r < 0 ? -koffi.errno() : r;
      },
      pwrite(fd, buf, offset) {
        const r = pwrite(fd, buf, buf.length, offset) as number;
        return r < 0 ? -koffi.errno() : r;
      },
      isMemoryBacked(fd) {
        if (fstatfs(fd, statfsBuf) !== 0) return false;
        const type = statfsBuf.readUInt32LE(0);
        return type === TMPFS_MAGIC || type === RAMFS_MAGIC;
      },
      fallocate(fd, mode, offset, length) {
        return fallocate(fd, mode, offset, length) < 0 ? -koffi.errno() : 0;
      },
      sendfile(outFd, inFd, offset, count) {
        offBox[0] = offset;
        const r = sendfile(outFd, inFd, offBox, count) as number;
        return r < 0 ? -koffi.errno() : r;
      },
      write(fd, buf) {
        const r = write(fd, buf, buf.length) as number;
        return r < 0 ? -koffi.errno() : r;
      },
      outq(fd) {
        return ioctlInt(fd, TIOCOUTQ, intBox) === 0 ? intBox[0] : -koffi.errno();
      },
      splice(fdIn, fdOut, outOffset, length, flags) {
        let r: number;
        if (outOffset < 0) {
          r = splice(fdIn, null, fdOut, null, length, flags) as number;
        } else {
          spliceOff[0] = outOffset;
          r = splice(fdIn, null, fdOut, spliceOff, length, flags) as number;
        }
        return r < 0 ? -koffi.errno() : r;
      },
      pipe(size) {
        if (pipe2(pipeFds, O_NONBLOCK | O_CLOEXEC) !== 0) return -koffi.errno();
        // F_SETPIPE_SZ may be refused (a limit below `size`): the default capacity still works
        if (size > 0) dup(pipeFds[1]!, F_SETPIPE_SZ, size);
        return [pipeFds[0]!, pipeFds[1]!];
      },
      flock(fd, operation) {
        return flock(fd, operation) < 0 ? -koffi.errno() : 0;
      },
      dup(fd) {
        const r = dup(fd, F_DUPFD_CLOEXEC, 0) as number;
        return r < 0 ? -koffi.errno() : r;
      },
      setSendBuffer(fd, bytes) {
        return setsockopt(fd, SOL_SOCKET, SO_SNDBUF, [bytes], 4) < 0 ? -koffi.errno() : 0;
      },
      mallopt(param, value) {
        return mallopt(param, value) === 1;
      },
      mallocTrim() {
        return mallocTrim(0) === 1;
      },
      blockDeviceSize(fd) {
        if (ioctl(fd, BLKGETSIZE64, sizeBox) === 0) return toSafe('block device size', sizeBox[0]);
        const end = toSafe('lseek result', lseek(fd, 0, SEEK_END) as number | bigint);
        return end < 0 ? -koffi.errno() : end;
      },
    };
  } catch {
    return null;
  }
}

/**
 * Without koffi the size of a block device still comes from sysfs: `size` is in 512-byte
 * sectors for whole disks and partitions alike.
 */
function sysfsBlockDeviceSize(fd: number): number {
  const rdev = fs.fstatSync(fd).rdev;
  // glibc's gnu_dev_major/minor split of a 64-bit dev_t (Node gives it as a number).
  const major = Math.floor(rdev / 2 ** 32) & ~0xfff | ((rdev >>> 8) & 0xfff);
  const minor = Math.floor(rdev / 2 ** 12) & ~0xff | (rdev & 0xff);
  try {
    const sectors = fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'latin1');
    return Number.parseInt(sectors, 10) * 512;
  } catch {
    return -ENOSYS;
  }
}

/** An fs call's result, or the error it throws as `-errno` (this module's convention). */
function asResult(call: () => number): number {
  try {
    return call();
  } catch (err) {
    const errno = (err as NodeJS.ErrnoException).errno;
    return typeof errno === 'number' ? -Math.abs(errno) : -EINVAL;
  }
}

const fallback: Syscalls = {
  lseek: () => -ENOSYS,
  preadNoWait: () => -ENOSYS,
  pread: (fd, buf, offset) => asResult(() => fs.readSync(fd, buf, 0, buf.length, offset)),
  pwrite: (fd, buf, offset) => asResult(() => fs.writeSync(fd, buf, 0, buf.length, offset)),
  isMemoryBacked: () => false,
  fallocate: () => -ENOSYS,
  blockDeviceSize: sysfsBlockDeviceSize,
  sendfile: () => -ENOSYS,
  write: () => -ENOSYS,
  mallopt: () => false,
  mallocTrim: () => false,
  setSendBuffer: () => -ENOSYS,
  dup: () => -ENOSYS,
  outq: () => -ENOSYS,
  splice: () => -ENOSYS,
  pipe: () => -ENOSYS,
  flock: () => -ENOSYS,
};

// koffi is loaded on the first syscall, not at import: a command that never maps or punches
// a file (most of the CLI) does not pay for loading a native library at start-up.
let native: Syscalls | null | undefined;
let forced: Syscalls | null = null;

function impl(): Syscalls {
  if (forced) return forced;
  if (native === undefined) native = loadNative();
  return native ?? fallback;
}

/** True while the koffi bindings are in use (loads them on first call). */
export function nativeSyscallsAvailable(): boolean {
  return impl() !== fallback;
}

/**
 * Use the koffi bindings (`true`, when they loaded) or force the pure-JS fallback (`false`).
 * For tests of the fallback path; returns whether native syscalls are now in use.
 */
export function setNativeSyscalls(enabled: boolean): boolean {
  forced = enabled ? null : fallback;
  return nativeSyscallsAvailable();
}

/** `lseek(2)`: the resulting offset, or `-errno` (ENXIO: no data/hole past `offset`). */
export function lseek(fd: number, offset: number, whence: number): number {
  return impl().lseek(fd, offset, whence);
}

/**
 * `preadv2(RWF_NOWAIT)` into all of `buf`: bytes read (short when only part was cached), or
 * `-errno`: EAGAIN when nothing is cached, EOPNOTSUPP/ENOSYS where unsupported (tmpfs). A read
 * served from the page cache this way skips the round trip through libuv's thread pool, which
 * costs ten times the copy for small reads; a read that would wait for the disk never blocks.
 */
export function preadNoWait(fd: number, buf: Buffer, offset: number): number {
  return impl().preadNoWait(fd, buf, offset);
}

/**
 * `pread(2)` into all of `buf`: bytes read (short at the end of the file), or `-errno`. Half the
 * cost of `fs.readSync` for the 4 KiB reads of a file of small extents (100,000 per image).
 */
export function pread(fd: number, buf: Buffer, offset: number): number {
  return impl().pread(fd, buf, offset);
}

/**
 * `pwrite(2)` of `buf`: bytes written (short on a full device), or `-errno`. Cheaper than
 * `fs.writeSync` for the many small writes of a file of small extents, as `pread`.
 */
export function pwrite(fd: number, buf: Buffer, offset: number): number {
  return impl().pwrite(fd, buf, offset);
}

/**
 * Whether the file lives in memory (tmpfs, ramfs): reading it never waits for a disk, so a
 * synchronous read is cheaper than the thread pool (and RWF_NOWAIT is not supported there).
 */
export function isMemoryBacked(fd: number): boolean {
  return impl().isMemoryBacked(fd);
}

/** `fallocate(2)`: 0, or `-errno` (EOPNOTSUPP/ENOSYS: this mode is not supported here). */
export function fallocate(fd: number, mode: number, offset: number, length: number): number {
  return impl().fallocate(fd, mode, offset, length);
}

/** The size of the block device open on `fd` in bytes, or `-errno`. */
export function blockDeviceSize(fd: number): number {
  return impl().blockDeviceSize(fd);
}

/**
 * `sendfile(2)` of `count` bytes of `inFd` at `offset` (the file position is not used) to the
 * socket `outFd`: bytes sent (short or `-EAGAIN` when the socket is full), or `-errno`. From a
 * file in memory into a unix or TCP socket the kernel passes the pages by reference: no copy
 * through user space, no buffer here.
 */
export function sendfile(outFd: number, inFd: number, offset: number, count: number): number {
  return impl().sendfile(outFd, inFd, offset, count);
}

/** `write(2)` of all of `buf` to `fd`, without Node's queue: bytes written, or `-errno` (EAGAIN). */
export function writeRaw(fd: number, buf: Buffer): number {
  return impl().write(fd, buf);
}

const F_DUPFD_CLOEXEC = 1030;
const F_SETPIPE_SZ = 1031;
const O_NONBLOCK = 0o4000;
const O_CLOEXEC = 0o2000000;

/** splice(2) flags: move pages rather than copy them (a hint); do not block on the pipe. */
export const SPLICE_F_MOVE = 1;
export const SPLICE_F_NONBLOCK = 2;

/**
 * `splice(2)` of up to `length` bytes from `fdIn` (a socket or a pipe, at its current position)
 * to `fdOut`: at `outOffset` of a file (its file position is not used), or with `outOffset` -1
 * into a pipe. Bytes moved (0 at the end of the input), or `-errno` (EAGAIN: nothing to move
 * now). From a socket into a pipe the kernel passes the received pages by reference; from the
 * pipe into a file in memory it copies them once: the copy through user space is gone.
 */
export function splice(fdIn: number, fdOut: number, outOffset: number, length: number, flags: number): number {
  return impl().splice(fdIn, fdOut, outOffset, length, flags);
}

/** `pipe2(O_NONBLOCK | O_CLOEXEC)` with a capacity of `size` bytes where allowed: `[read, write]`, or `-errno`. */
export function makePipe(size: number): [number, number] | number {
  return impl().pipe(size);
}
const TIOCOUTQ = 0x5411;

/**
 * `ioctl(SIOCOUTQ)`: what a socket holds that the peer has not read yet (for a unix socket, in
 * kernel buffer units), or `-errno`. Falling means the peer is reading.
 */
export function socketOutq(fd: number): number {
  return impl().outq(fd);
}

/** `fcntl(F_DUPFD_CLOEXEC)`: a second fd for the same open file (close-on-exec), or `-errno`. */
export function dupFd(fd: number): number {
  return impl().dup(fd);
}

/** flock(2) operations. */
export const LOCK_EX = 2;
export const LOCK_NB = 4;
export const LOCK_UN = 8;

/**
 * `flock(2)`: 0, or `-errno` (EAGAIN with LOCK_NB: another open file holds a conflicting lock;
 * ENOSYS without the native syscalls). The lock belongs to the open file, not the process: two
 * opens of one file conflict also within a process, and the kernel drops the lock when the last
 * fd of that open file is closed, including when the process dies.
 */
export function flock(fd: number, operation: number): number {
  return impl().flock(fd, operation);
}

const SOL_SOCKET = 1;
const SO_SNDBUF = 7;

/**
 * `setsockopt(SO_SNDBUF)`: how much a unix socket may hold unread (the kernel doubles it, and
 * caps it at net.core.wmem_max). The default (~208 KiB) is less than one 256 KiB stream packet,
 * so sender and receiver would take turns at every packet. 0 or `-errno`.
 */
export function setSendBuffer(fd: number, bytes: number): number {
  return impl().setSendBuffer(fd, bytes);
}

const M_TRIM_THRESHOLD = -1;
const M_MMAP_THRESHOLD = -3;
let mallocTuned = false;

/**
 * Keep glibc from handing the memory of freed stream buffers back to the kernel after every
 * garbage collection, only to fault it in again for the next ones (a 2 GiB transfer in 256 KiB
 * buffers otherwise costs ~250,000 page faults). Buffers up to 32 MiB come from the heap,
 * whose top is trimmed only past 16 MiB of free space: peak memory is unchanged, the faults go.
 */
export function tuneMallocForStreaming(): void {
  if (mallocTuned) return;
  mallocTuned = true;
  const m = impl();
  m.mallopt(M_MMAP_THRESHOLD, 32 << 20);
  m.mallopt(M_TRIM_THRESHOLD, 16 << 20);
}

/**
 * Give the free memory of glibc's heaps back to the kernel (malloc_trim), once a daemon has no
 * transfer left: with the trim threshold raised above, the heap otherwise keeps the high-water
 * mark of every transfer it ever ran, and grows with each round of transfers.
 * A no-op until `tuneMallocForStreaming` ran. Returns whether memory went back.
 */
export function releaseFreeMemory(): boolean {
  return mallocTuned ? impl().mallocTrim() : false;
}

/** A Node-style system error (`code`, `errno`, `syscall`) for a `-errno` result from this module. */
export function errnoException(negErrno: number, syscall: string): NodeJS.ErrnoException {
  const code = util.getSystemErrorName(negErrno);
  // worded as Node words its own: "ENOSPC: no space left on device, write"
  const text = util.getSystemErrorMap().get(negErrno)?.[1];
  const err: NodeJS.ErrnoException = new Error(text ? `${code}: ${text}, ${syscall}` : `${syscall}: ${code}`);
  err.code = code;
  err.errno = negErrno;
  err.syscall = syscall;
  return err;
}
