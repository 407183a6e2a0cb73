// Property tests: any chunk sequence through the pair arrives with identical content
// (data + zero-filled holes), positions add up, and holes are merged on the way.
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { test } from 'node:test';
import fc from 'fast-check';
import type { Chunk } from '../src/chunk.js';
import { Stream, type StreamChannel, createStreamPair } from '../src/stream/index.js';

const chunkArb: fc.Arbitrary<Chunk> = fc.oneof(
  fc.uint8Array({ minLength: 1, maxLength: 3000 }).map((u): Chunk => ({ kind: 'data', bytes: Buffer.from(u) })),
  fc.integer({ min: 1, max: 20_000 }).map((length): Chunk => ({ kind: 'hole', length })),
);

const modes = ['iterator', 'recv', 'recvStopAtHole', 'recvAll', 'sparseRecvAll', 'readableZeros', 'readableChunks'] as const;
type Mode = (typeof modes)[number];

/** What the receiver observed: the content, and (where the mode shows it) the chunk structure. */
interface Received {
  content: Buffer;
  structure?: Chunk[];
}

function materialise(chunks: Chunk[]): Buffer {
  return Buffer.concat(chunks.map((c) => (c.kind === 'data' ? c.bytes : Buffer.alloc(c.length))));
}

/** Adjacent holes merged: what must arrive on a sparse stream read chunk by chunk. */
function mergeHoles(chunks: Chunk[]): Chunk[] {
  const out: Chunk[] = [];
  for (const c of chunks) {
    const last = out.at(-1);
    if (c.kind === 'hole' && last?.kind === 'hole') out[out.length - 1] = { kind: 'hole', length: last.length + c.length };
    else out.push(c);
  }
  return out;
}

async function receive(receiver: Stream, mode: Mode, max: number): Promise<Received> {
  const parts: Buffer[] = [];
  const structure: Chunk[] = [];
  switch (mode) {
    case 'iterator':
      for await (const c of receiver) {
        structure.push(c);
        parts.push(c.kind === 'data' ? c.bytes : Buffer.alloc(c.length));
      }
      return { content: Buffer.concat(parts), structure };
    case 'recv':
      for (let b = await receiver.recv(max); b !== null; b = await receiver.recv(max)) {
        assert.ok(Buffer.isBuffer(b));
        assert.ok(b.length <= max);
        parts.push(Buffer.from(b));
      }
      await receiver.finish();
      return { content: Buffer.concat(parts) };
    case 'recvStopAtHole':
      for (;;) {
        const r = await receiver.recv(max, { stopAtHole: true });
        if (r === null) break;
        if (Buffer.isBuffer(r)) {
          parts.push(r);
          structure.push({ kind: 'data', bytes: r });
        } else {
          const n = await receiver.recvHole();
          assert.equal(n, r.hole);
          parts.push(Buffer.alloc(n));
          structure.push({ kind: 'hole', length: n });
        }
      }
      await receiver.finish();
      // recv(max) may split data chunks: compare the structure with data runs joined.
      return { content: Buffer.concat(parts), structure: joinData(structure) };
    case 'recvAll':
      await receiver.recvAll((b) => { parts.push(Buffer.from(b)); });
      return { content: Buffer.concat(parts) };
    case 'sparseRecvAll':
      await receiver.sparseRecvAll(
        (b) => { parts.push(b); structure.push({ kind: 'data', bytes: b }); },
        (n) => { parts.push(Buffer.alloc(n)); structure.push({ kind: 'hole', length: n }); },
      );
      return { content: Buffer.concat(parts), structure };
    case 'readableZeros':
    case 'readableChunks': {
      const chunks = mode === 'readableChunks';
      await pipeline(receiver.toReadable({ holes: chunks ? 'chunks' : 'zeros' }), new Writable({
        objectMode: chunks,
        write(v: Chunk | Buffer, _encoding, callback) {
          if (Buffer.isBuffer(v)) {
            parts.push(Buffer.from(v));
          } else {
            structure.push(v);
            parts.push(v.kind === 'data' ? v.bytes : Buffer.alloc(v.length));
          }
          callback();
        },
      }));
      return chunks ? { content: Buffer.concat(parts), structure } : { content: Buffer.concat(parts) };
    }
  }
}

function joinData(chunks: Chunk[]): Chunk[] {
  const out: Chunk[] = [];
  for (const c of chunks) {
    const last = out.at(-1);
    if (c.kind === 'data' && last?.kind === 'data') out[out.length - 1] = { kind: 'data', bytes: Buffer.concat([last.bytes, c.bytes]) };
    else out.push(c);
  }
  return out;
}

function shape(chunks: Chunk[]): Array<string | number> {
  return chunks.map((c) => (c.kind === 'data' ? `data:${c.bytes.toString('hex')}` : c.length));
}

test('any chunk sequence through the pair arrives intact, whatever the reader', { timeout: 120_000 }, async () => {
  await fc.assert(fc.asyncProperty(
    fc.array(chunkArb, { maxLength: 30 }),
    fc.boolean(),
    fc.integer({ min: 1, max: 10_000 }),
    fc.constantFrom(...modes),
    fc.integer({ min: 1, max: 5000 }),
    async (input, sparse, highWaterMark, mode, max) => {
      const { sender, receiver } = createStreamPair({ sparse, highWaterMark });
      async function* source(): AsyncGenerator<Chunk> {
        yield* input;
      }
      const [, got] = await Promise.all([sender.sendChunks(source()), receive(receiver, mode, max)]);
      const expected = materialise(input);
      assert.ok(got.content.equals(expected), 'content differs');
      assert.equal(sender.position, expected.length);
      assert.equal(receiver.position, expected.length);
      assert.equal(sender.state, 'finished');
      assert.equal(receiver.state, 'finished');
      if (got.structure !== undefined) {
        if (sparse) {
          // Holes arrive merged and exactly where they were; data is passed through whole.
          const want = mode === 'recvStopAtHole' ? joinData(mergeHoles(input)) : mergeHoles(input);
          assert.deepEqual(shape(got.structure), shape(want));
          if (mode === 'iterator' || mode === 'readableChunks') {
            const sentBuffers = input.flatMap((c) => (c.kind === 'data' ? [c.bytes] : []));
            const gotBuffers = got.structure.flatMap((c) => (c.kind === 'data' ? [c.bytes] : []));
            assert.equal(gotBuffers.length, sentBuffers.length);
            for (const [i, b] of gotBuffers.entries()) assert.equal(b, sentBuffers[i], 'data chunks are the sender\'s buffers, not copies');
          }
        } else {
          assert.ok(got.structure.every((c) => c.kind === 'data'), 'no hole travels on a non-sparse stream');
        }
      }
    },
  ), { numRuns: 300 });
});

test('the channel never sees two holes in a row, and every byte of position is accounted for', { timeout: 120_000 }, async () => {
  type Op = { send: number } | { hole: number };
  const opArb: fc.Arbitrary<Op> = fc.oneof(
    fc.integer({ min: 0, max: 100 }).map((send) => ({ send })),
    fc.integer({ min: 1, max: 1_000_000 }).map((hole) => ({ hole })),
  );
  await fc.assert(fc.asyncProperty(fc.array(opArb, { maxLength: 50 }), async (ops) => {
    const written: Chunk[] = [];
    let finished = 0;
    const channel: StreamChannel = {
      write: async (c) => { written.push(c); },
      finish: async () => { finished++; },
      abort: async () => {},
      pauseIncoming: () => {},
      resumeIncoming: () => {},
    };
    const s = new Stream(channel, { sparse: true });
    let total = 0;
    for (const op of ops) {
      if ('send' in op) {
        await s.send(Buffer.alloc(op.send, 1));
        total += op.send;
      } else {
        await s.sendHole(op.hole);
        total += op.hole;
      }
    }
    await s.finish();
    assert.equal(finished, 1);
    for (let i = 1; i < written.length; i++) {
      assert.ok(!(written[i - 1]!.kind === 'hole' && written[i]!.kind === 'hole'), 'two holes in a row');
    }
    assert.ok(written.every((c) => (c.kind === 'data' ? c.bytes.length > 0 : c.length > 0)), 'no empty packets');
    assert.equal(written.reduce((n, c) => n + (c.kind === 'data' ? c.bytes.length : c.length), 0), total);
    assert.equal(s.position, total);
  }), { numRuns: 300 });
});
