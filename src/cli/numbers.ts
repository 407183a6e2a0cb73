/**
 * Number parsing exactly as virsh does it: C's strtoull() behind libvirt's virStrToLong_ull /
 * virStrToLong_ullp, and virScaleInteger's size suffixes. Values are bigints (unsigned 64-bit),
 * so nothing is rounded before the caller decides what it can represent.
 */

export const ULLONG_MAX = (1n << 64n) - 1n;

interface StrtoullResult {
  value: bigint;
  /** Index of the first character not consumed (0 when no digits were found, as strtoull). */
  end: number;
  /** errno would be ERANGE. */
  overflow: boolean;
}

const isCSpace = (c: string): boolean => c === ' ' || c === '\t' || c === '\n' || c === '\v' || c === '\f' || c === '\r';
const isDigit = (c: string | undefined): boolean => c !== undefined && c >= '0' && c <= '9';

/** glibc strtoull(s, &end, 10): leading blanks, an optional sign (minus wraps), digits. */
export function strtoull(s: string): StrtoullResult {
  let i = 0;
  while (i < s.length && isCSpace(s[i]!)) i++;
  let negative = false;
  if (s[i] === '+' || s[i] === '-') {
    negative = s[i] === '-';
    i++;
  }
  if (!isDigit(s[i])) return { value: 0n, end: 0, overflow: false };
  let value = 0n;
  let overflow = false;
  while (isDigit(s[i])) {
    if (!overflow) {
      value = value * 10n + BigInt(s.charCodeAt(i) - 48);
      if (value > ULLONG_MAX) overflow = true;
    }
    i++;
  }
  if (overflow) return { value: ULLONG_MAX, end: i, overflow };
  if (negative && value !== 0n) value = (1n << 64n) - value;
  return { value, end: i, overflow };
}

/**
 * virStrToLong_ull (wrap = true: "-1" is 2^64-1) or virStrToLong_ullp (wrap = false: any minus
 * sign is an error). The whole string must be a number. Returns null when malformed.
 */
export function parseULongLong(s: string, wrap: boolean): bigint | null {
  const r = strtoull(s);
  if (r.overflow || r.end === 0 || r.end !== s.length) return null;
  if (!wrap && s.slice(0, r.end).includes('-')) return null;
  return r.value;
}

export type ScaledResult =
  | { ok: true; value: bigint }
  /** `detail` is the libvirt error virsh prints on a second line, when there is one. */
  | { ok: false; detail: string | null };

/**
 * virScaleInteger: `suffix` is what follows the digits. No suffix = `scale`; b = 1; k, m, g, t,
 * p, e = powers of 1024 (also as KiB, MiB…); KB, MB… = powers of 1000. Case-insensitive.
 */
export function scaleInteger(value: bigint, suffix: string, scale: bigint, limit: bigint): ScaledResult {
  if (suffix.length > 0) {
    let base: bigint;
    const rest = suffix.slice(1);
    if (rest === '' || rest.toLowerCase() === 'ib') base = 1024n;
    else if (rest.toLowerCase() === 'b') base = 1000n;
    else return { ok: false, detail: `invalid argument: unknown suffix '${suffix}'` };
    const power = 'bkmgtpe'.indexOf(suffix[0]!.toLowerCase());
    if (power < 0) return { ok: false, detail: `invalid argument: unknown suffix '${suffix}'` };
    scale = base ** BigInt(power);
  }
  if (value !== 0n && value > limit / scale) {
    return { ok: false, detail: `numerical overflow: value too large: ${value}${suffix}` };
  }
  return { ok: true, value: value * scale };
}

/**
 * virsh's scaled sizes (vol-create-as, vol-resize): a non-negative integer with an optional
 * suffix, bytes by default. `null` detail = virsh prints only "Malformed size X".
 */
export function parseSize(s: string): ScaledResult {
  const r = strtoull(s);
  if (r.overflow || r.end === 0 || s.slice(0, r.end).includes('-')) return { ok: false, detail: null };
  return scaleInteger(r.value, s.slice(r.end), 1n, ULLONG_MAX);
}

/** libvirt's virUUIDParse: 32 hex digits, '-' and ' ' allowed between pairs, blanks around. */
export function parseUuid(s: string): Buffer | null {
  const isHex = (c: string | undefined) => c !== undefined && /^[0-9a-fA-F]$/.test(c);
  let i = 0;
  while (i < s.length && /\s/.test(s[i]!)) i++;
  const out = Buffer.alloc(16);
  for (let n = 0; n < 16;) {
    const c = s[i];
    if (c === undefined) return null;
    if (c === '-' || c === ' ') {
      i++;
      continue;
    }
    if (!isHex(c) || !isHex(s[i + 1])) return null;
    out[n++] = parseInt(s.slice(i, i + 2), 16);
    i += 2;
  }
  while (i < s.length) {
    if (!/\s/.test(s[i]!)) return null;
    i++;
  }
  return out;
}

/** C's `atoi`-free int parse used by a few global options: virStrToLong_i. */
export function parseInt32(s: string): number | null {
  const m = /^[ \t\n\v\f\r]*([+-]?\d+)$/.exec(s);
  if (!m) return null;
  const v = Number(m[1]);
  return v >= -2147483648 && v <= 2147483647 ? v : null;
}
