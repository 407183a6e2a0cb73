/**
 * Limits and hostile input: frame length words, XDR maxima, truncation, huge array counts,
 * optional discriminants, 64-bit extremes; encoder range checks; parser error/recovery rules.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { performance } from 'node:perf_hooks';
import { FrameParser, ProtocolError } from '../src/rpc/parser.js';
import {
  buildFrame, FRAME_MAX, MessageType, REMOTE_PROGRAM, Status, type Message,
} from '../src/rpc/message.js';
import { remoteErrorCodec, STRING_MAX, streamHoleCodec } from '../src/rpc/structs.js';
import { P } from '../src/protocol/remote.js';
import {
  array, bool, decode, encode, fixedOpaque, hyper, int, opaque, optional, string, struct, uhyper, uint,
  voidCodec, XdrError, XdrReader, XdrWriter, type Codec,
} from '../src/xdr/index.js';
import { spyAllocations } from './protocol-support.js';

const be32 = (...words: number[]): Buffer => {
  const b = Buffer.alloc(words.length * 4);
  for (const [i, w] of words.entries()) b.writeUInt32BE(w >>> 0, i * 4);
  return b;
};
const hdr = { prog: REMOTE_PROGRAM, vers: 1, proc: 66, type: MessageType.CALL, serial: 7, status: Status.OK };

function isProtocolError(e: unknown): boolean {
  return e instanceof ProtocolError && (e as ProtocolError).code === 'ERR_PROTOCOL';
}
function isXdrError(code = 'ERR_PROTOCOL') {
  return (e: unknown) => e instanceof XdrError && (e as XdrError).code === code;
}

describe('frame length word', () => {
  const bad = [0, 1, 4, 24, 27, FRAME_MAX + 1, 0x7fffffff, 0x80000000, 0xffffffff];
  /** Ways to deliver a length word (plus a few following bytes) to the parser. */
  const deliveries: Record<string, (w: Buffer) => Buffer[]> = {
    'one chunk with more bytes': (w) => [Buffer.concat([w, Buffer.alloc(40)])],
    'exactly the 4 bytes': (w) => [w],
    'byte by byte': (w) => [...w].map((b) => Buffer.from([b])),
    'split 3+1 after a whole frame': (w) => [Buffer.concat([buildFrame(hdr), w.subarray(0, 3)]), w.subarray(3)],
  };

  for (const len of bad) {
    for (const [how, pieces] of Object.entries(deliveries)) {
      test(`${len} is refused (${how}) with ProtocolError before any allocation`, () => {
        const p = new FrameParser();
        const seen: Message[] = [];
        const chunks = pieces(be32(len));
        const { error, sizes } = spyAllocations(() => {
          for (const c of chunks) p.push(c, (m) => seen.push(m));
        }, 29);
        assert.ok(isProtocolError(error), `got ${error}`);
        assert.match((error as Error).message, /frame length/);
        assert.deepEqual(sizes, [], 'allocated for a refused frame');
        assert.ok(seen.every((m) => m.proc === 66), 'only the good frame before it');
      });
    }
  }

  test('after a framing error the parser keeps refusing (the stream cannot be resynchronised)', () => {
    const p = new FrameParser();
    let first: unknown;
    try {
      p.push(be32(27, 28, 1, 2, 3, 4, 5), () => assert.fail());
    } catch (e) {
      first = e;
    }
    assert.ok(isProtocolError(first));
    assert.throws(() => p.push(buildFrame(hdr), () => assert.fail('frame after an error')), (e) => e === first);
    assert.throws(() => p.push(Buffer.alloc(0), () => assert.fail()), (e) => e === first);
  });

  test('28 (empty payload) and 33554436 (largest) are accepted; the big one allocates exactly its size', () => {
    const p = new FrameParser();
    const seen: Message[] = [];
    p.push(be32(28, hdr.prog, 1, 66, 0, 7, 0), (m) => seen.push(m));
    assert.equal(seen.length, 1);
    assert.equal(seen[0].payload.length, 0);
    const { error, sizes } = spyAllocations(() => p.push(be32(FRAME_MAX, hdr.prog, 1, 209, 3, 1, 2), () => assert.fail()));
    assert.equal(error, undefined);
    assert.deepEqual(sizes, [FRAME_MAX]);
    assert.equal(p.idle, false);
  });

  test('maxFrame option lowers the limit', () => {
    const p = new FrameParser({ maxFrame: 1000 });
    p.push(be32(1000), () => {});
    const q = new FrameParser({ maxFrame: 1000 });
    assert.throws(() => q.push(be32(1001), () => {}), isProtocolError);
  });
});

describe('FrameParser delivery rules', () => {
  const frames = [1, 2, 3].map((serial) => buildFrame({ ...hdr, serial }, Buffer.from([serial, 0, 0, 0])));

  test('a throwing onMessage loses nothing: the rest is delivered on the next push', () => {
    const p = new FrameParser();
    const seen: number[] = [];
    const bytes = Buffer.concat(frames);
    let boom = true;
    const on = (m: Message) => {
      seen.push(m.serial);
      if (boom && m.serial === 1) throw new Error('handler failed');
    };
    // The chunk holds frames 1, 2 and half of 3.
    const cut = frames[0].length + frames[1].length + 10;
    assert.throws(() => p.push(bytes.subarray(0, cut), on), /handler failed/);
    assert.deepEqual(seen, [1]);
    assert.equal(p.idle, false);
    boom = false;
    p.push(Buffer.alloc(0), on); // an empty push flushes what was kept
    assert.deepEqual(seen, [1, 2]);
    p.push(bytes.subarray(cut), on);
    assert.deepEqual(seen, [1, 2, 3]);
    assert.equal(p.idle, true);
  });

  test('a throwing onMessage on an assembled frame keeps the parser aligned', () => {
    const p = new FrameParser();
    const seen: number[] = [];
    const bytes = Buffer.concat(frames);
    const on = (m: Message) => {
      seen.push(m.serial);
      if (m.serial === 1 && seen.length === 1) throw new Error('once');
    };
    assert.throws(() => {
      for (let i = 0; i < bytes.length; i += 5) p.push(bytes.subarray(i, i + 5), on);
    }, /once/);
    // Frame 1 (32 bytes) completed inside the chunk [30, 35); bytes 32..35 were kept.
    p.push(bytes.subarray(35), on);
    assert.deepEqual(seen, [1, 2, 3]);
  });

  test('payloads of frames inside one chunk are views; frames spanning chunks get their own buffer', () => {
    const bytes = Buffer.from(new ArrayBuffer(96));
    Buffer.concat(frames).copy(bytes);
    const p = new FrameParser();
    const got: Message[] = [];
    p.push(bytes.subarray(0, 50), (m) => got.push(m));
    p.push(bytes.subarray(50), (m) => got.push(m));
    assert.equal(got[0].payload.buffer, bytes.buffer);
    assert.notEqual(got[1].payload.buffer, bytes.buffer);
    assert.deepEqual(got.map((m) => m.payload[0]), [1, 2, 3]);
  });
});

describe('XDR maxima and truncation', () => {
  const cases: [string, Codec<unknown>, Buffer][] = [
    ['string over its max', string(4), be32(5, 0, 0)],
    ['string past the end', string(100), be32(9, 0x61616161, 0x61616161)],
    ['string padding past the end', string(100), Buffer.concat([be32(5), Buffer.from('abcde')])],
    ['opaque over its max', opaque(8), be32(9, 0, 0, 0)],
    ['opaque past the end', opaque(100), be32(8, 1)],
    ['fixed opaque past the end', fixedOpaque(16), be32(1, 2, 3)],
    ['array over its max', array(int, 3), be32(4, 1, 2, 3, 4)],
    ['array past the end', array(int, 10), be32(3, 1, 2)],
    ['int past the end', int, Buffer.from([0, 0, 1])],
    ['hyper past the end', hyper, be32(1)],
    ['uhyper past the end', uhyper, Buffer.alloc(7)],
    ['optional discriminant 2', optional(int), be32(2, 5)],
    ['optional discriminant 2^32-1', optional(string(10)), be32(0xffffffff)],
    ['remote_error with message over REMOTE_STRING_MAX', remoteErrorCodec as Codec<unknown>, be32(1, 7, 1, STRING_MAX + 1)],
    ['remote_error truncated', remoteErrorCodec as Codec<unknown>, be32(1, 7, 0, 2, 0, 0, 0, 0, 0xffffffff)],
    ['stream hole truncated', streamHoleCodec as Codec<unknown>, be32(0, 4096)],
    ['CONNECT_LIST_ALL_STORAGE_POOLS ret over 4096 pools', P.CONNECT_LIST_ALL_STORAGE_POOLS.ret as Codec<unknown>, be32(4097)],
    ['AUTH_LIST ret over 20 types', P.AUTH_LIST.ret as Codec<unknown>, be32(21, ...new Array(21).fill(0))],
    ['CONNECT_OPEN args with a bad optional', P.CONNECT_OPEN.args as Codec<unknown>, be32(3, 0)],
  ];
  for (const [what, codec, bytes] of cases) {
    test(`${what} throws XdrError`, () => {
      assert.throws(() => decode(codec, bytes), isXdrError());
    });
  }

  test('a string at exactly its max decodes', () => {
    assert.equal(decode(string(5), Buffer.concat([be32(5), Buffer.from('abcde\0\0\0')])), 'abcde');
  });

  test('array count 2^32-1 in a tiny payload throws fast, without allocating', () => {
    const shapes: [string, Codec<unknown[]>][] = [
      ['int', array(int, 0xffffffff)],
      ['uuid elements', array(fixedOpaque(16), 0xffffffff)],
      ['optional elements', array(optional(string(10)), 0xffffffff)],
      ['nested arrays', array(array(int, 0xffffffff), 0xffffffff)],
      ['volumes', array(P.STORAGE_POOL_LIST_ALL_VOLUMES.ret, 0xffffffff) as Codec<unknown[]>],
    ];
    for (const [what, codec] of shapes) {
      const before = process.memoryUsage();
      const t0 = performance.now();
      const { error, sizes } = spyAllocations(() => decode(codec, be32(0xffffffff, 0, 0)), 64);
      const ms = performance.now() - t0;
      const after = process.memoryUsage();
      assert.ok(isXdrError()(error), `${what}: ${error}`);
      assert.match((error as Error).message, /larger than the message/);
      assert.deepEqual(sizes, [], what);
      assert.ok(ms < 50, `${what}: took ${ms} ms`);
      assert.ok(after.heapUsed - before.heapUsed < 16 << 20, `${what}: heap grew by ${after.heapUsed - before.heapUsed}`);
    }
  });

  test('the largest count that fits the payload is accepted', () => {
    assert.deepEqual(decode(array(int, 0xffffffff), be32(2, 7, 8)), [7, 8]);
    assert.deepEqual(decode(array(P.CONNECT_LIST_ALL_STORAGE_POOLS.ret, 1), be32(1, 0, 0)), [{ pools: [], ret: 0 }]);
  });

  test('arrays of zero-size elements cannot be declared (XDR has none; the count could not be bounded)', () => {
    for (const c of [voidCodec, struct({}), fixedOpaque(0)] as Codec<unknown>[]) {
      assert.throws(() => array(c, 10), isXdrError('ERR_INVALID_ARG'));
    }
  });

  test('unsigned hyper 2^64-1 and hyper extremes decode exactly as bigint', () => {
    const ff = Buffer.alloc(8, 0xff);
    assert.equal(decode(uhyper, ff), 18446744073709551615n);
    assert.equal(decode(hyper, ff), -1n);
    assert.equal(decode(hyper, Buffer.from('8000000000000000', 'hex')), -(2n ** 63n));
    assert.equal(decode(hyper, Buffer.from('7fffffffffffffff', 'hex')), 2n ** 63n - 1n);
    assert.ok(encode(uhyper, 2n ** 64n - 1n).equals(ff));
    assert.equal(decode(uhyper, encode(uhyper, 2n ** 53n + 1n)), 2n ** 53n + 1n);
    // A hole of 2^63-1 bytes survives the hole codec.
    const hole = { length: 2n ** 63n - 1n, flags: 0 };
    assert.deepEqual(decode(streamHoleCodec, encode(streamHoleCodec, hole), true), hole);
  });

  test('unsigned int and int extremes', () => {
    assert.equal(decode(uint, be32(0xffffffff)), 0xffffffff);
    assert.equal(decode(int, be32(0xffffffff)), -1);
    assert.equal(decode(int, be32(0x80000000)), -0x80000000);
  });

  test('trailing bytes are tolerated (libvirt-quirks trailing-bytes-accepted) unless strict', () => {
    const b = be32(1, 99);
    assert.equal(decode(int, b), 1);
    assert.throws(() => decode(int, b, true), isXdrError());
  });

  test('remote_error with dom and net present decodes (and they are dropped)', () => {
    const w = new XdrWriter();
    w.int(42).int(7).uint(1).string('boom').int(2);
    w.uint(1).string('dom').fixedOpaque(Buffer.alloc(16, 1)).int(3); // dom
    w.uint(0).uint(0).uint(1).string('s3').int(-1).int(0);
    w.uint(1).string('net').fixedOpaque(Buffer.alloc(16, 2)); // net
    const v = decode(remoteErrorCodec, Buffer.from(w.view()), true);
    assert.deepEqual(v, { code: 42, domain: 7, message: 'boom', level: 2, str1: null, str2: null, str3: 's3', int1: -1, int2: 0 });
  });

  test('XdrReader honours start/end', () => {
    const r = new XdrReader(be32(1, 2, 3, 4), 4, 12);
    assert.equal(r.int(), 2);
    assert.equal(r.int(), 3);
    assert.throws(() => r.int(), isXdrError());
  });
});

describe('encoders refuse values their XDR type cannot carry (ERR_INVALID_ARG)', () => {
  const bad: [string, () => unknown][] = [
    ['uint -1', () => encode(uint, -1)],
    ['uint 2^32', () => encode(uint, 2 ** 32)],
    ['uint 1.5', () => encode(uint, 1.5)],
    ['uint NaN', () => encode(uint, NaN)],
    ['int 2^31', () => encode(int, 2 ** 31)],
    ['int -2^31-1', () => encode(int, -(2 ** 31) - 1)],
    ['int 0.5', () => encode(int, 0.5)],
    ['uhyper -1n', () => encode(uhyper, -1n)],
    ['uhyper 2^64', () => encode(uhyper, 2n ** 64n)],
    ['uhyper number 2^53 (past safe)', () => encode(uhyper, 2 ** 53 as unknown as bigint)],
    ['hyper 1.5', () => encode(hyper, 1.5 as unknown as bigint)],
    ['hyper 2^63', () => encode(hyper, 2n ** 63n)],
    ['string over its max', () => encode(string(3), 'abcd')],
    ['multi-byte string over its max in bytes', () => encode(string(3), 'éé')],
    ['opaque over its max', () => encode(opaque(2), Buffer.alloc(3))],
    ['fixed opaque of the wrong size', () => encode(fixedOpaque(16), Buffer.alloc(15))],
    ['array over its max', () => encode(array(int, 1), [1, 2])],
    ['AUTH_LIST ret with 21 types', () => encode(P.AUTH_LIST.ret, { types: new Array(21).fill(0) })],
  ];
  for (const [what, fn] of bad) {
    test(what, () => assert.throws(fn, isXdrError('ERR_INVALID_ARG')));
  }

  test('edge values are accepted', () => {
    assert.ok(encode(uint, 0xffffffff).equals(be32(0xffffffff)));
    assert.ok(encode(int, -(2 ** 31)).equals(be32(0x80000000)));
    assert.ok(encode(uhyper, Number.MAX_SAFE_INTEGER as unknown as bigint).equals(Buffer.from('001fffffffffffff', 'hex')));
    assert.ok(encode(string(3), 'abc').equals(Buffer.concat([be32(3), Buffer.from('abc\0')])));
    assert.ok(encode(bool, true).equals(be32(1)));
  });
});
