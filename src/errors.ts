/**
 * One error base class with stable string codes. Match on `err.code`, never on the message.
 *
 * Local codes (all start with `ERR_`):
 *   ERR_INVALID_ARG        a bad argument from the caller (also: a number past 2^53)
 *   ERR_PROTOCOL           the peer broke the wire protocol (malformed frame, bad length…)
 *   ERR_CONNECTION_CLOSED  the connection went away
 *   ERR_KEEPALIVE_TIMEOUT  the peer stopped answering keepalive pings
 *   ERR_TIMEOUT            a bounded wait expired
 *   ERR_ABORTED            the operation was aborted (AbortSignal or stream abort)
 *   ERR_STREAM_STATE       a stream call out of order (send after finish, …)
 *   ERR_STREAM_NOT_SPARSE  a hole on a stream that was not opened sparse
 *   ERR_SPARSE_UNSUPPORTED the peer rejected the sparse flag
 *   ERR_IO                 a local file operation failed (errno in `cause`)
 *   ERR_XML                malformed XML (`XmlSyntaxError`: the reason, line and column)
 *   ERR_NOT_FOUND, ERR_EXISTS, ERR_ACCESS_DENIED, ERR_UNSUPPORTED
 * Remote errors (`RemoteError`) use libvirt's names, e.g. VIR_ERR_NO_STORAGE_VOL.
 */
export class SparsevirtError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = 'SparsevirtError';
  }
}

export interface RemoteErrorFields {
  code: number;
  domain: number;
  message: string | null;
  level: number;
  str1: string | null;
  str2: string | null;
  str3: string | null;
  int1: number;
  int2: number;
}

/** libvirt virErrorNumber values that matter here, with their libvirt names. */
export const VIR_ERR: Record<number, string> = {
  0: 'VIR_ERR_OK', 1: 'VIR_ERR_INTERNAL_ERROR', 2: 'VIR_ERR_NO_MEMORY', 3: 'VIR_ERR_NO_SUPPORT',
  8: 'VIR_ERR_INVALID_ARG', 9: 'VIR_ERR_OPERATION_FAILED', 38: 'VIR_ERR_SYSTEM_ERROR',
  39: 'VIR_ERR_RPC', 45: 'VIR_ERR_AUTH_FAILED', 46: 'VIR_ERR_INVALID_STORAGE_POOL',
  47: 'VIR_ERR_INVALID_STORAGE_VOL', 49: 'VIR_ERR_NO_STORAGE_POOL', 50: 'VIR_ERR_NO_STORAGE_VOL',
  55: 'VIR_ERR_OPERATION_INVALID', 73: 'VIR_ERR_INVALID_STREAM', 74: 'VIR_ERR_ARGUMENT_UNSUPPORTED',
  76: 'VIR_ERR_STORAGE_POOL_BUILT', 84: 'VIR_ERR_OPERATION_UNSUPPORTED', 88: 'VIR_ERR_ACCESS_DENIED',
  90: 'VIR_ERR_STORAGE_VOL_EXIST',
};

export const VIR_ERR_CODE = {
  INTERNAL_ERROR: 1, NO_SUPPORT: 3, INVALID_ARG: 8, OPERATION_FAILED: 9, SYSTEM_ERROR: 38, RPC: 39,
  AUTH_FAILED: 45, INVALID_STORAGE_POOL: 46, INVALID_STORAGE_VOL: 47, NO_STORAGE_POOL: 49,
  NO_STORAGE_VOL: 50, OPERATION_INVALID: 55, INVALID_STREAM: 73, ARGUMENT_UNSUPPORTED: 74,
  STORAGE_POOL_BUILT: 76, OPERATION_UNSUPPORTED: 84, ACCESS_DENIED: 88, STORAGE_VOL_EXIST: 90,
} as const;

export const VIR_DOMAIN = { NONE: 0, RPC: 7, REMOTE: 13, STORAGE: 18, STREAMS: 38, ACCESS: 55 } as const;

/** An error reported by the peer (libvirtd or sparsevirtd): keeps libvirt's fields. */
export class RemoteError extends SparsevirtError {
  readonly virCode: number;
  readonly domain: number;
  readonly level: number;
  readonly str1: string | null;
  readonly str2: string | null;
  readonly str3: string | null;
  readonly int1: number;
  readonly int2: number;
  constructor(fields: RemoteErrorFields) {
    super(VIR_ERR[fields.code] ?? `VIR_ERR_${fields.code}`, fields.message ?? `remote error code ${fields.code}`);
    this.name = 'RemoteError';
    this.virCode = fields.code;
    this.domain = fields.domain;
    this.level = fields.level;
    this.str1 = fields.str1;
    this.str2 = fields.str2;
    this.str3 = fields.str3;
    this.int1 = fields.int1;
    this.int2 = fields.int2;
  }
  toFields(): RemoteErrorFields {
    return {
      code: this.virCode, domain: this.domain, message: this.message, level: this.level,
      str1: this.str1, str2: this.str2, str3: this.str3, int1: this.int1, int2: this.int2,
    };
  }
}

/** Build the libvirt error fields for a server-side error, as libvirt fills them. */
export function remoteErrorFields(code: number, domain: number, message: string, extra: Partial<RemoteErrorFields> = {}): RemoteErrorFields {
  return { code, domain, message, level: 2, str1: '%s', str2: message, str3: null, int1: -1, int2: -1, ...extra };
}

/** Reject a byte count that is not a non-negative safe integer. */
export function checkByteCount(name: string, v: number): number {
  if (!Number.isSafeInteger(v) || v < 0) {
    throw new SparsevirtError('ERR_INVALID_ARG', `${name} must be a non-negative integer below 2^53, got ${v}`);
  }
  return v;
}

/** Convert an unsigned 64-bit value to a number, refusing anything past 2^53 instead of rounding. */
export function bigToSafe(name: string, v: bigint): number {
  if (v < 0n || v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new SparsevirtError('ERR_INVALID_ARG', `${name} ${v} does not fit in 2^53 (8 PiB)`);
  }
  return Number(v);
}
