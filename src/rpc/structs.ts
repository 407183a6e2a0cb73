/** The RPC framework's own payload structs, the error record and the stream hole, and the record a local error becomes. */
import { RemoteError, remoteErrorFields, VIR_DOMAIN, VIR_ERR_CODE, type RemoteErrorFields, type SparsevirtError } from '../errors.js';
import { fixedOpaque, int, optional, string, struct, uint, hyper, type Codec, XdrReader, XdrWriter } from '../xdr/index.js';

export const STRING_MAX = 4194304;
const remoteString = optional(string(STRING_MAX));
const remoteDomain = optional(struct({ name: string(STRING_MAX), uuid: fixedOpaque(16), id: int }));
const remoteNetwork = optional(struct({ name: string(STRING_MAX), uuid: fixedOpaque(16) }));

/** `remote_error`: sent in REPLY/ERROR and STREAM/ERROR. */
export const remoteErrorCodec: Codec<RemoteErrorFields> = {
  enc(w, v) {
    w.int(v.code).int(v.domain);
    remoteString.enc(w, v.message);
    w.int(v.level);
    w.uint(0); // dom: always absent
    remoteString.enc(w, v.str1);
    remoteString.enc(w, v.str2);
    remoteString.enc(w, v.str3);
    w.int(v.int1).int(v.int2);
    w.uint(0); // net: always absent
  },
  dec(r) {
    const code = r.int();
    const domain = r.int();
    const message = remoteString.dec(r);
    const level = r.int();
    remoteDomain.dec(r);
    const str1 = remoteString.dec(r);
    const str2 = remoteString.dec(r);
    const str3 = remoteString.dec(r);
    const int1 = r.int();
    const int2 = r.int();
    remoteNetwork.dec(r);
    return { code, domain, message, level, str1, str2, str3, int1, int2 };
  },
  min: 44,
};

export function decodeRemoteError(payload: Buffer): RemoteError {
  return new RemoteError(remoteErrorCodec.dec(new XdrReader(payload)));
}

export function encodeRemoteError(fields: RemoteErrorFields): Buffer {
  const w = new XdrWriter(128);
  remoteErrorCodec.enc(w, fields);
  return Buffer.from(w.view());
}

/** `virNetStreamHole`: hyper length; unsigned int flags. */
export const streamHoleCodec = struct({ length: hyper, flags: uint });
/** The size of a STREAM_HOLE payload (`virNetStreamHole`). */
export const STREAM_HOLE_SIZE = 12;

const EIO = 5;

/**
 * The libvirt error record for a local error sent to the peer on a stream: a remote error as it
 * came; a system error as VIR_ERR_SYSTEM_ERROR with its errno; anything else as VIR_ERR_RPC.
 */
export function toRemoteFields(err: Error): RemoteErrorFields {
  // a stream aborted because of a local failure carries that failure as its cause: report the cause.
  while ((err as SparsevirtError).code === 'ERR_ABORTED' && (err as { cause?: unknown }).cause instanceof Error) {
    err = (err as { cause: Error }).cause;
  }
  if (err instanceof RemoteError) return err.toFields();
  const cause = (err as { cause?: { errno?: number; code?: string } }).cause;
  // a system error carries its errno (Node's fs errors as a negative number); one of our own
  // I/O errors without one (a file that shrank under a read) is reported as EIO
  const errno = typeof cause?.errno === 'number' ? Math.abs(cause.errno)
    : (cause as { code?: string } | undefined)?.code === 'ERR_IO' ? EIO : -1;
  if (errno > 0) return remoteErrorFields(VIR_ERR_CODE.SYSTEM_ERROR, VIR_DOMAIN.STREAMS, err.message, { int1: errno });
  return remoteErrorFields(VIR_ERR_CODE.RPC, VIR_DOMAIN.STREAMS, err.message);
}
