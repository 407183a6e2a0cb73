/**
 * `sparsevirt vol-copy` as a person runs it: between two sparsevirtds and from libvirtd, on a
 * pseudo-terminal (progress bar on) and with --json; --create makes the destination (and removes
 * it when the copy fails); without --create a missing destination starts nothing.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CLI_MAIN, cliRaw, text } from './cli-support.js';
import { addDirPool, startTestDaemon, type TestDaemon } from './helpers/daemon.js';
import { createVolume, requireLibvirt, withScratchPool } from './helpers/libvirt.js';
import { extentMap, fileContentDigest, makeImage, scratchDir, sha256File, type Layout } from './helpers/images.js';
import { barLines, plain, spawnPty } from './helpers/pty.js';

const MiB = 1 << 20;
const SIZE = 128 * MiB;
const LAYOUT: Layout = [
  { kind: 'data', length: 2 * MiB },
  { kind: 'hole', length: 30 * MiB },
  { kind: 'data', length: 6 * MiB + 4096 },
  { kind: 'hole', length: 90 * MiB - 4096 },
];

async function daemonWithPool(dir: string, name: string): Promise<{ d: TestDaemon; poolDir: string }> {
  fs.mkdirSync(path.join(dir, name));
  const d = await startTestDaemon({ dir: path.join(dir, name) });
  const poolDir = path.join(dir, name, 'pool');
  await addDirPool(d.uri, 'p', poolDir);
  return { d, poolDir };
}

test('vol-copy between two sparsevirtds: on a terminal with its progress bar, --create, --verify, --json; a missing destination without --create starts nothing', { timeout: 120_000 }, async () => {
  const dir = await scratchDir('/dev/shm', 'svd-cli-copy-');
  const a = await daemonWithPool(dir, 'a');
  const b = await daemonWithPool(dir, 'b');
  try {
    const src = path.join(a.poolDir, 'disk.img');
    await makeImage(src, LAYOUT);

    // without --create: an error, and nothing is created at the destination
    const missing = await cliRaw(['-c', a.d.uri, 'vol-copy', '--pool', 'p', 'disk.img', '--desturi', b.d.uri, '--sparse']);
    assert.equal(missing.code, 1, text(missing.stderr));
    assert.match(text(missing.stderr), /destination volume 'disk\.img' does not exist in pool 'p' \(add --create/);
    assert.equal(fs.existsSync(path.join(b.poolDir, 'disk.img')), false);

    // on a terminal: the bar is drawn, the copy is verified
    const pty = spawnPty([CLI_MAIN, '-c', a.d.uri, 'vol-copy', '--pool', 'p', 'disk.img', '--desturi', b.d.uri, '--create', '--sparse', '--verify'], { cols: 80 });
    const exit = await pty.exited;
    const out = pty.output();
    assert.deepEqual(exit, { code: 0, signal: null }, plain(out));
    assert.ok(barLines(out).some((l) => /copy/.test(l) && /100%/.test(l)), `a progress bar reaching 100%: ${JSON.stringify(plain(out))}`);
    assert.match(plain(out), new RegExp(`Verified: sha256 content digest ${fileContentDigest(src)}`));
    const dst = path.join(b.poolDir, 'disk.img');
    assert.equal(await sha256File(dst), await sha256File(src));
    assert.deepEqual(await extentMap(dst), await extentMap(src));

    // --json into another name, a range
    const r = await cliRaw(['-c', a.d.uri, 'vol-copy', '--pool', 'p', 'disk.img', '--desturi', b.d.uri, '--dest-vol', 'part.img', '--create',
      '--sparse', '--verify', '--offset', String(MiB), '--length', String(40 * MiB), '--json']);
    assert.equal(r.code, 0, text(r.stderr));
    const j = JSON.parse(text(r.stdout));
    assert.equal(j.created, true);
    assert.equal(j.bytes, 40 * MiB);
    assert.equal(j.data, MiB + 6 * MiB + 4096); // [1, 2) MiB and [32, 38 MiB + 4 KiB) of the source
    assert.match(j.digest, /^[0-9a-f]{64}$/);
    const part = fs.readFileSync(path.join(b.poolDir, 'part.img'));
    const whole = fs.readFileSync(src);
    assert.equal(part.length, SIZE);
    assert.ok(part.subarray(MiB, 41 * MiB).equals(whole.subarray(MiB, 41 * MiB)));
    assert.ok(part.subarray(0, MiB).every((x) => x === 0));
  } finally {
    await a.d.stop();
    await b.d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('vol-copy from libvirtd to sparsevirtd, verified; --create removes the volume it made when the copy fails', { timeout: 120_000 }, async (t) => {
  if (!(await requireLibvirt(t))) return;
  const dir = await scratchDir('/dev/shm', 'svd-cli-copy-lv-');
  const b = await daemonWithPool(dir, 'b');
  try {
    await withScratchPool('clicopy', async (sp) => {
      const srcFile = await createVolume(sp, 'disk.img', SIZE);
      await makeImage(path.join(dir, 'src.img'), LAYOUT);
      fs.copyFileSync(path.join(dir, 'src.img'), srcFile);
      const r = await cliRaw(['-c', sp.uri, 'vol-copy', '--pool', sp.name, 'disk.img', '--desturi', b.d.uri, '--dest-pool', 'p', '--create', '--sparse', '--verify', '--json']);
      assert.equal(r.code, 0, text(r.stderr));
      const dst = path.join(b.poolDir, 'disk.img');
      assert.equal(await sha256File(dst), await sha256File(srcFile));
      assert.deepEqual(await extentMap(dst), await extentMap(srcFile));
      assert.equal(JSON.parse(text(r.stdout)).digest, fileContentDigest(srcFile));

      // a failing copy (a range past the source's end) with --create: the new volume is removed
      const bad = await cliRaw(['-c', sp.uri, 'vol-copy', '--pool', sp.name, 'disk.img', '--desturi', b.d.uri, '--dest-pool', 'p', '--dest-vol', 'gone.img',
        '--create', '--sparse', '--offset', String(SIZE + 1)]);
      assert.equal(bad.code, 1, text(bad.stderr));
      assert.match(text(bad.stderr), /error: cannot copy volume disk\.img/);
      assert.equal(fs.existsSync(path.join(b.poolDir, 'gone.img')), false, 'the volume it created is gone');
    });
  } finally {
    await b.d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
