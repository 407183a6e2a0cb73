/**
 * Memory stays bounded by the configured windows, not by the image size: a regression test for
 * retention on the data path (e.g. racing every pull against one long-lived abort promise kept
 * every chunk of a download alive).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import path from 'node:path';
import type { Chunk } from '../src/chunk.js';
import { writeChunks } from '../src/sparse/index.js';

const MiB = 1 << 20;

test('writeChunks with an AbortSignal keeps memory bounded over 384 MiB of fresh buffers', async () => {
  const dir = mkdtempSync(path.join('/dev/shm', 'sv-mem-'));
  try {
    const total = 384;
    let peak = 0;
    async function* source(): AsyncGenerator<Chunk> {
      for (let i = 0; i < total; i++) {
        // fresh buffers, as the wire delivers them: retention would show up as growth
        const b = Buffer.allocUnsafe(MiB);
        b.fill(i & 0xff);
        if (i % 16 === 0) {
          (globalThis as { gc?: () => void }).gc?.();
          peak = Math.max(peak, process.memoryUsage().arrayBuffers);
        }
        yield { kind: 'data', bytes: b };
      }
    }
    const ac = new AbortController();
    const file = path.join(dir, 'out');
    const r = await writeChunks(file, source(), { signal: ac.signal });
    assert.equal(r.dataBytes, total * MiB);
    // the writer's windows are a few MiB; without GC between samples allow generous slack,
    // far below the 384 MiB that retaining every chunk would cost.
    assert.ok(peak < 160 * MiB, `arrayBuffers peaked at ${Math.round(peak / MiB)} MiB`);
    rmSync(file);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('writeChunks: when the source fails, what it handed over is still written', async () => {
  const dir = mkdtempSync(path.join('/dev/shm', 'sv-srcfail-'));
  try {
    const file = path.join(dir, 'out');
    const { readFileSync } = await import('node:fs');
    async function* source(): AsyncGenerator<Chunk> {
      yield { kind: 'data', bytes: Buffer.alloc(4096, 0xab) };
      yield { kind: 'hole', length: 4096 };
      yield { kind: 'data', bytes: Buffer.alloc(1000, 0xcd) };
      throw new Error('limit reached');
    }
    await assert.rejects(writeChunks(file, source()), /limit reached/);
    const got = readFileSync(file);
    assert.equal(got.length, 9192);
    assert.ok(got.subarray(0, 4096).every((b) => b === 0xab));
    assert.ok(got.subarray(4096, 8192).every((b) => b === 0));
    assert.ok(got.subarray(8192).every((b) => b === 0xcd));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
