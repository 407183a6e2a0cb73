/**
 * The secret procedures of the REMOTE program (libvirt's remote_protocol.x): a secret is named
 * on the wire by `remote_nonnull_secret` (uuid, usage type, usage id). Merged into `P` by
 * remote.ts.
 */
import { STRING_MAX } from '../rpc/structs.js';
import { array, fixedOpaque, int, opaque, optional, string, struct, uint, voidCodec, type Codec } from '../xdr/index.js';
import type { Procedure } from './remote.js';

/** REMOTE_SECRET_VALUE_MAX */
export const SECRET_VALUE_MAX = 65536;
/** REMOTE_SECRET_LIST_MAX */
export const SECRET_LIST_MAX = 16384;

const str = string(STRING_MAX);

export const secretRef = struct({ uuid: fixedOpaque(16), usageType: int, usageID: str });
export interface SecretRef { uuid: Buffer; usageType: number; usageID: string }

/**
 * None is marked `writes`: the secret driver refuses a read-only connection itself, with its own
 * error domain (daemon/secrets.ts), as libvirt's secret API does.
 */
function proc<A, R>(num: number, name: string, args: Codec<A>, ret: Codec<R>, extra: { event?: boolean } = {}): Procedure<A, R> {
  return { num, name, args, ret, ...extra };
}

const secretArg = struct({ secret: secretRef });
const secretFlags = struct({ secret: secretRef, flags: uint });
const retSecret = struct({ secret: secretRef });

export const SECRET_PROCEDURES = {
  CONNECT_NUM_OF_SECRETS: proc(139, 'CONNECT_NUM_OF_SECRETS', voidCodec, struct({ num: int })),
  CONNECT_LIST_SECRETS: proc(140, 'CONNECT_LIST_SECRETS', struct({ maxuuids: int }), struct({ uuids: array(str, SECRET_LIST_MAX) })),
  SECRET_LOOKUP_BY_UUID: proc(141, 'SECRET_LOOKUP_BY_UUID', struct({ uuid: fixedOpaque(16) }), retSecret),
  SECRET_DEFINE_XML: proc(142, 'SECRET_DEFINE_XML', struct({ xml: str, flags: uint }), retSecret),
  SECRET_GET_XML_DESC: proc(143, 'SECRET_GET_XML_DESC', secretFlags, struct({ xml: str })),
  SECRET_SET_VALUE: proc(144, 'SECRET_SET_VALUE', struct({ secret: secretRef, value: opaque(SECRET_VALUE_MAX), flags: uint }), voidCodec),
  SECRET_GET_VALUE: proc(145, 'SECRET_GET_VALUE', secretFlags, struct({ value: opaque(SECRET_VALUE_MAX) })),
  SECRET_UNDEFINE: proc(146, 'SECRET_UNDEFINE', secretArg, voidCodec),
  SECRET_LOOKUP_BY_USAGE: proc(147, 'SECRET_LOOKUP_BY_USAGE', struct({ usageType: int, usageID: str }), retSecret),
  CONNECT_LIST_ALL_SECRETS: proc(287, 'CONNECT_LIST_ALL_SECRETS', struct({ needResults: int, flags: uint }),
    struct({ secrets: array(secretRef, SECRET_LIST_MAX), ret: uint })),
  CONNECT_SECRET_EVENT_REGISTER_ANY: proc(380, 'CONNECT_SECRET_EVENT_REGISTER_ANY',
    struct({ eventID: int, secret: optional(secretRef) }), struct({ callbackID: int })),
  CONNECT_SECRET_EVENT_DEREGISTER_ANY: proc(381, 'CONNECT_SECRET_EVENT_DEREGISTER_ANY', struct({ callbackID: int }), voidCodec),
  SECRET_EVENT_LIFECYCLE: proc(382, 'SECRET_EVENT_LIFECYCLE',
    struct({ callbackID: int, secret: secretRef, event: int, detail: int }), voidCodec, { event: true }),
  SECRET_EVENT_VALUE_CHANGED: proc(383, 'SECRET_EVENT_VALUE_CHANGED', struct({ callbackID: int, secret: secretRef }), voidCodec, { event: true }),
} as const;

/** virSecretUsageType */
export const SecretUsage = { NONE: 0, VOLUME: 1, CEPH: 2, ISCSI: 3, TLS: 4, VTPM: 5 } as const;
/** virSecretEventID and virSecretEventLifecycleType. */
export const SecretEventId = { LIFECYCLE: 0, VALUE_CHANGED: 1 } as const;
export const SecretLifecycle = { DEFINED: 0, UNDEFINED: 1 } as const;
/** virConnectListAllSecretsFlags */
export const ListSecretsFlags = { EPHEMERAL: 1, NO_EPHEMERAL: 2, PRIVATE: 4, NO_PRIVATE: 8 } as const;
