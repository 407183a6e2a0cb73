/**
 * Without koffi (no SEEK_DATA/SEEK_HOLE, no fallocate), files read as all data and holes are
 * written as zeros: the bytes must come out the same.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import fc from 'fast-check';
import { fileChunks, readExtents, writeChunks } from '../src/sparse/index.js';
import * as sys from '../src/io/sys.js';
import {
  allocatedBytes, emptyDir, layoutArb, layoutSize, makeFilledFile, makeImage, randomBytes, scratchDir, sha256, sha256File,
} from './helpers/images.js';

const K = 4096;

describe('sparse without native syscalls', () => {
  let dir = '';
  before(async () => {
    assert.equal(sys.setNativeSyscalls(false), false);
    dir = await scratchDir('/tmp');
  });
  after(async () => {
    sys.setNativeSyscalls(true);
    await fs.rm(dir, { recursive: true, force: true });
  });

  it('SPARSEVIRT_NO_KOFFI=1 turns the native bindings off at load', () => {
    const sysUrl = new URL('../src/io/sys.js', import.meta.url).href;
    const probe = `import(${JSON.stringify(sysUrl)}).then((m) => console.log(m.nativeSyscallsAvailable()))`;
    const run = (env: NodeJS.ProcessEnv): string =>
      execFileSync(process.execPath, ['--input-type=module', '-e', probe], { env, cwd: path.dirname(fileURLToPath(import.meta.url)) }).toString().trim();
    assert.equal(run({ ...process.env, SPARSEVIRT_NO_KOFFI: '1' }), 'false');
    assert.equal(run({ ...process.env, SPARSEVIRT_NO_KOFFI: '' }), 'true');
    assert.equal(sys.nativeSyscallsAvailable(), false, 'and setNativeSyscalls(false) in this process');
  });

  it('maps any file as one data extent', async () => {
    const file = path.join(dir, 'map');
    await makeImage(file, [{ kind: 'hole', length: 3 * K }, { kind: 'data', length: 10 }, { kind: 'hole', length: K }]);
    assert.deepEqual(await readExtents(file), [{ offset: 0, length: 4 * K + 10, kind: 'data' }]);
    assert.deepEqual(await readExtents(file, { detectZeroes: true }), [
      { offset: 0, length: 3 * K, kind: 'hole' },
      { offset: 3 * K, length: K, kind: 'data' },
      { offset: 4 * K, length: 10, kind: 'hole' },
    ]);
  });

  it('property: copies give identical bytes, into new and used targets', async () => {
    let run = 0;
    await fc.assert(
      fc.asyncProperty(layoutArb(), fc.option(fc.integer({ min: 1, max: 1_500_000 })), fc.boolean(), async (layout, prefill, detectZeroes) => {
        const src = path.join(dir, `src${run}`);
        const dst = path.join(dir, `dst${run++}`);
        await makeImage(src, layout, run);
        if (prefill !== null) await makeFilledFile(dst, prefill, run);
        await writeChunks(dst, fileChunks(src, { detectZeroes }));
        const size = layoutSize(layout);
        const kept = prefill !== null && prefill > size ? randomBytes(run, prefill).subarray(size) : Buffer.alloc(0);
        assert.equal(await sha256File(dst), sha256(await fs.readFile(src), kept));
      }).afterEach(() => emptyDir(dir)),
      { numRuns: 40 },
    );
  });

  it('zeroes a hole over old data by writing zeros', async () => {
    const file = path.join(dir, 'old');
    await makeFilledFile(file, 64 * K, 3);
    await writeChunks(file, (async function* () {
      yield { kind: 'hole' as const, length: 10 * K + 1 };
    })());
    assert.equal(await sha256File(file), sha256(Buffer.alloc(10 * K + 1), randomBytes(3, 64 * K).subarray(10 * K + 1)));
  });

  it('still leaves holes past the old end unallocated', async () => {
    const src = path.join(dir, 'holey');
    const dst = path.join(dir, 'holey-copy');
    await makeImage(src, [{ kind: 'data', length: K }, { kind: 'hole', length: 1 << 24 }]);
    await writeChunks(dst, fileChunks(src, { detectZeroes: true }));
    assert.equal(await sha256File(dst), await sha256File(src));
    assert.ok(await allocatedBytes(dst) <= 2 * K);
  });
});
