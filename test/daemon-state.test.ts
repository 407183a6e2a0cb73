/**
 * sparsevirtd's state directory: one daemon per directory (the pid file lock, with and without
 * the native syscalls; a killed daemon's lock does not block a restart), and pool state written
 * by temp file, fsync and rename: a write that fails halfway leaves the previous file intact, and
 * the system calls of a save never open the final file for writing.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { connect } from '../src/client/index.js';
import { RemoteError, SparsevirtError } from '../src/errors.js';
import { startDaemon, type DaemonHandle } from '../src/daemon/index.js';
import { PID_FILE } from '../src/daemon/state.js';
import { setNativeSyscalls } from '../src/io/sys.js';
import { scratchDir } from './helpers/images.js';
import { spawnDaemon, waitUntil, type ChildDaemon } from './long/harness.js';

const MAX_RECORD = 2048;

/** Every file under `dir` with its bytes and inode, for "nothing changed" checks. */
async function snapshot(dir: string): Promise<Map<string, { ino: number; mtimeMs: number; bytes: string }>> {
  const out = new Map<string, { ino: number; mtimeMs: number; bytes: string }>();
  for (const name of (await fsp.readdir(dir)).sort()) {
    const full = path.join(dir, name);
    const st = await fsp.lstat(full);
    if (st.isFile()) out.set(name, { ino: st.ino, mtimeMs: st.mtimeMs, bytes: await fsp.readFile(full, 'latin1') });
  }
  return out;
}

const modes = [
  { name: 'flock', env: {} },
  { name: 'no native syscalls (exclusive create, stale pid check)', env: { SPARSEVIRT_NO_KOFFI: '1' } },
];

describe('one sparsevirtd per state directory', () => {
  let dir: string;
  before(async () => {
    dir = await scratchDir();
  });
  after(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  for (const mode of modes) {
    test(`[${mode.name}] a second daemon on the same state directory is refused, naming the first's pid and the directory; the first's pools are untouched`, async () => {
      const work = path.join(dir, `two-${mode.env.SPARSEVIRT_NO_KOFFI ? 'fallback' : 'flock'}`);
      await fsp.mkdir(work);
      const first = await spawnDaemon({ dir: work, env: mode.env });
      try {
        const c = await connect(first.uri);
        const p = await c.storagePoolDefineDir('keep', path.join(work, 'keep'));
        await p.build();
        await p.create();
        await p.setAutostart(true);
        await c.close();
        const pools = path.join(first.stateDir, 'pools');
        const before = await snapshot(pools);
        assert.deepEqual([...before.keys()], ['default.json', 'keep.json']);
        assert.equal(await fsp.readFile(path.join(first.stateDir, PID_FILE), 'utf8'), `${first.pid}\n`);

        const secondDir = path.join(work, 'second');
        await fsp.mkdir(secondDir);
        const second = await spawnDaemon({ dir: secondDir, stateDir: first.stateDir, env: mode.env, waitReady: false });
        const exit = await Promise.race([second.exited, new Promise<null>((r) => setTimeout(() => r(null), 15_000))]);
        await second.stop(100);
        assert.ok(exit, `the second daemon is still running: ${second.stderr()}`);
        assert.notEqual(exit.code, 0, 'exit status');
        assert.equal(exit.code, 1);
        const err = second.stderr();
        assert.match(err, new RegExp(`in use by another sparsevirtd \\(pid ${first.pid}\\)`));
        assert.ok(err.includes(`'${first.stateDir}'`), `names the state directory: ${err}`);
        assert.doesNotMatch(err, /pool (started|defined)|sparsevirtd started/, 'it did nothing with the state');
        assert.ok(!fs.existsSync(second.socket), 'it never listened');

        assert.deepEqual(await snapshot(pools), before, 'pool files: same bytes, same inodes, same times');
        assert.equal(await fsp.readFile(path.join(first.stateDir, PID_FILE), 'utf8'), `${first.pid}\n`, 'the pid file still names the first');
        assert.ok(first.alive());
        const again = await connect(first.uri);
        assert.equal(await (await again.storagePoolLookupByName('keep')).isActive(), true);
        await again.close();

        // a clean stop lets go: the pid file is removed and the next daemon starts
        await first.stop();
        assert.equal((await first.exited).code, 0);
        assert.ok(!fs.existsSync(path.join(first.stateDir, PID_FILE)), 'pid file removed at a clean stop');
        const third = await spawnDaemon({ dir: secondDir, stateDir: first.stateDir, env: mode.env });
        try {
          assert.equal(await fsp.readFile(path.join(first.stateDir, PID_FILE), 'utf8'), `${third.pid}\n`);
        } finally {
          await third.stop();
        }
      } finally {
        await first.stop();
      }
    });

    test(`[${mode.name}] kill -9, then a restart on the same state directory: the stale lock does not block it`, async () => {
      const work = path.join(dir, `kill-${mode.env.SPARSEVIRT_NO_KOFFI ? 'fallback' : 'flock'}`);
      await fsp.mkdir(work);
      let d: ChildDaemon = await spawnDaemon({ dir: work, env: mode.env });
      try {
        const c = await connect(d.uri);
        const p = await c.storagePoolDefineDir('keep', path.join(work, 'keep'));
        await p.build();
        await p.create();
        await c.close();
        for (let round = 0; round < 2; round++) {
          const killed = d.pid;
          d.signal('SIGKILL');
          assert.equal((await d.exited).signal, 'SIGKILL');
          assert.equal(await fsp.readFile(path.join(d.stateDir, PID_FILE), 'utf8'), `${killed}\n`, 'the killed daemon left its pid file');
          d = await spawnDaemon({ dir: work, env: mode.env });
          assert.equal(await fsp.readFile(path.join(d.stateDir, PID_FILE), 'utf8'), `${d.pid}\n`);
          const c2 = await connect(d.uri);
          assert.equal(await (await c2.storagePoolLookupByName('keep')).isActive(), true, 'the pool came back');
          await c2.close();
        }
      } finally {
        await d.stop();
      }
    });
  }

  test('[no native syscalls] a pid file naming a live process that does not hold it (a recycled pid) is stale', async () => {
    const work = path.join(dir, 'recycled');
    const stateDir = path.join(work, 'state');
    await fsp.mkdir(stateDir, { recursive: true });
    // this test process is alive, and has no such file open
    await fsp.writeFile(path.join(stateDir, PID_FILE), `${process.pid}\n`);
    const d = await spawnDaemon({ dir: work, env: { SPARSEVIRT_NO_KOFFI: '1' } });
    try {
      assert.equal(await fsp.readFile(path.join(stateDir, PID_FILE), 'utf8'), `${d.pid}\n`);
    } finally {
      await d.stop();
    }
  });

  for (const native of [true, false]) {
    test(`in one process (${native ? 'flock' : 'no native syscalls'}): startDaemon twice on one state directory, the second rejects with ERR_EXISTS`, async () => {
      const stateDir = path.join(dir, `inproc-${native}`);
      const was = setNativeSyscalls(native);
      try {
        assert.equal(was, native, 'the mode under test is in force');
        const a = await startDaemon({ stateDir, listen: [`unix:${path.join(dir, `a-${native}.sock`)}`], defaultPool: false, logSink: () => undefined });
        try {
          const second = await startDaemon({ stateDir, listen: [`unix:${path.join(dir, `b-${native}.sock`)}`], defaultPool: false, logSink: () => undefined })
            .then((h): DaemonHandle | Error => h, (e: unknown) => (e instanceof Error ? e : new Error(String(e))));
          if (!(second instanceof Error)) {
            await second.close();
            assert.fail('the second daemon started');
          }
          assert.ok(second instanceof SparsevirtError, String(second));
          assert.equal(second.code, 'ERR_EXISTS');
          assert.match(second.message, new RegExp(`state directory '${stateDir}' is in use by another sparsevirtd \\(pid ${process.pid}\\)`));
          assert.ok(!fs.existsSync(path.join(dir, `b-${native}.sock`)));
          assert.equal(await fsp.readFile(path.join(stateDir, PID_FILE), 'utf8'), `${process.pid}\n`, 'the refused one left the lock alone');
        } finally {
          await a.close();
        }
        assert.ok(!fs.existsSync(path.join(stateDir, PID_FILE)));
        const b = await startDaemon({ stateDir, listen: [`unix:${path.join(dir, `b-${native}.sock`)}`], defaultPool: false, logSink: () => undefined });
        await b.close();
      } finally {
        setNativeSyscalls(true);
      }
    });
  }
});

// ------------------------------------------------------------------ how pool state is written

/** A path 12 components of 250 bytes deep under `base`: its pool record is far past MAX_RECORD. */
function longTarget(base: string): string {
  return path.join(base, ...Array.from({ length: 12 }, (_, i) => `${i}-`.padEnd(250, 'x')));
}

interface Syscall {
  /** Position of the call's start in the trace. */
  at: number;
  name: string;
  args: string;
  result: string;
}

/** strace -f -y output as calls, with `<unfinished ...>` / `<... resumed>` pairs joined. */
function parseTrace(text: string): Syscall[] {
  const out: Syscall[] = [];
  const pending = new Map<string, { at: number; head: string }>();
  const lines = text.split('\n');
  const whole = (at: number, line: string) => {
    const m = /^(\w+)\((.*)\)\s+=\s+(.*)$/s.exec(line);
    if (m) out.push({ at, name: m[1]!, args: m[2]!, result: m[3]! });
  };
  lines.forEach((raw, i) => {
    const m = /^(\d+)\s+(.*)$/.exec(raw);
    if (!m) return;
    const [, pid, line] = m as unknown as [string, string, string];
    const unfinished = /^(.*) <unfinished \.\.\.>$/.exec(line);
    if (unfinished) {
      pending.set(pid, { at: i, head: unfinished[1]! });
      return;
    }
    const resumed = /^<\.\.\. \w+ resumed>(.*)$/.exec(line);
    if (resumed) {
      const p = pending.get(pid);
      pending.delete(pid);
      if (p) whole(p.at, p.head + resumed[1]!);
      return;
    }
    whole(i, line);
  });
  return out.sort((a, b) => a.at - b.at);
}

/** The path strace -y shows for an fd argument (`20</dir/file>`), or null. */
function fdPath(args: string): string | null {
  return /^-?\d+<([^>]*)>/.exec(args)?.[1] ?? null;
}

/** The first quoted path of a call (openat's second argument, rename's first…) and the second. */
function quoted(args: string): string[] {
  return [...args.matchAll(/"((?:[^"\\]|\\.)*)"/g)].map((m) => m[1]!);
}

const WRITE_CALLS = new Set(['write', 'pwrite64', 'writev', 'pwritev', 'pwritev2', 'ftruncate']);
const RENAMES = new Set(['rename', 'renameat', 'renameat2']);

/**
 * Checks that every save of `final` in the trace went by temp file, fsync and rename, and that
 * `final` itself was never opened for writing, written, or truncated. Returns the number of saves.
 */
function checkAtomicSaves(calls: Syscall[], final: string): number {
  const dir = path.dirname(final);
  const touchesFinal = calls.filter((c) => {
    if (c.name === 'openat' || c.name === 'open' || c.name === 'creat') return quoted(c.args).includes(final) && (c.name === 'creat' || /O_WRONLY|O_RDWR|O_TRUNC|O_CREAT|O_APPEND/.test(c.args));
    if (c.name === 'truncate') return quoted(c.args)[0] === final;
    if (WRITE_CALLS.has(c.name)) return fdPath(c.args) === final;
    return false;
  });
  assert.deepEqual(touchesFinal.map((c) => `${c.name}(${c.args.slice(0, 160)})`), [], `${final} is never opened for writing, written or truncated`);
  const renames = calls.filter((c) => RENAMES.has(c.name) && c.result.startsWith('0') && quoted(c.args).at(-1) === final);
  for (const r of renames) {
    const tmp = quoted(r.args)[0]!;
    assert.ok(tmp.startsWith(`${final}.tmp-`), `renamed from a temp file beside it: ${tmp}`);
    const open = calls.find((c) => c.at < r.at && (c.name === 'openat' || c.name === 'open') && quoted(c.args).includes(tmp));
    assert.ok(open && /O_CREAT/.test(open.args) && /O_EXCL/.test(open.args), `${tmp} created exclusively`);
    const writes = calls.filter((c) => c.at < r.at && WRITE_CALLS.has(c.name) && fdPath(c.args) === tmp);
    assert.ok(writes.length > 0, `${tmp} written`);
    const lastWrite = writes.at(-1)!.at;
    const synced = calls.find((c) => c.at > lastWrite && c.at < r.at && (c.name === 'fsync' || c.name === 'fdatasync') && fdPath(c.args) === tmp && c.result.startsWith('0'));
    assert.ok(synced, `${tmp} fsynced after its last write and before the rename`);
    const next = renames.find((x) => x.at > r.at)?.at ?? Infinity;
    const dirSynced = calls.find((c) => c.at > r.at && c.at < next && c.name === 'fsync' && fdPath(c.args) === dir);
    assert.ok(dirSynced, `the directory fsynced after the rename of ${tmp}`);
  }
  return renames.length;
}

describe('pool state is written by temp file, fsync and rename', () => {
  let dir: string;
  before(async () => {
    dir = await scratchDir();
  });
  after(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('a save that fails halfway (file size limit) leaves the previous file intact and no temp file; the client gets the error; a restart loads the old definition', async () => {
    const work = path.join(dir, 'fsize');
    await fsp.mkdir(work);
    // every file the daemon writes stops growing at MAX_RECORD bytes (EFBIG past it)
    let d = await spawnDaemon({ dir: work, fileSizeLimit: MAX_RECORD });
    const file = path.join(d.stateDir, 'pools', 'p.json');
    try {
      const c = await connect(d.uri);
      const p = await c.storagePoolDefineDir('p', path.join(work, 'p'));
      await p.setAutostart(true);
      const before = await fsp.readFile(file, 'utf8');
      assert.ok(before.length < MAX_RECORD / 4 && JSON.parse(before).autostart === true, before);
      const inode = (await fsp.stat(file)).ino;

      const target = longTarget(work);
      const xml = (await p.xmlDesc()).replace(/<path>[^<]*<\/path>/, `<path>${target}</path>`);
      assert.ok(target.length > MAX_RECORD);
      const err = await c.storagePoolDefineXML(xml).then(() => null, (e: unknown) => e);
      assert.ok(err instanceof RemoteError, `the redefinition fails: ${String(err)}`);
      assert.equal(err.virCode, 38, err.message);
      assert.match(err.message, /^cannot save the state of pool 'p' in '.*\/pools': File too large$/);

      assert.equal(await fsp.readFile(file, 'utf8'), before, 'the previous state file, byte for byte');
      assert.equal((await fsp.stat(file)).ino, inode, 'and the same file');
      assert.deepEqual((await fsp.readdir(path.dirname(file))).sort(), ['default.json', 'p.json'], 'no temp file left');
      // the daemon goes on: a save that fits is written
      await c.storagePoolDefineDir('q', path.join(work, 'q'));
      assert.equal(JSON.parse(await fsp.readFile(path.join(path.dirname(file), 'q.json'), 'utf8')).name, 'q');
      await c.close();

      await d.stop();
      d = await spawnDaemon({ dir: work });
      const c2 = await connect(d.uri);
      const xml2 = await (await c2.storagePoolLookupByName('p')).xmlDesc();
      assert.ok(xml2.includes(`<path>${path.join(work, 'p')}</path>`), xml2);
      assert.equal(await (await c2.storagePoolLookupByName('p')).autostart(), true);
      await c2.close();
      assert.doesNotMatch(d.stderr(), /unreadable/);
    } finally {
      await d.stop();
    }
  });

  test('traced system calls: the final file is never opened for writing; each save writes a temp file, fsyncs it, renames it over, fsyncs the directory', async (t) => {
    if (spawnSync('strace', ['-V']).status !== 0) {
      t.skip('strace is not installed');
      return;
    }
    const work = path.join(dir, 'strace');
    await fsp.mkdir(work);
    const d = await spawnDaemon({ dir: work });
    const traceFile = path.join(work, 'trace');
    const tracer = spawn('strace', [
      '-f', '-y', '-s', '64', '-o', traceFile,
      '-e', 'trace=open,openat,creat,write,pwrite64,writev,pwritev,pwritev2,ftruncate,truncate,fsync,fdatasync,rename,renameat,renameat2',
      '-p', String(d.pid),
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
    let tracerErr = '';
    tracer.stderr!.on('data', (b: Buffer) => {
      tracerErr += b.toString();
    });
    const tracerExit = new Promise<number | null>((r) => tracer.once('exit', (code) => r(code)));
    try {
      const attached = await Promise.race([
        waitUntil(() => /attached/.test(tracerErr), 10_000, 'strace to attach').then(() => true),
        tracerExit.then(() => false),
      ]);
      if (!attached) {
        t.skip(`strace cannot trace here: ${tracerErr.trim()}`);
        return;
      }
      const c = await connect(d.uri);
      const p = await c.storagePoolDefineDir('p', path.join(work, 'p')); // a new file
      await p.setAutostart(true); // replaced
      await p.build();
      await p.create(); // replaced (active)
      await c.close();
      tracer.kill('SIGINT');
      await tracerExit;
      const calls = parseTrace(await fsp.readFile(traceFile, 'utf8'));
      const final = path.join(d.stateDir, 'pools', 'p.json');
      const saves = checkAtomicSaves(calls, final);
      assert.equal(saves, 3, 'define, autostart and start each saved the pool once');
      assert.equal(JSON.parse(await fsp.readFile(final, 'utf8')).active, true);
    } finally {
      tracer.kill('SIGKILL');
      await d.stop();
    }
  });
});
