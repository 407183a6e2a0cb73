/**
 * Data/hole map of a file via lseek(SEEK_DATA/SEEK_HOLE), called through koffi (a dependency of
 * the package). The bench does not use src/sparse so that it works before that layer exists and
 * measures it from the outside. Without koffi the whole file counts as data (correct, slower).
 */
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
