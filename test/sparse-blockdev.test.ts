/**
 * Block devices, through a loop device over a file in /tmp (needs root and losetup; skipped
 * otherwise): sized from the device, read as all data, holes zeroed in place.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import type { Chunk } from '../src/chunk.js';
import { fileChunks, readExtents, writeChunks } from '../src/sparse/index.js';
import { makeFilledFile, randomBytes, scratchDir, sha256 } from './helpers/images.js';

const DEVICE_SIZE = 4 << 20;

function attachLoop(file: string): string | null {
  try {
    return execFileSync('losetup', ['--find', '--show', file], { stdio: ['ignore', 'pipe', 'ignore'] }).toString().trim();
  } catch {
    return null;
  }
}

async function* chunksOf(...chunks: Chunk[]): AsyncGenerator<Chunk> {
  yield* chunks;
}

describe('sparse on a block device', () => {
  let dir = '';
  let device: string | null = null;
  before(async () => {
    dir = await scratchDir('/tmp');
    const backing = path.join(dir, 'backing');
    await makeFilledFile(backing, DEVICE_SIZE, 5);
    device = attachLoop(backing);
  });
  after(async () => {
    if (device) execFileSync('losetup', ['--detach', device]);
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('reads as one data extent of the device size', async (t) => {
    if (!device) return t.skip('no loop device (needs root and losetup)');
    assert.deepEqual(await readExtents(device), [{ offset: 0, length: DEVICE_SIZE, kind: 'data' }]);
    let bytes = 0;
    for await (const c of fileChunks(device)) {
      assert.equal(c.kind, 'data');
      if (c.kind === 'data') bytes += c.bytes.length;
    }
    assert.equal(bytes, DEVICE_SIZE);
  });

  it('writes data and zeroes holes in place, aligned or not, never resizing', async (t) => {
    if (!device) return t.skip('no loop device (needs root and losetup)');
    const a = randomBytes(6, 1000);
    const holeLength = 300_001; // unaligned both ends: ZERO_RANGE in the middle, zero writes at the edges
    const r = await writeChunks(device, chunksOf({ kind: 'data', bytes: a }, { kind: 'hole', length: holeLength }, { kind: 'data', bytes: a }), { offset: 777, truncate: true });
    assert.deepEqual(r, { dataBytes: 2000, holeBytes: holeLength });
    const end = 777 + 2000 + holeLength;
    const old = randomBytes(5, DEVICE_SIZE);
    const expected = sha256(old.subarray(0, 777), a, Buffer.alloc(holeLength), a, old.subarray(end));
    const fh = await fs.open(device, 'r');
    try {
      const back = Buffer.alloc(DEVICE_SIZE);
      await fh.read(back, 0, DEVICE_SIZE, 0);
      assert.equal(sha256(back), expected);
    } finally {
      await fh.close();
    }
  });

  it('refuses a hole past the end of the device', async (t) => {
    if (!device) return t.skip('no loop device (needs root and losetup)');
    await assert.rejects(writeChunks(device, chunksOf({ kind: 'hole', length: DEVICE_SIZE + 1 })), { code: 'ERR_IO' });
  });
});
