/**
 * Property tests (fast-check):
 *  - random values of random codec shapes (the combinators the protocol uses: int, uint, bool,
 *    hyper, uhyper, strings with multi-byte UTF-8, opaque with padding, fixed opaque, optionals,
 *    arrays, nested structs) round-trip encode → decode exactly, with 4-byte alignment, and
 *    every truncation of the encoding fails with XdrError;
 *  - random bytes through the FrameParser, in random chunks, either yield exactly the frames a
 *    reference reader finds or throw ProtocolError — never anything else;
 *  - random bytes through every payload codec of the table decode or throw XdrError.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { FrameParser, ProtocolError } from '../src/rpc/parser.js';
import { buildFrame, FRAME_MAX, FRAME_OVERHEAD, type Header, type Message } from '../src/rpc/message.js';
import { remoteErrorCodec, streamHoleCodec } from '../src/rpc/structs.js';
import { P } from '../src/protocol/remote.js';
import {
  array, bool, decode, encode, fixedOpaque, hyper, int, opaque, optional, string, struct, uhyper, uint,
  XdrError, type Codec,
} from '../src/xdr/index.js';

// ---------------------------------------------------------------------------------------
// Random codec shapes

type Shape =
  | { k: 'int' | 'uint' | 'bool' | 'hyper' | 'uhyper' }
  | { k: 'string'; max: number; unit: 'binary' | 'grapheme' | 'binary-ascii' }
  | { k: 'opaque'; max: number }
  | { k: 'fixed'; n: number }
  | { k: 'optional'; of: Shape }
  | { k: 'array'; of: Shape; max: number }
  | { k: 'struct'; fields: Shape[] };

const shapeArb: fc.Arbitrary<Shape> = fc.letrec<{ shape: Shape }>((tie) => ({
  shape: fc.oneof(
    { depthSize: 'small', withCrossShrink: true },
    fc.constantFrom<Shape>({ k: 'int' }, { k: 'uint' }, { k: 'bool' }, { k: 'hyper' }, { k: 'uhyper' }),
    fc.record({
      k: fc.constant('string' as const),
      max: fc.integer({ min: 0, max: 40 }),
      unit: fc.constantFrom('binary' as const, 'grapheme' as const, 'binary-ascii' as const),
    }),
    fc.record({ k: fc.constant('opaque' as const), max: fc.integer({ min: 0, max: 40 }) }),
    fc.record({ k: fc.constant('fixed' as const), n: fc.integer({ min: 1, max: 19 }) }),
    fc.record({ k: fc.constant('optional' as const), of: tie('shape') }),
    fc.record({ k: fc.constant('array' as const), of: tie('shape'), max: fc.integer({ min: 0, max: 6 }) }),
    // XDR structs have at least one member; so every shape has a non-zero size (arrays need that).
    fc.record({ k: fc.constant('struct' as const), fields: fc.array(tie('shape'), { minLength: 1, maxLength: 5 }) }),
  ),
})).shape;

function codecOf(s: Shape): Codec<any> {
  switch (s.k) {
    case 'int': return int;
    case 'uint': return uint;
    case 'bool': return bool;
    case 'hyper': return hyper;
    case 'uhyper': return uhyper;
    case 'string': return string(s.max);
    case 'opaque': return opaque(s.max);
    case 'fixed': return fixedOpaque(s.n);
    case 'optional': return optional(codecOf(s.of));
    case 'array': return array(codecOf(s.of), s.max);
    case 'struct': return struct(Object.fromEntries(s.fields.map((f, i) => [`f${i}`, codecOf(f)])));
  }
}

/** Cut a string to at most `max` UTF-8 bytes on a code point boundary. */
function fitBytes(str: string, max: number): string {
  const cps = [...str];
  while (Buffer.byteLength(cps.join(''), 'utf8') > max) cps.pop();
  return cps.join('');
}

function arbitraryOf(s: Shape): fc.Arbitrary<unknown> {
  switch (s.k) {
    case 'int': return fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 });
    case 'uint': return fc.integer({ min: 0, max: 2 ** 32 - 1 });
    case 'bool': return fc.boolean();
    case 'hyper': return fc.bigInt({ min: -(2n ** 63n), max: 2n ** 63n - 1n });
    case 'uhyper': return fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
    case 'string': return fc.string({ unit: s.unit, maxLength: s.max }).map((x) => fitBytes(x, s.max));
    case 'opaque': return fc.uint8Array({ maxLength: s.max }).map((b) => Buffer.from(b));
    case 'fixed': return fc.uint8Array({ minLength: s.n, maxLength: s.n }).map((b) => Buffer.from(b));
    case 'optional': return fc.option(arbitraryOf(s.of), { nil: null });
    case 'array': return fc.array(arbitraryOf(s.of), { maxLength: s.max });
    case 'struct': return fc.tuple(...s.fields.map(arbitraryOf)).map((vs) => Object.fromEntries(vs.map((v, i) => [`f${i}`, v])));
  }
}

const shapeAndValue = shapeArb.chain((s) => fc.tuple(fc.constant(s), arbitraryOf(s)));

describe('XDR round trip of random shapes', () => {
  test('encode → decode gives the value back; re-encoding gives the same bytes', () => {
    fc.assert(
      fc.property(shapeAndValue, ([s, v]) => {
        const c = codecOf(s);
        const bytes = encode(c, v);
        assert.equal(bytes.length % 4, 0, 'not 4-byte aligned');
        assert.ok(bytes.length >= c.min, `encoded ${bytes.length} bytes, below min ${c.min}`);
        const back = decode(c, bytes, true);
        assert.deepStrictEqual(back, v);
        assert.ok(encode(c, back).equals(bytes));
      }),
      { numRuns: 400 },
    );
  });

  test('every proper prefix of an encoding fails with XdrError', () => {
    fc.assert(
      fc.property(shapeAndValue, fc.nat(), ([s, v], cut) => {
        const c = codecOf(s);
        const bytes = encode(c, v);
        fc.pre(bytes.length > 0);
        const prefix = bytes.subarray(0, cut % bytes.length);
        assert.throws(() => decode(c, prefix), (e) => e instanceof XdrError && e.code === 'ERR_PROTOCOL');
      }),
      { numRuns: 300 },
    );
  });

  test('padding is zero and strings carry multi-byte UTF-8 as is', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 20 }), (str) => {
        const bytes = encode(string(1000), str);
        const n = Buffer.byteLength(str, 'utf8');
        assert.equal(bytes.readUInt32BE(0), n);
        assert.ok(bytes.subarray(4, 4 + n).equals(Buffer.from(str, 'utf8')));
        assert.ok(bytes.subarray(4 + n).every((b) => b === 0));
        assert.equal(bytes.length, 4 + n + ((4 - (n % 4)) % 4));
      }),
    );
  });
});

// ---------------------------------------------------------------------------------------
// Random bytes through the frame parser

/** What a correct reader finds in `bytes`: the frames, and whether it must stop with an error. */
function reference(bytes: Buffer, maxFrame: number): { frames: { header: Header; payload: Buffer }[]; error: boolean } {
  const frames: { header: Header; payload: Buffer }[] = [];
  let pos = 0;
  while (bytes.length - pos >= 4) {
    const len = bytes.readUInt32BE(pos);
    if (len < FRAME_OVERHEAD || len > maxFrame) return { frames, error: true };
    if (bytes.length - pos < len) break;
    const h = (o: number) => bytes.readUInt32BE(pos + o);
    const i = (o: number) => bytes.readInt32BE(pos + o);
    frames.push({
      header: { prog: h(4), vers: h(8), proc: i(12), type: i(16), serial: h(20), status: i(24) },
      payload: bytes.subarray(pos + FRAME_OVERHEAD, pos + len),
    });
    pos += len;
  }
  return { frames, error: false };
}

const headerArb: fc.Arbitrary<Header> = fc.record({
  prog: fc.oneof(fc.constantFrom(0x20008086, 0x6b656570), fc.nat({ max: 0xffffffff })),
  vers: fc.nat({ max: 0xffffffff }),
  proc: fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 }),
  type: fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 }),
  serial: fc.nat({ max: 0xffffffff }),
  status: fc.integer({ min: -(2 ** 31), max: 2 ** 31 - 1 }),
});

/** Byte streams that mix valid frames, bare length words (small, limit-edge, huge) and junk. */
const streamArb = fc
  .array(
    fc.oneof(
      { arbitrary: fc.tuple(headerArb, fc.uint8Array({ maxLength: 300 })).map(([h, p]) => buildFrame(h, p)), weight: 6 },
      {
        arbitrary: fc
          .oneof(fc.nat({ max: 40 }), fc.constantFrom(FRAME_MAX, FRAME_MAX + 1, 0xffffffff), fc.nat({ max: 0xffffffff }))
          .map((n) => { const b = Buffer.alloc(4); b.writeUInt32BE(n); return b; }),
        weight: 1,
      },
      { arbitrary: fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b)), weight: 1 },
    ),
    { maxLength: 12 },
  )
  .map((parts) => Buffer.concat(parts));

function chunksOf(bytes: Buffer, cuts: number[]): Buffer[] {
  const pts = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of [...pts, bytes.length]) {
    out.push(bytes.subarray(prev, p));
    prev = p;
  }
  return out;
}

describe('FrameParser on random bytes', () => {
  for (const maxFrame of [FRAME_MAX, 200]) {
    test(`yields the reference frames or throws ProtocolError (maxFrame ${maxFrame})`, () => {
      fc.assert(
        fc.property(streamArb, fc.array(fc.nat(), { maxLength: 20 }), (bytes, cuts) => {
          const want = reference(bytes, maxFrame);
          const got: Message[] = [];
          const p = new FrameParser({ maxFrame });
          let error: unknown;
          try {
            for (const c of chunksOf(bytes, cuts)) p.push(c, (m) => got.push(m));
          } catch (e) {
            error = e;
          }
          if (error !== undefined && !(error instanceof ProtocolError && error.code === 'ERR_PROTOCOL')) throw error;
          assert.equal(error !== undefined, want.error, `error: ${error}`);
          assert.equal(got.length, want.frames.length);
          got.forEach((m, i) => {
            const { payload, ...h } = m;
            assert.deepEqual(h, want.frames[i].header);
            assert.ok(payload.equals(want.frames[i].payload));
          });
        }),
        { numRuns: 500 },
      );
    });
  }

  test('pure noise never throws anything but ProtocolError', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 512 }), fc.array(fc.nat(), { maxLength: 8 }), (raw, cuts) => {
        const bytes = Buffer.from(raw);
        const p = new FrameParser();
        try {
          for (const c of chunksOf(bytes, cuts)) p.push(c, (m) => assert.equal(m.payload.length >= 0, true));
        } catch (e) {
          if (!(e instanceof ProtocolError)) throw e;
        }
      }),
      { numRuns: 500 },
    );
  });
});

// ---------------------------------------------------------------------------------------
// Random bytes through every payload codec

describe('payload codecs on random bytes', () => {
  const codecs: [string, Codec<unknown>][] = [
    ['remote_error', remoteErrorCodec as Codec<unknown>],
    ['stream hole', streamHoleCodec as Codec<unknown>],
  ];
  for (const p of Object.values(P)) {
    codecs.push([`${p.name} args`, p.args as Codec<unknown>], [`${p.name} ret`, p.ret as Codec<unknown>]);
  }

  test('decode or throw XdrError, nothing else', () => {
    // Bytes biased towards small big-endian words so that lengths and counts are often plausible.
    const word = fc.oneof(fc.nat({ max: 20 }), fc.constantFrom(0xffffffff, 0x80000000, 4194304, 4194305), fc.nat({ max: 0xffffffff }));
    const bytesArb = fc.oneof(
      fc.uint8Array({ maxLength: 200 }).map((b) => Buffer.from(b)),
      fc.array(word, { maxLength: 40 }).map((ws) => {
        const b = Buffer.alloc(ws.length * 4);
        for (const [i, w] of ws.entries()) b.writeUInt32BE(w, i * 4);
        return b;
      }),
    );
    fc.assert(
      fc.property(fc.constantFrom(...codecs), bytesArb, ([, c], bytes) => {
        try {
          decode(c, bytes);
        } catch (e) {
          if (!(e instanceof XdrError && e.code === 'ERR_PROTOCOL')) throw e;
        }
      }),
      { numRuns: 2000 },
    );
  });
});
