/**
 * Data/hole map of a file via lseek(SEEK_DATA/SEEK_HOLE), called through koffi (a dependency of
 * the package). The bench does not use src/sparse so that it works before that layer exists and
 * measures it from the outside. Without koffi the whole file counts as data (correct, slower).
 */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { createRequire } from 'node:module';

const SEEK_DATA = 3;
const SEEK_HOLE = 4;
const ENXIO = 6;

type LseekFn = (fd: number, offset: number, whence: number) => number | bigint;
type ErrnoFn = () => number;

let lseekFn: LseekFn | null | undefined;
let errnoFn: ErrnoFn | undefined;
let unavailableReason = '';

function load(): LseekFn | null {
  if (lseekFn !== undefined) return lseekFn;
  try {
    const require = createRequire(import.meta.url);
    const koffi = require('koffi') as {
      load(name: string): { func(sig: string): LseekFn };
      errno(): number;
    };
    const libc = koffi.load('libc.so.6');
    lseekFn = libc.func('int64_t lseek(int fd, int64_t offset, int whence)');
    errnoFn = () => koffi.errno();
  } catch (err) {
    unavailableReason = (err as Error).message;
    lseekFn = null;
  }
  return lseekFn;
}

/** Why SEEK_DATA is unavailable ('' when it works). */
export function seekDataUnavailableReason(): string {
  load();
  return unavailableReason;
}

/**
 * The data segments [offset, end) of an open file of `size` bytes, in order. Holes are what lies
 * between. ENXIO from SEEK_DATA means "hole to the end"; EINVAL/EOPNOTSUPP mean "all data".
 */
export function dataSegments(fd: number, size: number): Array<[number, number]> {
  if (size === 0) return [];
  const lseek = load();
  if (!lseek) return [[0, size]];
  const segs: Array<[number, number]> = [];
  let pos = 0;
  while (pos < size) {
    const d = Number(lseek(fd, pos, SEEK_DATA));
    if (d < 0) {
      const e = errnoFn!();
      if (e === ENXIO) break; // hole to the end
      return [[0, size]]; // not supported here: all data
    }
    if (d >= size) break;
    let h = Number(lseek(fd, d, SEEK_HOLE));
    if (h < 0) h = size;
    if (h > size) h = size;
    segs.push([d, h]);
    pos = h;
  }
  return segs;
}

type FallocateFn = (fd: number, mode: number, offset: number, length: number) => number;
let fallocateFn: FallocateFn | null | undefined;
const FALLOC_PUNCH_KEEP_SIZE = 0x02 | 0x01;
const BLOCK = 4096;

/**
 * Punches every all-zero 4 KiB block of `file` out of its data segments (what `fallocate
 * --dig-holes` is for; util-linux 2.38 leaves part of them allocated on tmpfs). For outputs of
 * tools that write the zeros they read (`rbd export`), before their allocation is compared.
 */
export function punchZeroBlocks(file: string): void {
  load();
  if (fallocateFn === undefined) {
    try {
      const koffi = createRequire(import.meta.url)('koffi') as { load(name: string): { func(sig: string): FallocateFn } };
      fallocateFn = koffi.load('libc.so.6').func('int fallocate(int fd, int mode, int64_t offset, int64_t len)');
    } catch {
      fallocateFn = null;
    }
  }
  const fallocate = fallocateFn;
  if (!fallocate) throw new Error(`cannot punch holes here: koffi not loaded (${unavailableReason})`);
  const fd = openSync(file, 'r+');
  try {
    const size = fstatSync(fd).size;
    const buf = Buffer.allocUnsafe(1 << 20);
    const zero = Buffer.alloc(BLOCK);
    let runAt = -1;
    const punch = (end: number): void => {
      if (runAt >= 0 && fallocate(fd, FALLOC_PUNCH_KEEP_SIZE, runAt, end - runAt) !== 0) throw new Error(`fallocate(PUNCH_HOLE) failed on ${file}`);
      runAt = -1;
    };
    for (const [from, to] of dataSegments(fd, size)) {
      for (let at = from; at < to; at += buf.length) {
        const n = readSync(fd, buf, 0, Math.min(buf.length, to - at), at);
        for (let b = 0; b < n; b += BLOCK) {
          const len = Math.min(BLOCK, n - b);
          const isZero = len === BLOCK && buf.compare(zero, 0, BLOCK, b, b + BLOCK) === 0;
          if (isZero && runAt < 0) runAt = at + b;
          else if (!isZero) punch(at + b);
        }
      }
      punch(to);
    }
  } finally {
    closeSync(fd);
  }
}
