/**
 * Load and soak: rounds of 64 concurrent sparse transfers (half uploads, half downloads, one
 * volume each) through one sparsevirtd child process from several client processes, while one
 * slow reader downloads at 64 KiB/s for the whole run with default keepalive settings.
 *
 * Every round checks every result byte for byte, and measures: throughput, how far the least
 * advanced transfer had got when the first one finished (starvation), time to first byte, the
 * daemon's RSS and open file descriptors (leaks). At the end: the slow reader must still be
 * connected and on pace, the daemon alive with no error logged.
 *
 * Run (long form): `node dist/test/long/soak.js [--minutes M] [--transfers N] [--workers W] [--json]`
 * (defaults: 10 minutes, 64 transfers, 4 client processes). The CI short form is
 * test/reliability-load.test.ts (one round, plus a slow reader for a few seconds).
 */
import fsp from 'node:fs/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { connect, type StoragePool } from '../../src/client/index.js';
import { allocatedBytes, makeFilledFile, makeImage, scratchDir, sha256File, type Layout } from '../helpers/images.js';
import { MiB, sleep, spawnDaemon, startWorker, type ChildDaemon, type RunningWorker, type TransferReport, type WorkerTransfer } from './harness.js';

/** Per volume: 3 MiB of data in three runs, 2.5 MiB of holes (a little different for each). */
export function layoutFor(i: number): Layout {
  return [
    { kind: 'data', length: MiB + i * 4096 }, { kind: 'hole', length: MiB },
    { kind: 'data', length: MiB }, { kind: 'hole', length: MiB + 512 * 1024 }, { kind: 'data', length: MiB - i * 4096 },
  ];
}

export interface LoadSet {
  transfers: WorkerTransfer[];
  dataBytes: number;
  poolDir: string;
}

/** Creates `n` volumes in `pool` (at `poolDir`): even ones to upload into (sources in `dir`/src), odd ones to download (to `dir`/out). */
export async function prepareLoad(pool: StoragePool, poolDir: string, dir: string, n: number): Promise<LoadSet> {
  const src = path.join(dir, 'src');
  const out = path.join(dir, 'out');
  await fsp.mkdir(src, { recursive: true });
  await fsp.mkdir(out, { recursive: true });
  const transfers: WorkerTransfer[] = [];
  let dataBytes = 0;
  for (let i = 0; i < n; i++) {
    const layout = layoutFor(i % 32);
    const size = layout.reduce((s, p) => s + p.length, 0);
    dataBytes += layout.filter((p) => p.kind === 'data').reduce((s, p) => s + p.length, 0);
    const name = `v${i}.img`;
    await pool.createVol({ name, capacity: size, allocation: 0 });
    if (i % 2 === 0) {
      await makeImage(path.join(src, name), layout, 100 + i);
      transfers.push({ kind: 'upload', pool: pool.name, vol: name, file: path.join(src, name), sparse: true });
    } else {
      await makeImage(path.join(poolDir, name), layout, 100 + i);
      transfers.push({ kind: 'download', pool: pool.name, vol: name, file: path.join(out, name), sparse: true });
    }
  }
  return { transfers, dataBytes, poolDir };
}

/** Bytes of data `r` had moved at `time` (from its progress samples). */
function doneAt(r: TransferReport, time: number): number {
  let v = 0;
  for (const [t, b] of r.samples) if (t <= time) v = b;
  return v;
}

export interface RoundResult {
  reports: TransferReport[];
  failures: string[];
  mismatches: string[];
  notSparse: string[];
  ms: number;
  firstEndMs: number;
  /** Least fraction of its data any transfer had moved when the first one finished (sensitive to late starts). */
  slowestAtFirstEnd: number;
  /**
   * Starvation: the lowest throughput of a transfer while it was moving (first byte to end),
   * relative to the median one. Fair service keeps it near 1; a starved stream drives it to 0.
   */
  minRateRatio: number;
  maxTimeToFirstByte: number;
  peakRss: number;
}

/** One round: all transfers at once from `workers` processes (`connections` each), then every result checked. */
export async function runRound(d: ChildDaemon, set: LoadSet, workers: number, connections = 4): Promise<RoundResult> {
  for (const t of set.transfers) if (t.kind === 'download') await fsp.rm(t.file, { force: true });
  const startAt = Date.now() + 1500;
  const running: RunningWorker[] = Array.from({ length: workers }, (_, w) => startWorker({
    op: 'batch', uri: d.uri, connections, startAt, transfers: set.transfers.filter((_, i) => i % workers === w),
  }));
  let peakRss = 0;
  const sampler = setInterval(() => {
    try {
      peakRss = Math.max(peakRss, d.mem().rss);
    } catch {
      // gone
    }
  }, 50);
  const failures: string[] = [];
  let reports: TransferReport[] = [];
  try {
    const done = await Promise.all(running.map((w) => w.waitLine((l) => l.event === 'done' || l.event === 'error', 120000)));
    for (const l of done) {
      if (l.event !== 'done') failures.push(`worker: ${JSON.stringify(l)}`);
      else reports.push(...(l.reports as TransferReport[]));
    }
  } finally {
    clearInterval(sampler);
    await Promise.all(running.map((w) => w.exited));
  }
  reports = reports.filter((r) => {
    if (!r.ok) failures.push(`${r.kind} ${r.vol}: ${r.error}`);
    return true;
  });
  const mismatches: string[] = [];
  const notSparse: string[] = [];
  for (const t of set.transfers) {
    const a = t.kind === 'upload' ? t.file : path.join(set.poolDir, t.vol);
    const b = t.kind === 'upload' ? path.join(set.poolDir, t.vol) : t.file;
    if (await sha256File(b).catch(() => 'missing') !== await sha256File(a)) mismatches.push(`${t.kind} ${t.vol}`);
    else if (await allocatedBytes(b) > 3 * MiB + 64 * 1024) notSparse.push(`${t.kind} ${t.vol}`);
  }
  const ok = reports.filter((r) => r.ok);
  const start = Math.min(...reports.map((r) => r.start));
  const end = Math.max(...reports.map((r) => r.end));
  const firstEnd = Math.min(...ok.map((r) => r.end));
  const rates = ok.map((r) => r.dataBytes / Math.max(1, r.end - (r.firstByte || r.start))).sort((a, b) => a - b);
  const median = rates[Math.floor(rates.length / 2)] ?? 0;
  return {
    reports, failures, mismatches, notSparse,
    ms: end - start,
    firstEndMs: firstEnd - start,
    slowestAtFirstEnd: Math.min(...ok.map((r) => doneAt(r, firstEnd) / (r.dataBytes || 1))),
    minRateRatio: median > 0 ? (rates[0] ?? 0) / median : 0,
    maxTimeToFirstByte: Math.max(...ok.map((r) => r.firstByte - r.start)),
    peakRss,
  };
}

// ------------------------------------------------------------------ long form

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? Number(process.argv[i + 1]) : def;
}

async function main(): Promise<void> {
  const minutes = arg('minutes', 10);
  const n = arg('transfers', 64);
  const workers = arg('workers', 4);
  const mib = (x: number) => `${(x / MiB).toFixed(1)} MiB`;
  const log = (s: string) => process.stderr.write(`${new Date().toISOString().slice(11, 19)} ${s}\n`);
  const dir = await scratchDir('/tmp', 'svsoak-');
  const d = await spawnDaemon({ dir, logLevel: 'warn' });
  let failed = false;
  try {
    const poolDir = path.join(dir, 'pool');
    const conn = await connect(d.uri);
    const pool = await conn.storagePoolDefineDir('soak', poolDir);
    await pool.build();
    await pool.create();
    const set = await prepareLoad(pool, poolDir, dir, n);
    const slowSize = Math.max(16 * MiB, Math.ceil(minutes * 60 * 64 * 1024 * 1.2));
    await pool.createVol({ name: 'slow.img', capacity: slowSize, allocation: 0 });
    await makeFilledFile(path.join(poolDir, 'slow.img'), slowSize, 7);
    await conn.close();
    const base = d.mem();
    const fdsBase = d.fds().length;
    log(`daemon pid ${d.pid}, rss ${mib(base.rss)}, ${fdsBase} fds; ${n} transfers per round, ${mib(set.dataBytes)} of data; slow reader on ${mib(slowSize)}`);

    // one slow reader for the whole run, default keepalive (5 s, 6 pings; the daemon 5 s, 5)
    const slow = startWorker({ op: 'slow-download', uri: d.uri, pool: 'soak', vol: 'slow.img', rate: 64 * 1024, sparse: false });
    await slow.waitLine((l) => l.event === 'progress', 15000);

    const t0 = Date.now();
    const rounds: Array<Omit<RoundResult, 'reports'> & { rss: number; fds: number }> = [];
    while (Date.now() - t0 < minutes * 60000) {
      const r = await runRound(d, set, workers);
      const row = { ...r, reports: undefined, rss: d.mem().rss, fds: d.fds().length };
      delete row.reports;
      rounds.push(row);
      const bad = r.failures.length + r.mismatches.length + r.notSparse.length;
      log(`round ${rounds.length}: ${r.ms} ms (${mib(set.dataBytes / (r.ms / 1000))}/s), slowest stream at ${(r.minRateRatio * 100).toFixed(0)}% of the median rate, least advanced ${(r.slowestAtFirstEnd * 100).toFixed(0)}% at first end, ` +
        `ttfb ≤ ${r.maxTimeToFirstByte} ms, rss ${mib(row.rss)} (round peak ${mib(r.peakRss)}), ${row.fds} fds${bad ? `, ${bad} FAILURES: ${[...r.failures, ...r.mismatches, ...r.notSparse].slice(0, 3).join('; ')}` : ''}`);
      if (bad || !d.alive()) {
        failed = true;
        break;
      }
    }
    const slowLast = slow.lines.filter((l) => l.event === 'progress').at(-1);
    const slowErr = slow.lines.find((l) => l.event === 'error');
    const slowRate = slowLast ? Number(slowLast.bytes) / (Number(slowLast.ms) / 1000) : 0;
    slow.proc.kill('SIGKILL');
    await slow.exited;
    await sleep(500);
    const end = d.mem();
    const times = rounds.map((r) => r.ms).sort((a, b) => a - b);
    const summary = {
      minutes: (Date.now() - t0) / 60000,
      rounds: rounds.length,
      transfers: rounds.length * n,
      dataMoved: rounds.length * set.dataBytes,
      roundMs: { min: times[0], median: times[Math.floor(times.length / 2)], max: times.at(-1) },
      leastAdvancedAtFirstEnd: Math.min(...rounds.map((r) => r.slowestAtFirstEnd)),
      minRateRatio: Math.min(...rounds.map((r) => r.minRateRatio)),
      maxTimeToFirstByte: Math.max(...rounds.map((r) => r.maxTimeToFirstByte)),
      rss: { before: base.rss, peak: end.hwm, after: end.rss, afterFirstRound: rounds[0]?.rss, afterLastRound: rounds.at(-1)?.rss },
      fds: { before: fdsBase, afterLastRound: rounds.at(-1)?.fds, end: d.fds().length },
      slowReader: { bytes: Number(slowLast?.bytes ?? 0), rate: slowRate, error: slowErr ?? null },
      daemonAlive: d.alive(),
      daemonErrors: d.errors().slice(0, 10),
    };
    if (slowErr || slowRate < 48 * 1024 || !d.alive() || summary.daemonErrors.length > 0) failed = true;
    const lines = [
      `duration             ${summary.minutes.toFixed(1)} min, ${summary.rounds} rounds of ${n} concurrent transfers (${summary.transfers} transfers, ${mib(summary.dataMoved)} of data), all byte-identical: ${failed ? 'NO' : 'yes'}`,
      `round time           min ${summary.roundMs.min} ms, median ${summary.roundMs.median} ms, max ${summary.roundMs.max} ms`,
      `starvation           slowest stream's rate vs the median: ${(summary.minRateRatio * 100).toFixed(0)}% (worst round); least advanced at the first one's end: ${(summary.leastAdvancedAtFirstEnd * 100).toFixed(0)}%; time to first byte ≤ ${summary.maxTimeToFirstByte} ms`,
      `daemon rss           before ${mib(summary.rss.before)}, after round 1 ${mib(summary.rss.afterFirstRound ?? 0)}, after the last ${mib(summary.rss.afterLastRound ?? 0)}, peak ${mib(summary.rss.peak)}`,
      `daemon fds           before ${summary.fds.before}, after the last round ${summary.fds.afterLastRound}, at the end ${summary.fds.end}`,
      `slow reader          ${mib(summary.slowReader.bytes)} at ${(slowRate / 1024).toFixed(1)} KiB/s, ${slowErr ? `FAILED: ${JSON.stringify(slowErr)}` : 'connected throughout'}`,
      `daemon               ${summary.daemonAlive ? 'alive' : 'DEAD'}, ${summary.daemonErrors.length} error lines`,
    ];
    process.stdout.write(`${lines.join('\n')}\n`);
    if (process.argv.includes('--json')) process.stdout.write(`${JSON.stringify({ summary, rounds })}\n`);
  } finally {
    await d.stop();
    await fsp.rm(dir, { recursive: true, force: true });
  }
  process.exitCode = failed ? 1 : 0;
}

// `node --test dist/test/` also runs this file (it lies under a `test` directory): only run when invoked directly.
if (process.argv[1] && pathToFileURL(process.argv[1]).href === import.meta.url && !process.env.NODE_TEST_CONTEXT) {
  main().catch((err) => {
    process.stderr.write(`soak: ${(err as Error).stack ?? err}\n`);
    process.exit(2);
  });
}
