/**
 * An RPC call on a connection while one of its streams is open, and nobody reads the stream yet:
 * `vol.info()` right after `vol.download()`, as a progress bar does. libvirtd answers it; so must
 * sparsevirtd, and our client must read the reply past the stream's full window. Then the whole
 * stream arrives intact. The same for an upload that is not being fed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { rm } from 'node:fs/promises';
import { connect, type StorageVol } from '../src/index.js';
import { withShmDaemon } from './helpers/daemon.js';
import { createVolume, requireLibvirt, withScratchPool } from './helpers/libvirt.js';
import { extentMap, makeImage, scratchDir, sha256File, type Layout } from './helpers/images.js';

const MiB = 1 << 20;
/** 40 MiB of data in a 1 GiB image: far more than the stream's window and the socket's buffers. */
const LAYOUT: Layout = [
  { kind: 'data', length: 16 * MiB },
  { kind: 'hole', length: 100 * MiB },
  { kind: 'data', length: 24 * MiB },
  { kind: 'hole', length: 1024 * MiB - 140 * MiB },
];

/** Rejects after `ms`: a call that never settles fails the test instead of hanging it. */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not settle within ${ms} ms`)), ms);
  });
  return Promise.race([p, limit]).finally(() => clearTimeout(timer));
}

async function callsDuringStreams(vol: StorageVol, src: string, dir: string): Promise<void> {
  // Upload: the stream is open and nothing is sent yet; calls go on.
  const up = await vol.upload({ sparse: true });
  const info = await within(vol.info(), 10_000, 'vol.info() during an idle upload');
  assert.equal(info.capacity, 1024 * MiB);
  await within(vol.xmlDesc(), 10_000, 'vol.xmlDesc() during an idle upload');
  const { fileSendBatches } = await import('../src/sparse/index.js');
  await up.sendChunks(fileSendBatches(src, { sparse: true }));

  // Download: the daemon fills the socket and our window while we make calls.
  const down = await vol.download({ sparse: true });
  await new Promise((r) => setTimeout(r, 200)); // let the sender fill every buffer
  for (let i = 0; i < 5; i++) {
    const got = await within(vol.info(), 10_000, `vol.info() #${i + 1} during an unread download`);
    assert.equal(got.capacity, 1024 * MiB);
  }
  const out = path.join(dir, 'out.img');
  const { writeChunks } = await import('../src/sparse/index.js');
  let dataBytes = 0;
  // A call between chunks as well, while the stream is being read.
  let n = 0;
  async function* tap() {
    for await (const c of down) {
      if (c.kind === 'data') dataBytes += c.bytes.length;
      if (++n === 10) await within(vol.info(), 10_000, 'vol.info() while reading a download');
      yield c;
    }
  }
  await within(writeChunks(out, tap(), { truncate: true }), 60_000, 'the download');
  assert.equal(dataBytes, 40 * MiB);
  assert.equal(await sha256File(out), await sha256File(src));
  assert.deepEqual(await extentMap(out), await extentMap(src));
}

test('sparsevirtd: calls while a stream is open and unread, in both directions', { timeout: 120_000 }, async () => {
  await withShmDaemon('svd-calls-', async ({ dir, pool }) => {
    const src = path.join(dir, 'src.img');
    await makeImage(src, LAYOUT);
    const vol = await pool.createVol({ name: 'v.img', capacity: 1024 * MiB, allocation: 0, format: 'raw' });
    await callsDuringStreams(vol, src, dir);
  });
});

test('libvirtd: the same calls while a stream is open and unread', { timeout: 120_000 }, async (t) => {
  if (!(await requireLibvirt(t))) return;
  await withScratchPool('calls', async (sp) => {
    const dir = await scratchDir('/dev/shm', 'svd-calls-lv-');
    try {
      const src = path.join(dir, 'src.img');
      await makeImage(src, LAYOUT);
      await createVolume(sp, 'v.img', 1024 * MiB);
      const conn = await connect(sp.uri);
      try {
        const vol = await (await conn.storagePoolLookupByName(sp.name)).volLookupByName('v.img');
        await callsDuringStreams(vol, src, dir);
      } finally {
        await conn.close();
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
