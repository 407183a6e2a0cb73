/**
 * The content digest: the same for the same logical content however it is chunked and whether
 * zeros come as holes or data; different for a single changed byte; a sub-range bisection finds
 * the first differing 1 MiB block. Checked against a direct computation over the whole buffer.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import fc from 'fast-check';
import type { Chunk } from '../src/chunk.js';
import { ContentDigest, DIGEST_BLOCK, DIGEST_NAME, DIGEST_PAGE, firstDifferingBlock } from '../src/digest.js';

/** The definition, computed the slow way over the whole content of [offset, offset+len). */
function reference(content: Buffer, offset: number): string {
  const len = content.length;
  const u64 = (n: number) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(BigInt(n));
    return b;
  };
  const outer = createHash('sha256').update(`${DIGEST_NAME}\0`).update(u64(offset)).update(u64(len));
  const end = offset + len;
  const firstBlock = Math.floor(offset / DIGEST_BLOCK);
  const lastBlock = Math.floor((end - 1) / DIGEST_BLOCK);
  for (let blk = firstBlock; len > 0 && blk <= lastBlock; blk++) {
    const h = createHash('sha256');
    let any = false;
    for (let p = 0; p < DIGEST_BLOCK / DIGEST_PAGE; p++) {
      const s = Math.max(blk * DIGEST_BLOCK + p * DIGEST_PAGE, offset);
      const e = Math.min(blk * DIGEST_BLOCK + (p + 1) * DIGEST_PAGE, end);
      if (e <= s) continue;
      const page = content.subarray(s - offset, e - offset);
      if (page.every((x) => x === 0)) continue;
      any = true;
      const idx = Buffer.alloc(2);
      idx.writeUInt16BE(p);
      h.update(idx).update(page);
    }
    if (any) outer.update(u64(blk)).update(h.digest());
  }
  return outer.digest('hex');
}

/** Cut `content` into chunks at `cuts`; zero runs become holes where `holes` says. */
function chunked(content: Buffer, cuts: number[], holes: boolean[]): Chunk[] {
  const points = [...new Set([0, ...cuts.map((c) => c % (content.length + 1)), content.length])].sort((a, b) => a - b);
  const out: Chunk[] = [];
  for (let i = 0; i + 1 < points.length; i++) {
    const piece = content.subarray(points[i]!, points[i + 1]!);
    if (piece.length === 0) continue;
    if (holes[i % holes.length] && piece.every((x) => x === 0)) out.push({ kind: 'hole', length: piece.length });
    else out.push({ kind: 'data', bytes: piece });
  }
  return out;
}

function digestOf(chunks: Chunk[], offset: number, length: number): string {
  const d = new ContentDigest(offset, length);
  for (const c of chunks) d.update(c);
  return d.digest();
}

/** Content with zero runs and data runs at random places, up to 3 MiB. */
const contentArb = fc.array(fc.record({ zero: fc.boolean(), len: fc.integer({ min: 1, max: 300_000 }), seed: fc.integer({ min: 1, max: 255 }) }), { minLength: 1, maxLength: 12 })
  .map((runs) => Buffer.concat(runs.map((r) => (r.zero ? Buffer.alloc(r.len) : Buffer.alloc(r.len, r.seed)))));

test('the digest matches the definition for any chunking, holes or zero data, at any offset', () => {
  fc.assert(fc.property(
    contentArb,
    fc.array(fc.nat(), { maxLength: 30 }),
    fc.array(fc.boolean(), { minLength: 1, maxLength: 5 }),
    fc.integer({ min: 0, max: 3 * DIGEST_BLOCK }),
    (content, cuts, holes, offset) => {
      const want = reference(content, offset);
      assert.equal(digestOf(chunked(content, cuts, holes), offset, content.length), want);
      assert.equal(digestOf([{ kind: 'data', bytes: content }], offset, content.length), want);
    },
  ), { numRuns: 150 });
});

test('holes and zeros digest the same; one changed byte anywhere changes the digest', () => {
  const size = 5 * DIGEST_BLOCK + 1234;
  const a = Buffer.alloc(size);
  a.fill(7, 100_000, 200_000);
  a.fill(9, 3 * DIGEST_BLOCK, 3 * DIGEST_BLOCK + 5000);
  const asHoles: Chunk[] = [
    { kind: 'hole', length: 100_000 }, { kind: 'data', bytes: a.subarray(100_000, 200_000) },
    { kind: 'hole', length: 3 * DIGEST_BLOCK - 200_000 }, { kind: 'data', bytes: a.subarray(3 * DIGEST_BLOCK, 3 * DIGEST_BLOCK + 5000) },
    { kind: 'hole', length: size - 3 * DIGEST_BLOCK - 5000 },
  ];
  const base = digestOf([{ kind: 'data', bytes: a }], 0, size);
  assert.equal(digestOf(asHoles, 0, size), base);
  for (const at of [0, 99_999, 150_000, DIGEST_BLOCK * 2, size - 1]) {
    const b = Buffer.from(a);
    b[at] = b[at]! ^ 0x40;
    assert.notEqual(digestOf([{ kind: 'data', bytes: b }], 0, size), base, `byte ${at}`);
  }
  // the length and the offset are part of it
  assert.notEqual(digestOf([{ kind: 'hole', length: size + 1 }], 0, size + 1), digestOf([{ kind: 'hole', length: size }], 0, size));
  assert.notEqual(digestOf([{ kind: 'hole', length: size }], 4096, size), digestOf([{ kind: 'hole', length: size }], 0, size));
});

test('content past the range, or a digest before the end, is an error', () => {
  const d = new ContentDigest(0, 10);
  assert.throws(() => d.update({ kind: 'data', bytes: Buffer.alloc(11) }), /past the digest's range/);
  d.update({ kind: 'hole', length: 4 });
  assert.throws(() => d.digest(), /after 4/);
});

test('bisection names the first differing 1 MiB block', async () => {
  const size = 37 * DIGEST_BLOCK + 999;
  const src = Buffer.alloc(size, 3);
  for (const bad of [0, 17 * DIGEST_BLOCK + 5, 36 * DIGEST_BLOCK, size - 1]) {
    const dst = Buffer.from(src);
    dst[bad] = 4;
    dst[size - 2] = 5; // a later difference too: the first one is named
    const at = await firstDifferingBlock(0, size, async (side, o, n) => {
      const buf = side === 'source' ? src : dst;
      return digestOf([{ kind: 'data', bytes: buf.subarray(o, o + n) }], o, n);
    });
    assert.equal(at, Math.floor(bad / DIGEST_BLOCK) * DIGEST_BLOCK);
  }
  assert.equal(await firstDifferingBlock(0, size, async (_s, o, n) => digestOf([{ kind: 'data', bytes: src.subarray(o, o + n) }], o, n)), null);
});

test('a range that starts inside a page: a hole crossing that page\'s end leaves the next page to itself', () => {
  const offset = 1.5 * DIGEST_BLOCK - 2;
  const content = Buffer.alloc(3 * DIGEST_PAGE);
  content[5000] = 1;
  const chunks: Chunk[] = [
    { kind: 'data', bytes: content.subarray(0, 1) },
    { kind: 'hole', length: 1 },
    { kind: 'data', bytes: content.subarray(2) },
  ];
  assert.equal(digestOf(chunks, offset, content.length), reference(content, offset));
});
