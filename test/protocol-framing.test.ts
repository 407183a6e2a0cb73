/**
 * Framing against the libvirt 9.0 captures: the FrameParser must yield exactly the frames the
 * capture tool recorded (NAME.frames.json), however the byte stream is cut into chunks, and
 * buildFrame must rebuild every frame byte for byte.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { buildFrame, FRAME_OVERHEAD, type Message } from '../src/rpc/message.js';
import {
  captureNames, DIRECTIONS, framesOf, loadCapture, parseAll, rng, seedFor,
  type Capture, type Direction, type FixtureFrame,
} from './protocol-support.js';

/** Captures up to this size are split at every byte boundary; larger ones are sampled. */
const EXHAUSTIVE_MAX = 8192;
const EDGE = 2048;
const RANDOM_SPLITS = 500;

function headerOf(m: Message) {
  return { prog: m.prog, vers: m.vers, proc: m.proc, type: m.type, serial: m.serial, status: m.status };
}
function expectedHeader(f: FixtureFrame) {
  return { prog: f.prog, vers: f.vers, proc: f.proc, type: f.type, serial: f.serial, status: f.status };
}

/** True when `p` holds bin[off, off+p.length): by identity when it is a view of bin, else by content. */
function samePayload(p: Buffer, bin: Buffer, off: number): boolean {
  if (p.buffer === bin.buffer && p.byteOffset === bin.byteOffset + off) return true;
  return p.equals(bin.subarray(off, off + p.length));
}

function check(got: Message[], want: FixtureFrame[], bin: Buffer, label: string): void {
  if (got.length !== want.length) assert.fail(`${label}: ${got.length} frames, expected ${want.length}`);
  for (let i = 0; i < want.length; i++) {
    const m = got[i];
    const f = want[i];
    const h = headerOf(m);
    const e = expectedHeader(f);
    if (h.prog !== e.prog || h.vers !== e.vers || h.proc !== e.proc || h.type !== e.type || h.serial !== e.serial || h.status !== e.status) {
      assert.deepEqual(h, e, `${label}: header of frame #${f.index}`);
    }
    if (m.payload.length !== f.payload_length) {
      assert.fail(`${label}: frame #${f.index} payload ${m.payload.length} bytes, expected ${f.payload_length}`);
    }
    if (!samePayload(m.payload, bin, f.file_offset + FRAME_OVERHEAD)) {
      assert.fail(`${label}: frame #${f.index} payload bytes differ`);
    }
  }
}

function splitPoints(c: Capture, d: Direction): number[] {
  const n = c.bin[d].length;
  if (n <= EXHAUSTIVE_MAX) return Array.from({ length: n + 1 }, (_, i) => i);
  const pts = new Set<number>();
  for (let i = 0; i <= EDGE; i++) {
    pts.add(i);
    pts.add(n - i);
  }
  const r = rng(seedFor(`${c.name}/${d}/split`));
  while (pts.size < 2 * (EDGE + 1) + RANDOM_SPLITS) pts.add(1 + Math.floor(r() * (n - 1)));
  return [...pts].sort((a, b) => a - b);
}

function* randomPieces(bin: Buffer, seed: number, maxPiece: number): Generator<Buffer> {
  const r = rng(seed);
  let pos = 0;
  while (pos < bin.length) {
    const n = 1 + Math.floor(r() * maxPiece);
    yield bin.subarray(pos, pos + n);
    pos += n;
  }
}

const names = captureNames();

test('fixtures are present (test/fixtures/libvirt-9.0)', () => {
  assert.ok(names.length >= 50, `found only ${names.length} captures`);
});

for (const name of names) {
  describe(`capture ${name}`, () => {
    const c = loadCapture(name);

    test('frames.json is consistent with the .bin files', () => {
      for (const d of DIRECTIONS) {
        let off = 0;
        for (const f of framesOf(c, d)) {
          assert.equal(f.file_offset, off, `frame #${f.index} offset`);
          assert.equal(f.length_word, f.payload_length + FRAME_OVERHEAD, `frame #${f.index} length word`);
          assert.equal(c.bin[d].readUInt32BE(off), f.length_word, `frame #${f.index} length word on the wire`);
          off += f.length_word;
        }
        assert.equal(off, c.bin[d].length, `${d}: frames cover the whole file`);
      }
    });

    for (const d of DIRECTIONS) {
      const want = framesOf(c, d);
      const bin = c.bin[d];

      test(`${d}: whole capture in one chunk`, () => {
        check(parseAll([bin]), want, bin, 'whole');
      });

      test(`${d}: split into two pieces at ${bin.length <= EXHAUSTIVE_MAX ? 'every' : 'sampled'} byte boundar${bin.length <= EXHAUSTIVE_MAX ? 'y' : 'ies'}`, () => {
        for (const k of splitPoints(c, d)) {
          check(parseAll([bin.subarray(0, k), bin.subarray(k)]), want, bin, `split at ${k}`);
        }
      });

      test(`${d}: random pieces of 1..4096 bytes, and single bytes`, () => {
        for (let i = 0; i < 3; i++) {
          const seed = seedFor(`${name}/${d}/pieces/${i}`);
          check(parseAll(randomPieces(bin, seed, 4096)), want, bin, `pieces seed ${seed}`);
        }
        check(parseAll(randomPieces(bin, 1, 1)), want, bin, 'single bytes');
      });

      test(`${d}: buildFrame(header, payload) rebuilds every frame byte for byte`, () => {
        const got = parseAll([bin]);
        for (let i = 0; i < got.length; i++) {
          const f = want[i];
          const rebuilt = buildFrame(headerOf(got[i]), got[i].payload);
          const orig = bin.subarray(f.file_offset, f.file_offset + f.length_word);
          if (!rebuilt.equals(orig)) assert.fail(`frame #${f.index} re-encodes differently`);
        }
      });
    }
  });
}
