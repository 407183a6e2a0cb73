/**
 * What the CLI loads and makes at start-up (dist/bin/sparsevirt.cjs, the bundle as installed): a
 * quiet transfer needs neither node:crypto (content digests) nor node:child_process (the ssh
 * transport), nor the process's stdin and stdout streams; each comes when a command uses it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { CLI_MAIN } from './cli-support.js';
import { withShmDaemon } from './helpers/daemon.js';
import { allocatedBytes, sha256File } from './helpers/images.js';
import { run } from './helpers/run.js';

/** Loaded before the CLI: at exit, which of the watched built-ins were loaded and which streams made. */
const PRELOAD = `'use strict';
const made = { stdin: false, stdout: false };
for (const name of ['stdin', 'stdout']) {
  const d = Object.getOwnPropertyDescriptor(process, name);
  Object.defineProperty(process, name, { configurable: true, enumerable: d.enumerable, get() { made[name] = true; return d.get.call(process); } });
}
process.on('exit', () => {
  const loaded = (m) => process.moduleLoadList.includes('NativeModule ' + m);
  require('node:fs').writeFileSync(process.env.SV_STARTUP_OUT, JSON.stringify({ ...made, crypto: loaded('crypto'), child_process: loaded('child_process') }));
});
`;

interface Startup {
  stdin: boolean;
  stdout: boolean;
  crypto: boolean;
  child_process: boolean;
}

test('a quiet download loads neither node:crypto nor node:child_process and makes neither stdin nor stdout; an ssh URI loads child_process, output makes stdout', { timeout: 120_000 }, async () => {
  await withShmDaemon('sv-startup-', async ({ dir, d, pool }) => {
    const preload = path.join(dir, 'preload.cjs');
    fs.writeFileSync(preload, PRELOAD);
    const report = path.join(dir, 'startup.json');
    const cliRun = async (args: string[]): Promise<{ r: Awaited<ReturnType<typeof run>>; s: Startup }> => {
      fs.rmSync(report, { force: true });
      const r = await run(process.execPath, ['--require', preload, CLI_MAIN, ...args], { env: { ...process.env, SV_STARTUP_OUT: report }, timeoutMs: 60_000 });
      return { r, s: JSON.parse(fs.readFileSync(report, 'utf8')) as Startup };
    };

    // 64 KiB of data at 1 MiB in a 4 MiB volume
    const src = path.join(dir, 'src.img');
    const fd = fs.openSync(src, 'w');
    fs.writeSync(fd, Buffer.alloc(64 << 10, 0x5a), 0, 64 << 10, 1 << 20);
    fs.ftruncateSync(fd, 4 << 20);
    fs.closeSync(fd);
    const vol = await pool.createVol({ name: 'v.img', capacity: 4 << 20, allocation: 0, format: 'raw' });
    await vol.uploadFile(src, { sparse: true });

    const out = path.join(dir, 'out.img');
    const quiet = await cliRun(['-q', '-c', d.uri, 'vol-download', '--pool', 'shm', 'v.img', out, '--sparse']);
    assert.equal(quiet.r.code, 0, quiet.r.stderr);
    assert.equal(await sha256File(out), await sha256File(src));
    const allocated = await allocatedBytes(out);
    assert.ok(allocated <= (64 << 10) + 8192, `${allocated} bytes allocated`);
    assert.deepEqual(quiet.s, { stdin: false, stdout: false, crypto: false, child_process: false });

    const info = await cliRun(['-c', d.uri, 'vol-info', '--pool', 'shm', 'v.img']);
    assert.equal(info.r.code, 0, info.r.stderr);
    assert.match(info.r.stdout, /^Name:\s+v\.img$/m);
    assert.deepEqual(info.s, { stdin: false, stdout: true, crypto: false, child_process: false });

    // nothing listens on port 1: ssh runs and fails (the transport was loaded on demand and works)
    const ssh = await cliRun(['-c', 'qemu+ssh://127.0.0.1:1/system?no_tty=1&no_verify=1&known_hosts=/dev/null', 'pool-list']);
    assert.equal(ssh.r.code, 1);
    assert.match(ssh.r.stderr, /ssh to 127\.0\.0\.1:1 exited with code 255/);
    assert.equal(ssh.s.child_process, true);
    assert.equal(ssh.s.crypto, false);
  });
});
