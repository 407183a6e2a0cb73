/**
 * Payload codecs against the libvirt 9.0 captures: every CALL and REPLY/OK of a procedure in
 * the table decodes (strictly: no byte left over) to what the capture tool decoded and
 * re-encodes to the identical bytes; so do error records, hole packets and keepalives.
 * Every frame of every capture must fall into one of the cases below.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  KEEPALIVE_PING, KEEPALIVE_PONG, KEEPALIVE_PROGRAM, KEEPALIVE_VERSION, MessageType, REMOTE_PROGRAM,
  REMOTE_VERSION, Status,
} from '../src/rpc/message.js';
import { decodeRemoteError, encodeRemoteError, remoteErrorCodec, streamHoleCodec } from '../src/rpc/structs.js';
import { P, PROCEDURES_BY_NUM, type Procedure } from '../src/protocol/remote.js';
import { RemoteError, VIR_ERR } from '../src/errors.js';
import { decode, encode, type Codec } from '../src/xdr/index.js';
import {
  captureNames, loadCapture, normaliseOurs, normaliseTheirs, payloadOf, type Capture, type FixtureFrame,
} from './protocol-support.js';

const names = captureNames();
const captures = names.map(loadCapture);

/** Decode strictly, compare with the capture's decoding, re-encode to the same bytes. */
function roundTrip<T>(codec: Codec<T>, payload: Buffer, f: FixtureFrame, label: string): T {
  const v = decode(codec, payload, true);
  const again = encode(codec, v);
  if (!again.equals(payload)) {
    assert.fail(`${label}: frame #${f.index} re-encodes differently\n  wire ${payload.toString('hex')}\n  ours ${again.toString('hex')}`);
  }
  return v;
}

function compareDecoded(ours: unknown, f: FixtureFrame, label: string): void {
  if (f.decoded === undefined) assert.fail(`${label}: frame #${f.index} has a payload but no decoding in frames.json`);
  assert.deepEqual(normaliseOurs(ours), normaliseTheirs(f.decoded), `${label}: frame #${f.index} decoded`);
}

function checkError(c: Capture, f: FixtureFrame, label: string): void {
  const payload = payloadOf(c, f);
  const v = roundTrip(remoteErrorCodec, payload, f, label);
  // The capture tool shows the two unused optional structs; ours drops them (always absent).
  compareDecoded({ error: { ...v, dom: null, net: null } }, f, label);
  assert.ok(encodeRemoteError(v).equals(payload), `${label}: encodeRemoteError`);
  const e = decodeRemoteError(payload);
  assert.ok(e instanceof RemoteError);
  assert.equal(e.virCode, v.code);
  assert.equal(e.code, VIR_ERR[v.code] ?? `VIR_ERR_${v.code}`);
}

type Kind =
  | 'call' | 'reply' | 'reply-error' | 'stream-data' | 'stream-eof' | 'stream-empty-upload' | 'stream-ok' | 'stream-abort'
  | 'stream-error' | 'hole' | 'keepalive' | 'unknown-procedure' | 'unknown-program' | 'bad-version';

interface Tally { kinds: Map<Kind, number>; missing: Map<number, string>; used: Set<number> }

/** Classify and check one frame; throws on anything unexpected. */
function checkFrame(c: Capture, f: FixtureFrame, t: Tally): Kind {
  const label = `${c.name} ${f.direction}`;
  const payload = payloadOf(c, f);

  if (f.prog === KEEPALIVE_PROGRAM) {
    assert.equal(f.vers, KEEPALIVE_VERSION);
    assert.equal(f.type, MessageType.MESSAGE);
    assert.equal(f.status, Status.OK);
    assert.equal(f.serial, 0);
    assert.ok(f.proc === KEEPALIVE_PING || f.proc === KEEPALIVE_PONG, `keepalive proc ${f.proc}`);
    assert.equal(f.proc_name, f.proc === KEEPALIVE_PING ? 'KEEPALIVE.PING' : 'KEEPALIVE.PONG');
    assert.equal(payload.length, 0);
    return 'keepalive';
  }

  // Error records do not depend on the program: check them first.
  if (f.type === MessageType.REPLY && f.status === Status.ERROR) {
    checkError(c, f, label);
    return f.prog !== REMOTE_PROGRAM ? 'unknown-program' : f.vers !== REMOTE_VERSION ? 'bad-version' : 'reply-error';
  }
  if (f.prog !== REMOTE_PROGRAM) {
    assert.equal(f.type, MessageType.CALL, `${label}: frame #${f.index} of program 0x${f.prog.toString(16)}`);
    return 'unknown-program';
  }
  if (f.vers !== REMOTE_VERSION) {
    assert.equal(f.type, MessageType.CALL);
    return 'bad-version';
  }

  const proc: Procedure<any, any> | undefined = PROCEDURES_BY_NUM.get(f.proc);
  t.used.add(f.proc);
  if (!proc) {
    t.missing.set(f.proc, f.proc_name);
    return 'unknown-procedure';
  }
  assert.equal(f.proc_name, `REMOTE.${proc.name}`, `${label}: frame #${f.index} procedure name`);

  switch (f.type) {
    case MessageType.CALL:
    case MessageType.REPLY: {
      assert.equal(f.status, Status.OK);
      const codec = f.type === MessageType.CALL ? proc.args : proc.ret;
      const v = roundTrip(codec, payload, f, `${label} ${proc.name}`);
      if (payload.length === 0) {
        assert.equal(codec.min, 0, `${label}: frame #${f.index} empty payload for a non-void codec`);
        assert.equal(f.decoded, undefined);
      } else {
        compareDecoded(v, f, `${label} ${proc.name}`);
      }
      return f.type === MessageType.CALL ? 'call' : 'reply';
    }
    case MessageType.STREAM: {
      assert.ok(proc.stream, `${label}: STREAM packet for ${proc.name}, which opens no stream`);
      if (f.status === Status.CONTINUE) {
        assert.equal(f.decoded, undefined);
        // Data flows the way the table says.
        const producer = proc.stream === 'upload' ? 'client-to-server' : 'server-to-client';
        assert.equal(f.direction, producer, `${label}: frame #${f.index} data against the stream direction`);
        if (payload.length > 0) return 'stream-data';
        // Empty CONTINUE: EOF of a download; in an upload (raw-zero-data) the server ignores it.
        return proc.stream === 'download' ? 'stream-eof' : 'stream-empty-upload';
      }
      if (f.status === Status.OK) {
        assert.equal(payload.length, 0);
        return 'stream-ok';
      }
      assert.equal(f.status, Status.ERROR);
      if (payload.length === 0) {
        assert.deepEqual(f.decoded, { error: '(empty payload: client abort)' });
        assert.equal(f.direction, 'client-to-server');
        return 'stream-abort';
      }
      checkError(c, f, label);
      return 'stream-error';
    }
    case MessageType.STREAM_HOLE: {
      assert.equal(proc.sparseFlag, 1, `${label}: hole on ${proc.name}`);
      assert.equal(f.status, Status.CONTINUE);
      assert.equal(payload.length, 12);
      const h = roundTrip(streamHoleCodec, payload, f, `${label} hole`);
      assert.equal(typeof h.length, 'bigint');
      assert.deepEqual(normaliseTheirs(f.decoded), { hole_length: Number(h.length), hole_flags: h.flags });
      return 'hole';
    }
    default:
      assert.fail(`${label}: frame #${f.index} of unexpected type ${f.type_name}`);
  }
}

const tally: Tally = { kinds: new Map(), missing: new Map(), used: new Set() };

for (const c of captures) {
  test(`payloads of ${c.name}`, () => {
    for (const f of c.frames) {
      const k = checkFrame(c, f, tally);
      tally.kinds.set(k, (tally.kinds.get(k) ?? 0) + 1);
    }
  });
}

describe('across all captures', () => {
  test('every kind of frame was seen and checked', (t) => {
    const total = captures.reduce((s, c) => s + c.frames.length, 0);
    const counted = [...tally.kinds.values()].reduce((s, n) => s + n, 0);
    assert.equal(counted, total);
    t.diagnostic(`frames by kind: ${JSON.stringify(Object.fromEntries(tally.kinds))}`);
    for (const k of ['call', 'reply', 'reply-error', 'stream-data', 'stream-eof', 'stream-ok', 'stream-abort', 'stream-error', 'hole', 'keepalive'] as Kind[]) {
      assert.ok((tally.kinds.get(k) ?? 0) > 0, `no frame of kind ${k}`);
    }
  });

  test('the only REMOTE procedure missing from the table is the deliberate probe 9999', (t) => {
    t.diagnostic(`procedures used: ${[...tally.used].sort((a, b) => a - b).join(' ')}`);
    t.diagnostic(`missing: ${JSON.stringify(Object.fromEntries(tally.missing))}`);
    assert.deepEqual([...tally.missing.keys()], [9999]);
  });

  test('table entries are keyed by their own number and name', () => {
    for (const [key, p] of Object.entries(P)) {
      assert.equal(p.name, key);
      assert.equal(PROCEDURES_BY_NUM.get(p.num), p);
    }
    assert.equal(PROCEDURES_BY_NUM.size, Object.keys(P).length, 'duplicate procedure numbers');
  });
});

test('decoded opaque values are copies: a pool reference kept by the caller does not pin the frame buffer it came in', () => {
  const pool = { name: 'p', uuid: Buffer.alloc(16, 7) };
  const wire = encode(P.STORAGE_POOL_LOOKUP_BY_NAME.ret, { pool });
  // the frame's bytes sit in a larger shared buffer, as received frames do (read slabs)
  const slab = Buffer.alloc(wire.length + 64);
  wire.copy(slab, 32);
  const got = decode(P.STORAGE_POOL_LOOKUP_BY_NAME.ret, slab.subarray(32, 32 + wire.length)) as { pool: { uuid: Buffer } };
  assert.deepEqual(got.pool.uuid, pool.uuid);
  assert.notEqual(got.pool.uuid.buffer, slab.buffer, 'the UUID is not a view of the frame buffer');
  slab.fill(0);
  assert.deepEqual(got.pool.uuid, pool.uuid, 'the value survives the buffer being reused');
});
