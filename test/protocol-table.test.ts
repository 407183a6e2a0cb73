/**
 * The procedure table against an independent transcription of the wire reference
 * (shared/reference/libvirt-protocol.md §6.2; 71-76, 91, 92, 125, 149, 368-373, 380-383, 391 and 403 from
 * libvirt's remote_protocol.x). Every field gets a distinct value, so a swapped field order or a
 * wrong XDR type changes the bytes — the captures cannot catch all of these (e.g. every captured
 * vol-info reply has capacity == allocation, and procedures 81, 85, 90, 91, 165 never appear).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { P, PROCEDURES_BY_NUM } from '../src/protocol/remote.js';
import { decode, encode, XdrWriter } from '../src/xdr/index.js';

type T = 'int' | 'uint' | 'u64' | 'string' | 'optstring' | 'uuid' | 'pool' | 'optpool' | 'vol' | 'int<20>' | 'pool<4096>' | 'vol<16384>'
  | 'string<4096>' | 'string<16384>' | 'secret' | 'optsecret' | 'secret<16384>' | 'opaque';
type Fields = [string, T][];

const pool: [string, T] = ['pool', 'pool'];
const vol: [string, T] = ['vol', 'vol'];
const flags: [string, T] = ['flags', 'uint'];
const secret: [string, T] = ['secret', 'secret'];

const REF: Record<number, [name: string, args: Fields, ret: Fields]> = {
  1: ['CONNECT_OPEN', [['name', 'optstring'], flags], []],
  2: ['CONNECT_CLOSE', [], []],
  3: ['CONNECT_GET_TYPE', [], [['type', 'string']]],
  4: ['CONNECT_GET_VERSION', [], [['hvVer', 'u64']]],
  59: ['CONNECT_GET_HOSTNAME', [], [['hostname', 'string']]],
  60: ['CONNECT_SUPPORTS_FEATURE', [['feature', 'int']], [['supported', 'int']]],
  66: ['AUTH_LIST', [], [['types', 'int<20>']]],
  71: ['CONNECT_NUM_OF_STORAGE_POOLS', [], [['num', 'int']]],
  72: ['CONNECT_LIST_STORAGE_POOLS', [['maxnames', 'int']], [['names', 'string<4096>']]],
  73: ['CONNECT_NUM_OF_DEFINED_STORAGE_POOLS', [], [['num', 'int']]],
  74: ['CONNECT_LIST_DEFINED_STORAGE_POOLS', [['maxnames', 'int']], [['names', 'string<4096>']]],
  75: ['CONNECT_FIND_STORAGE_POOL_SOURCES', [['type', 'string'], ['srcSpec', 'optstring'], flags], [['xml', 'string']]],
  76: ['STORAGE_POOL_CREATE_XML', [['xml', 'string'], flags], [pool]],
  77: ['STORAGE_POOL_DEFINE_XML', [['xml', 'string'], flags], [pool]],
  78: ['STORAGE_POOL_CREATE', [pool, flags], []],
  79: ['STORAGE_POOL_BUILD', [pool, flags], []],
  80: ['STORAGE_POOL_DESTROY', [pool], []],
  81: ['STORAGE_POOL_DELETE', [pool, flags], []],
  82: ['STORAGE_POOL_UNDEFINE', [pool], []],
  83: ['STORAGE_POOL_REFRESH', [pool, flags], []],
  84: ['STORAGE_POOL_LOOKUP_BY_NAME', [['name', 'string']], [pool]],
  85: ['STORAGE_POOL_LOOKUP_BY_UUID', [['uuid', 'uuid']], [pool]],
  86: ['STORAGE_POOL_LOOKUP_BY_VOLUME', [vol], [pool]],
  87: ['STORAGE_POOL_GET_INFO', [pool], [['state', 'int'], ['capacity', 'u64'], ['allocation', 'u64'], ['available', 'u64']]],
  88: ['STORAGE_POOL_GET_XML_DESC', [pool, flags], [['xml', 'string']]],
  89: ['STORAGE_POOL_GET_AUTOSTART', [pool], [['autostart', 'int']]],
  90: ['STORAGE_POOL_SET_AUTOSTART', [pool, ['autostart', 'int']], []],
  91: ['STORAGE_POOL_NUM_OF_VOLUMES', [pool], [['num', 'int']]],
  92: ['STORAGE_POOL_LIST_VOLUMES', [pool, ['maxnames', 'int']], [['names', 'string<16384>']]],
  93: ['STORAGE_VOL_CREATE_XML', [pool, ['xml', 'string'], flags], [vol]],
  94: ['STORAGE_VOL_DELETE', [vol, flags], []],
  95: ['STORAGE_VOL_LOOKUP_BY_NAME', [pool, ['name', 'string']], [vol]],
  96: ['STORAGE_VOL_LOOKUP_BY_KEY', [['key', 'string']], [vol]],
  97: ['STORAGE_VOL_LOOKUP_BY_PATH', [['path', 'string']], [vol]],
  98: ['STORAGE_VOL_GET_INFO', [vol], [['type', 'int'], ['capacity', 'u64'], ['allocation', 'u64']]],
  99: ['STORAGE_VOL_GET_XML_DESC', [vol, flags], [['xml', 'string']]],
  100: ['STORAGE_VOL_GET_PATH', [vol], [['name', 'string']]],
  110: ['CONNECT_GET_URI', [], [['uri', 'string']]],
  125: ['STORAGE_VOL_CREATE_XML_FROM', [pool, ['xml', 'string'], ['clonevol', 'vol'], flags], [vol]],
  // secrets (libvirt's remote_protocol.x: remote_nonnull_secret is uuid, int usageType, string usageID)
  139: ['CONNECT_NUM_OF_SECRETS', [], [['num', 'int']]],
  140: ['CONNECT_LIST_SECRETS', [['maxuuids', 'int']], [['uuids', 'string<16384>']]],
  141: ['SECRET_LOOKUP_BY_UUID', [['uuid', 'uuid']], [secret]],
  142: ['SECRET_DEFINE_XML', [['xml', 'string'], flags], [secret]],
  143: ['SECRET_GET_XML_DESC', [secret, flags], [['xml', 'string']]],
  144: ['SECRET_SET_VALUE', [secret, ['value', 'opaque'], flags], []],
  145: ['SECRET_GET_VALUE', [secret, flags], [['value', 'opaque']]],
  146: ['SECRET_UNDEFINE', [secret], []],
  147: ['SECRET_LOOKUP_BY_USAGE', [['usageType', 'int'], ['usageID', 'string']], [secret]],
  287: ['CONNECT_LIST_ALL_SECRETS', [['needResults', 'int'], flags], [['secrets', 'secret<16384>'], ['ret', 'uint']]],
  149: ['CONNECT_IS_SECURE', [], [['secure', 'int']]],
  154: ['STORAGE_POOL_IS_ACTIVE', [pool], [['active', 'int']]],
  155: ['STORAGE_POOL_IS_PERSISTENT', [pool], [['persistent', 'int']]],
  157: ['CONNECT_GET_LIB_VERSION', [], [['libVer', 'u64']]],
  165: ['STORAGE_VOL_WIPE', [vol, flags], []],
  208: ['STORAGE_VOL_UPLOAD', [vol, ['offset', 'u64'], ['length', 'u64'], flags], []],
  209: ['STORAGE_VOL_DOWNLOAD', [vol, ['offset', 'u64'], ['length', 'u64'], flags], []],
  259: ['STORAGE_VOL_WIPE_PATTERN', [vol, ['algorithm', 'uint'], flags], []],
  260: ['STORAGE_VOL_RESIZE', [vol, ['capacity', 'u64'], flags], []],
  281: ['CONNECT_LIST_ALL_STORAGE_POOLS', [['needResults', 'int'], flags], [['pools', 'pool<4096>'], ['ret', 'uint']]],
  282: ['STORAGE_POOL_LIST_ALL_VOLUMES', [pool, ['needResults', 'int'], flags], [['vols', 'vol<16384>'], ['ret', 'uint']]],
  360: ['CONNECT_REGISTER_CLOSE_CALLBACK', [], []],
  361: ['CONNECT_UNREGISTER_CLOSE_CALLBACK', [], []],
  368: ['CONNECT_STORAGE_POOL_EVENT_REGISTER_ANY', [['eventID', 'int'], ['pool', 'optpool']], [['callbackID', 'int']]],
  369: ['CONNECT_STORAGE_POOL_EVENT_DEREGISTER_ANY', [['callbackID', 'int']], []],
  // events (MESSAGE from the daemon): the message body as `args`
  370: ['STORAGE_POOL_EVENT_LIFECYCLE', [['callbackID', 'int'], pool, ['event', 'int'], ['detail', 'int']], []],
  373: ['STORAGE_POOL_EVENT_REFRESH', [['callbackID', 'int'], pool], []],
  378: ['STORAGE_VOL_GET_INFO_FLAGS', [vol, flags], [['type', 'int'], ['capacity', 'u64'], ['allocation', 'u64']]],
  380: ['CONNECT_SECRET_EVENT_REGISTER_ANY', [['eventID', 'int'], ['secret', 'optsecret']], [['callbackID', 'int']]],
  381: ['CONNECT_SECRET_EVENT_DEREGISTER_ANY', [['callbackID', 'int']], []],
  382: ['SECRET_EVENT_LIFECYCLE', [['callbackID', 'int'], secret, ['event', 'int'], ['detail', 'int']], []],
  383: ['SECRET_EVENT_VALUE_CHANGED', [['callbackID', 'int'], secret], []],
  391: ['STORAGE_POOL_LOOKUP_BY_TARGET_PATH', [['path', 'string']], [pool]],
  403: ['CONNECT_GET_STORAGE_POOL_CAPABILITIES', [flags], [['capabilities', 'string']]],
  // sparsevirt's own (not libvirt's): asked for only after Feature.SPARSEVIRT_CONTENT_DIGEST
  1398145025: ['SPARSEVIRT_VOL_CONTENT_DIGEST', [vol, ['offset', 'u64'], ['length', 'u64'], flags], [['algorithm', 'string'], ['digest', 'string']]],
};

/** A sample value for a field, distinct for every `k`, written by hand into `w`. */
function sample(t: T, k: number, w: XdrWriter): unknown {
  const poolV = (i: number) => {
    const v = { name: `pool-${i}`, uuid: Buffer.alloc(16, i) };
    w.string(v.name).fixedOpaque(v.uuid);
    return v;
  };
  const volV = (i: number) => {
    const v = { pool: `p${i}`, name: `n${i}.img`, key: `/k/${i}` };
    w.string(v.pool).string(v.name).string(v.key);
    return v;
  };
  const secretV = (i: number) => {
    const v = { uuid: Buffer.alloc(16, 0x60 + i), usageType: 2, usageID: `client.u${i}` };
    w.fixedOpaque(v.uuid).int(v.usageType).string(v.usageID);
    return v;
  };
  switch (t) {
    case 'secret': return secretV(k);
    case 'optsecret': w.uint(1); return secretV(k);
    case 'secret<16384>': w.uint(2); return [secretV(k), secretV(k + 50)];
    case 'opaque': { const v = Buffer.from([k, 0, 0xff, k + 1, 7]); w.opaque(v); return v; }
    case 'int': w.int(-1000 - k); return -1000 - k;
    case 'uint': w.uint(0x80000000 + k); return 0x80000000 + k;
    case 'u64': { const v = (1n << 40n) + BigInt(k); w.uhyper(v); return v; }
    case 'string': { const v = `s${k}-é`; w.string(v); return v; }
    case 'optstring': { const v = `o${k}`; w.uint(1).string(v); return v; }
    case 'uuid': { const v = Buffer.alloc(16, 0x40 + k); w.fixedOpaque(v); return v; }
    case 'pool': return poolV(k);
    case 'optpool': w.uint(1); return poolV(k);
    case 'vol': return volV(k);
    case 'int<20>': w.uint(2).int(k).int(k + 1); return [k, k + 1];
    case 'pool<4096>': w.uint(2); return [poolV(k), poolV(k + 50)];
    case 'vol<16384>': w.uint(2); return [volV(k), volV(k + 50)];
    case 'string<4096>':
    case 'string<16384>': w.uint(2).string(`n${k}`).string(`n${k + 50}`); return [`n${k}`, `n${k + 50}`];
  }
}

function check(label: string, codec: { enc: any; dec: any; min: number }, fields: Fields): void {
  const w = new XdrWriter();
  const value: Record<string, unknown> = {};
  fields.forEach(([name, t], i) => { value[name] = sample(t, i + 1, w); });
  const want = Buffer.from(w.view());
  const v = fields.length === 0 ? undefined : value;
  const got = encode(codec, v);
  assert.equal(got.toString('hex'), want.toString('hex'), `${label}: encoding`);
  assert.deepStrictEqual(decode(codec, want, true), v, `${label}: decoding`);
}

test('every table entry has a reference row and vice versa', () => {
  assert.deepEqual([...PROCEDURES_BY_NUM.keys()].sort((a, b) => a - b), Object.keys(REF).map(Number));
});

for (const [num, [name, args, ret]] of Object.entries(REF)) {
  test(`${num} ${name}: args and ret layout`, () => {
    const p = PROCEDURES_BY_NUM.get(Number(num));
    assert.ok(p, `procedure ${num} missing from the table`);
    assert.equal(p.name, name);
    check(`${name} args`, p.args, args);
    check(`${name} ret`, p.ret, ret);
  });
}

test('stream procedures: 208 upload and 209 download, sparse flag bit 0; no other streams', () => {
  for (const p of Object.values(P)) {
    const s = p as { num: number; stream?: string; sparseFlag?: number };
    if (s.num === 208) assert.deepEqual([s.stream, s.sparseFlag], ['upload', 1]);
    else if (s.num === 209) assert.deepEqual([s.stream, s.sparseFlag], ['download', 1]);
    else assert.deepEqual([s.stream, s.sparseFlag], [undefined, undefined], p.name);
  }
});
