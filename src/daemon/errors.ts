/**
 * libvirt's error records as the daemon sends them. Each helper builds the `RemoteError` that
 * libvirtd 9.0 sends in the same situation: same code, domain, message, str1/str2 and int1/int2
 * (checked against the captures in shared/fixtures/libvirt-9.0 and a live libvirtd 9.0), so
 * virsh prints the same text and its name → key → path fallback works.
 */
import util from 'node:util';
import { RemoteError, VIR_DOMAIN, VIR_ERR_CODE } from '../errors.js';

/** virErrorNumber values used here beyond `VIR_ERR_CODE`. */
export const CODE = {
  ...VIR_ERR_CODE,
  XML_ERROR: 27,
  OPERATION_DENIED: 29,
  XML_DETAIL: 35,
  CONFIG_UNSUPPORTED: 67,
} as const;

export const DOMAIN = { ...VIR_DOMAIN, XML: 5 } as const;

/**
 * The message prefix libvirt puts in front of the detail for each code (virErrorMsgStrings,
 * 9.0 wording: `%s`, not `%1$s`). Codes mapped to '%s' print the detail alone.
 */
const FORMATS: Record<number, string> = {
  [CODE.INTERNAL_ERROR]: 'internal error: %s',
  [CODE.NO_SUPPORT]: 'this function is not supported by the connection driver: %s',
  [CODE.INVALID_ARG]: 'invalid argument: %s',
  [CODE.OPERATION_FAILED]: 'operation failed: %s',
  [CODE.XML_ERROR]: 'XML error: %s',
  [CODE.OPERATION_DENIED]: 'operation forbidden: %s',
  [CODE.XML_DETAIL]: '%s',
  [CODE.SYSTEM_ERROR]: '%s',
  [CODE.RPC]: '%s',
  [CODE.NO_STORAGE_POOL]: 'Storage pool not found: %s',
  [CODE.NO_STORAGE_VOL]: 'Storage volume not found: %s',
  [CODE.OPERATION_INVALID]: 'Requested operation is not valid: %s',
  [CODE.CONFIG_UNSUPPORTED]: 'unsupported configuration: %s',
  [CODE.ARGUMENT_UNSUPPORTED]: 'argument unsupported: %s',
  [CODE.OPERATION_UNSUPPORTED]: 'Operation not supported: %s',
  [CODE.STORAGE_POOL_BUILT]: 'Storage pool already built: %s',
  [CODE.STORAGE_VOL_EXIST]: 'storage volume %s exists already',
  [CODE.ACCESS_DENIED]: 'access denied: %s',
};

/** virReportError(code, fmt, …) as libvirt does it: message = format with the detail, str1 = format, str2 = detail. */
export function virError(code: number, domain: number, detail: string): RemoteError {
  // Details echo client input (names, paths): keep them well below the 4 MiB string limit.
  if (detail.length > 65536) detail = `${detail.slice(0, 65536)}…`;
  const format = FORMATS[code] ?? '%s';
  return new RemoteError({
    code, domain, message: format.replace('%s', detail), level: 2,
    str1: format, str2: detail, str3: null, int1: -1, int2: -1,
  });
}

/** A storage-driver error (domain STORAGE). */
export function storageError(code: number, detail: string): RemoteError {
  return virError(code, DOMAIN.STORAGE, detail);
}

/** An RPC-layer error (domain RPC), e.g. "unknown procedure: N". */
export function rpcError(code: number, detail: string): RemoteError {
  return virError(code, DOMAIN.RPC, detail);
}

/** virCheckFlags: `unsupported flags (0x2) in function storageVolDownload` (str1 = function, str2 = "flags", ints 0). */
export function unsupportedFlags(flags: number, fn: string): RemoteError {
  return new RemoteError({
    code: CODE.INVALID_ARG, domain: DOMAIN.STORAGE,
    message: `unsupported flags (0x${(flags >>> 0).toString(16)}) in function ${fn}`, level: 2,
    str1: fn, str2: 'flags', str3: null, int1: 0, int2: 0,
  });
}

/** VIR_EXCLUSIVE_FLAGS_RET: `Flags 'A' and 'B' are mutually exclusive` (no prefix; str1 = function, str2 = "ctl", ints 0). */
export function exclusiveFlags(a: string, b: string, fn: string): RemoteError {
  return new RemoteError({
    code: CODE.INVALID_ARG, domain: DOMAIN.STORAGE,
    message: `Flags '${a}' and '${b}' are mutually exclusive`, level: 2,
    str1: fn, str2: 'ctl', str3: null, int1: 0, int2: 0,
  });
}

/** Throws `unsupportedFlags` when `flags` has a bit outside `allowed`. */
export function checkFlags(flags: number, allowed: number, fn: string): void {
  const extra = (flags & ~allowed) >>> 0;
  if (extra !== 0) throw unsupportedFlags(extra, fn);
}

/** virCheckReadOnlyGoto: code 29 (OPERATION_DENIED), domain STORAGE. */
export function readOnlyError(api: string): RemoteError {
  return storageError(CODE.OPERATION_DENIED, `read only access prevents ${api}`);
}

/** glibc's strerror wording for the errnos a storage daemon meets (Node only knows libuv's). */
const STRERROR: Record<string, string> = {
  EPERM: 'Operation not permitted', ENOENT: 'No such file or directory', EIO: 'Input/output error',
  ENXIO: 'No such device or address', EBADF: 'Bad file descriptor', EAGAIN: 'Resource temporarily unavailable',
  ENOMEM: 'Cannot allocate memory', EACCES: 'Permission denied', EBUSY: 'Device or resource busy',
  EEXIST: 'File exists', EXDEV: 'Invalid cross-device link', ENODEV: 'No such device', ENOTDIR: 'Not a directory',
  EISDIR: 'Is a directory', EINVAL: 'Invalid argument', ENFILE: 'Too many open files in system',
  EMFILE: 'Too many open files', ETXTBSY: 'Text file busy', EFBIG: 'File too large',
  ENOSPC: 'No space left on device', ESPIPE: 'Illegal seek', EROFS: 'Read-only file system',
  ENAMETOOLONG: 'File name too long', ENOSYS: 'Function not implemented', ENOTEMPTY: 'Directory not empty',
  ELOOP: 'Too many levels of symbolic links', EOPNOTSUPP: 'Operation not supported', ENOTSUP: 'Operation not supported',
  EDQUOT: 'Disk quota exceeded', EPIPE: 'Broken pipe',
};

export function strerror(err: unknown): string {
  const e = err as NodeJS.ErrnoException | undefined;
  const code = typeof e?.code === 'string' ? e.code : undefined;
  if (code && STRERROR[code]) return STRERROR[code];
  if (typeof e?.errno === 'number') {
    const entry = util.getSystemErrorMap().get(e.errno < 0 ? e.errno : -e.errno);
    if (entry) return entry[1].charAt(0).toUpperCase() + entry[1].slice(1);
  }
  return e instanceof Error ? e.message : String(err);
}

/** The positive errno of a Node system error, or -1. */
export function errnoOf(err: unknown): number {
  const e = err as NodeJS.ErrnoException | undefined;
  if (typeof e?.errno === 'number') return Math.abs(e.errno);
  const cause = (e as { cause?: unknown } | undefined)?.cause;
  if (cause && cause !== err) return errnoOf(cause);
  return -1;
}

/**
 * virReportSystemError: `"<what>: <strerror>"`, code SYSTEM_ERROR, errno in int1. `domain` is
 * STORAGE for storage operations, STREAMS for stream I/O.
 */
export function systemError(what: string, err: unknown, domain: number = DOMAIN.STORAGE): RemoteError {
  const detail = `${what}: ${strerror(err)}`;
  return new RemoteError({
    code: CODE.SYSTEM_ERROR, domain, message: detail, level: 2,
    str1: '%s', str2: detail, str3: null, int1: errnoOf(err), int2: -1,
  });
}

/** What an upload past its `length` gets, exactly as libvirtd sends it (int1 = ENOSPC). */
export function streamNoSpace(): RemoteError {
  const detail = 'cannot write to stream: No space left on device';
  return new RemoteError({
    code: CODE.SYSTEM_ERROR, domain: DOMAIN.STREAMS, message: detail, level: 2,
    str1: '%s', str2: detail, str3: null, int1: 28, int2: -1,
  });
}

/** Anything a handler threw that is not already a libvirt error: code 1 (internal error). */
export function toRemoteError(err: unknown, domain: number = DOMAIN.RPC): RemoteError {
  if (err instanceof RemoteError) return err;
  const msg = err instanceof Error ? err.message : String(err);
  return virError(CODE.INTERNAL_ERROR, domain, msg);
}
