/** Output formats of virsh 9.0: pretty capacities, `%-15s` labels, vsh tables, errno texts. */

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'] as const;

/**
 * `x / 2^shift` printed with `decimals` digits after the point, rounded as glibc's printf rounds
 * the (exact, dyadic) double: to nearest, ties to even.
 */
function fixedDyadic(n: bigint, shift: bigint, decimals: number): string {
  const scale = 10n ** BigInt(decimals);
  const num = n * scale;
  const den = 1n << shift;
  let q = num / den;
  const r2 = (num % den) * 2n;
  if (r2 > den || (r2 === den && q % 2n === 1n)) q += 1n;
  const s = q.toString().padStart(decimals + 1, '0');
  return decimals ? `${s.slice(0, -decimals)}.${s.slice(-decimals)}` : s;
}

/** vshPrettyCapacity + "%.2lf %s": 1048576 → "1.00 MiB", 0 → "0.00 B". */
export function prettyCapacity(bytes: number | bigint): string {
  const n = BigInt(bytes);
  let i = 0;
  while (i < UNITS.length - 1 && n >= 1n << BigInt(10 * (i + 1))) i++;
  return `${fixedDyadic(n, BigInt(10 * i), 2)} ${UNITS[i]}`;
}

/** C's "%-15s %s": virsh's label column. */
export function labelLine(label: string, value: string): string {
  return `${label.padEnd(15)} ${value}\n`;
}

// ------------------------------------------------------------------ vsh tables

/** East Asian wide and fullwidth code points (what glib counts as two columns). */
function isWide(cp: number): boolean {
  return (cp >= 0x1100 && cp <= 0x115f) || (cp >= 0x2e80 && cp <= 0xa4cf && cp !== 0x303f) ||
    (cp >= 0xac00 && cp <= 0xd7a3) || (cp >= 0xf900 && cp <= 0xfaff) || (cp >= 0xfe30 && cp <= 0xfe4f) ||
    (cp >= 0xff00 && cp <= 0xff60) || (cp >= 0xffe0 && cp <= 0xffe6) || (cp >= 0x1f300 && cp <= 0x1f64f) ||
    (cp >= 0x1f900 && cp <= 0x1f9ff) || (cp >= 0x20000 && cp <= 0x3fffd);
}

const isZeroWidth = (cp: number): boolean =>
  (cp >= 0x0300 && cp <= 0x036f) || cp === 0x200b || (cp >= 0x200c && cp <= 0x200f) || (cp >= 0xfe00 && cp <= 0xfe0f);

/** vshTableSafeEncode: control characters (and a literal `\x`) as `\xNN`; the display width. */
export function tableCell(s: string): { text: string; width: number } {
  let text = '';
  let width = 0;
  const chars = Array.from(s);
  for (let i = 0; i < chars.length; i++) {
    const ch = chars[i]!;
    const cp = ch.codePointAt(0)!;
    if ((ch === '\\' && chars[i + 1] === 'x') || cp < 0x20 || cp === 0x7f) {
      text += `\\x${cp.toString(16).padStart(2, '0')}`;
      width += 4;
    } else if ((cp >= 0x80 && cp < 0xa0)) {
      // not printable in a UTF-8 locale: every byte escaped
      for (const b of Buffer.from(ch, 'utf8')) text += `\\x${b.toString(16).padStart(2, '0')}`;
      width += 4 * Buffer.byteLength(ch);
    } else {
      text += ch;
      width += isZeroWidth(cp) ? 0 : isWide(cp) ? 2 : 1;
    }
  }
  return { text, width };
}

/**
 * vshTablePrint: ` cell` per column, padded to the column's width + 2 (not the last one), then a
 * dashed line as wide as all columns + 3 each. Without the header (virsh -q) the widths come
 * from the rows alone.
 */
export function renderTable(headers: readonly string[], rows: readonly (readonly string[])[], header = true): string {
  const all = header ? [headers, ...rows] : rows;
  const cells = all.map((r) => r.map(tableCell));
  const widths = headers.map((_, j) => Math.max(0, ...cells.map((r) => r[j]?.width ?? 0)));
  const line = (r: { text: string; width: number }[]) =>
    r.map((c, j) => (j < r.length - 1 ? ` ${c.text}${' '.repeat(widths[j]! - c.width + 2)}` : ` ${c.text}`)).join('') + '\n';
  let out = '';
  let start = 0;
  if (header) {
    out += line(cells[0]!);
    out += '-'.repeat(widths.reduce((a, w) => a + w + 3, 0)) + '\n';
    start = 1;
  }
  for (let i = start; i < cells.length; i++) out += line(cells[i]!);
  return out;
}

// ------------------------------------------------------------------ enums virsh prints

export const POOL_STATES = ['inactive', 'building', 'running', 'degraded', 'inaccessible'];
export const VOL_TYPES = ['file', 'block', 'dir', 'network', 'netdir', 'ploop'];

export const poolStateName = (s: number): string => POOL_STATES[s] ?? 'unknown';
export const volTypeName = (t: number): string => VOL_TYPES[t] ?? 'unknown';

// ------------------------------------------------------------------ errno → strerror

/** glibc's strerror texts for the errors a transfer or a connection can meet. */
const STRERROR: Record<string, string> = {
  EPERM: 'Operation not permitted', ENOENT: 'No such file or directory', EINTR: 'Interrupted system call',
  EIO: 'Input/output error', ENXIO: 'No such device or address', EBADF: 'Bad file descriptor',
  EAGAIN: 'Resource temporarily unavailable', ENOMEM: 'Cannot allocate memory', EACCES: 'Permission denied',
  EFAULT: 'Bad address', EBUSY: 'Device or resource busy', EEXIST: 'File exists', EXDEV: 'Invalid cross-device link',
  ENODEV: 'No such device', ENOTDIR: 'Not a directory', EISDIR: 'Is a directory', EINVAL: 'Invalid argument',
  ENFILE: 'Too many open files in system', EMFILE: 'Too many open files', ETXTBSY: 'Text file busy',
  EFBIG: 'File too large', ENOSPC: 'No space left on device', ESPIPE: 'Illegal seek', EROFS: 'Read-only file system',
  EMLINK: 'Too many links', EPIPE: 'Broken pipe', ENAMETOOLONG: 'File name too long', ENOSYS: 'Function not implemented',
  ELOOP: 'Too many levels of symbolic links', EOPNOTSUPP: 'Operation not supported', ENOTSUP: 'Operation not supported',
  ENOTSOCK: 'Socket operation on non-socket', EADDRINUSE: 'Address already in use', ENETDOWN: 'Network is down',
  ENETUNREACH: 'Network is unreachable', ECONNABORTED: 'Software caused connection abort',
  ECONNRESET: 'Connection reset by peer', ENOTCONN: 'Transport endpoint is not connected',
  ETIMEDOUT: 'Connection timed out', ECONNREFUSED: 'Connection refused', EHOSTDOWN: 'Host is down',
  EHOSTUNREACH: 'No route to host', EDQUOT: 'Disk quota exceeded', ENOTEMPTY: 'Directory not empty',
  EAI_AGAIN: 'Temporary failure in name resolution', ENOTFOUND: 'Name or service not known',
};

/** The errno name of a Node system error, following `cause` links. */
export function errnoCode(err: unknown): string | undefined {
  for (let e = err, depth = 0; e && typeof e === 'object' && depth < 8; e = (e as { cause?: unknown }).cause, depth++) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === 'string' && /^E[A-Z0-9_]+$/.test(code) && !code.startsWith('ERR_')) return code;
  }
  return undefined;
}

/** strerror(errno) for a Node system error, or its message when the errno is unknown. */
export function strerror(err: unknown): string {
  const code = errnoCode(err);
  if (code && STRERROR[code]) return STRERROR[code]!;
  if (code) return code;
  return err instanceof Error ? err.message : String(err);
}

// ------------------------------------------------------------------ human sizes (progress)

/** Three significant digits in binary units: 512 B, 1.08 GiB, 14.9 GiB, 210 MiB. */
export function humanBytes(n: number): string {
  if (!Number.isFinite(n) || n < 0) n = 0;
  if (n < 1024) return `${Math.round(n)} B`;
  let i = 0;
  let v = n;
  while (v >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i++;
  }
  let s = v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  if (Number(s) >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i++;
    s = v.toFixed(2);
  }
  return `${s} ${UNITS[i]}`;
}

/** Seconds as `0.52 s`, `12.3 s`, `1:05`, `1:02:03`. */
export function humanDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) seconds = 0;
  if (seconds < 10) return `${seconds.toFixed(2)} s`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  return clock(seconds);
}

/** Seconds as m:ss or h:mm:ss (ETA). */
export function clock(seconds: number): string {
  const t = Math.max(0, Math.round(seconds));
  const h = Math.floor(t / 3600);
  const m = Math.floor((t % 3600) / 60);
  const s = t % 60;
  return h ? `${h}:${String(m).padStart(2, '0')}:${String(s).padStart(2, '0')}` : `${m}:${String(s).padStart(2, '0')}`;
}
