/**
 * The CLI's memory stays bounded whatever the image: downloading and uploading 25,000 small
 * extents (each its own batch of packets) must not keep what already went by.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { CLI_MAIN } from './cli-support.js';
import { withShmDaemon } from './helpers/daemon.js';

const KiB = 1024;
const MiB = 1 << 20;

/** Peak RSS (KiB) of a CLI run, by GNU time. */
function peakRss(args: string[]): Promise<{ code: number; kib: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile('/usr/bin/time', ['-f', 'RSS=%M', process.execPath, CLI_MAIN, ...args], { timeout: 120_000 }, (err, _out, stderr) => {
      const m = /RSS=(\d+)/.exec(stderr);
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, kib: m ? Number(m[1]) : -1, stderr });
    });
  });
}

test('CLI download and upload of 25,000 small extents: peak RSS stays under 120 MiB', { timeout: 180_000 }, async (t) => {
  if (!fs.existsSync('/usr/bin/time')) {
    if (process.env.CI) assert.fail('GNU time (/usr/bin/time) is needed');
    t.skip('no /usr/bin/time');
    return;
  }
  await withShmDaemon('svd-cli-mem-', async ({ d, dir, poolDir, pool }) => {
    const img = path.join(poolDir, 'e.img');
    const fd = fs.openSync(img, 'w');
    const page = Buffer.alloc(4 * KiB, 0x5a);
    for (let i = 0; i < 25_000; i++) fs.writeSync(fd, page, 0, page.length, i * 40 * KiB);
    fs.ftruncateSync(fd, 1024 * MiB);
    fs.closeSync(fd);
    await pool.refresh();
    const out = path.join(dir, 'out.img');
    const down = await peakRss(['-q', '-c', d.uri, 'vol-download', '--pool', 'shm', 'e.img', out, '--sparse']);
    assert.equal(down.code, 0, down.stderr);
    assert.ok(down.kib > 0 && down.kib < 120 * 1024, `download peak RSS ${Math.round(down.kib / 1024)} MiB`);
    await pool.createVol({ name: 'up.img', capacity: 1024 * MiB, allocation: 0, format: 'raw' });
    const up = await peakRss(['-q', '-c', d.uri, 'vol-upload', '--pool', 'shm', 'up.img', out, '--sparse']);
    assert.equal(up.code, 0, up.stderr);
    assert.ok(up.kib > 0 && up.kib < 120 * 1024, `upload peak RSS ${Math.round(up.kib / 1024)} MiB`);
  });
});
