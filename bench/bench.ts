/**
 * `npm run bench [-- --quick]`: times sparse (and, for the dense image, plain) downloads and
 * uploads through every available contender, alternating them within each repetition, verifies
 * every copy (content SHA-256 and allocation), and prints medians, min–max, peak RSS of client
 * and daemon and the ratio to virsh ↔ libvirtd. Results also go to bench/results/latest.json.
 *
 * See `--help`. Missing tools or servers skip only their column, with the reason printed.
 */
import { existsSync, mkdirSync, readdirSync, rmSync, statSync, statfsSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir, totalmem } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import {
  RBD_REFERENCE_ID,
  REFERENCE_ID,
  allContenders,
  type BenchContext,
  type Contender,
  type Direction,
  type Scenario,
} from './contenders.js';
import { seekDataUnavailableReason } from './extents.js';
import {
  MiB,
  buildImages,
  contentDigest,
  dataBytes,
  fmtBytes,
  fullSha256,
  imageSpecs,
  type BuiltImage,
} from './images.js';
import { loadSparseApi } from './local-copy.js';
import { COPY_IMAGES, copyContenders, runCopyBench } from './copy.js';
import { haveGnuTime, measure } from './measure.js';
import { DirPool, OurDaemon, RbdBench, libvirtdPid, toolVersion, virsh, which } from './services.js';

const HELP = `usage: npm run bench -- [options]

  --quick              small images (1 GiB/64 MiB data, 128 MiB dense, 10,000 × 4 KiB extents,
                       64 GiB hole), up to 3 repetitions within 55 s: under a minute
  --reps N             repetitions (default 5, --quick 3); medians over the repetitions done
  --budget SEC         start no further repetition that would end after SEC seconds of bench
                       (default 840 = 14 min, --quick 55); at least one repetition always runs
  --images LIST        subset of a,b,c,d,e (a: sparse 256 extents, b: dense, c: 4 KiB extents, d: hole,
                       e: 25,000 × 4 KiB extents in 1 GiB; full set only)
  --directions LIST    subset of download,upload
  --only REGEX         only contenders whose id matches (ids: see --list; the copy rows of
                       images a and b: copy:…, virsh:…, nbdcopy:…, floor:…, see bench/copy.ts)
  --skip REGEX         skip contenders whose id matches
  --list               print the contenders and whether they are available, then exit
  --dir DIR            work directory (default /dev/shm/sparsevirt-bench when it has room,
                       else $TMPDIR/sparsevirt-bench)
  --keep               keep images (reused next time when unchanged) and the bench pools
  --verify MODE        content (default): SHA-256 over non-zero 4 KiB blocks, skips holes;
                       full: also a plain SHA-256 of every byte (slow on big sparse images)
  --timeout SEC        per-run limit (default 300, --quick 60)
  --json PATH          results file (default bench/results/latest.json; "-" for none)
`;

const REPO_ROOT = fileURLToPath(new URL('../../', import.meta.url));
const DIST = join(REPO_ROOT, 'dist');
const TMPFS_MAGIC = 0x01021994;
const BENCH_POOL = 'svbench';

interface Options {
  quick: boolean;
  reps: number;
  images: string[];
  directions: Direction[];
  only: RegExp | null;
  skip: RegExp | null;
  list: boolean;
  dir: string | null;
  keep: boolean;
  verify: 'content' | 'full';
  timeoutMs: number;
  budgetSeconds: number;
  json: string | null;
}

function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      quick: { type: 'boolean', default: false },
      reps: { type: 'string' },
      images: { type: 'string', default: 'a,b,c,d,e' },
      directions: { type: 'string', default: 'download,upload' },
      only: { type: 'string' },
      skip: { type: 'string' },
      list: { type: 'boolean', default: false },
      dir: { type: 'string' },
      keep: { type: 'boolean', default: false },
      verify: { type: 'string', default: 'content' },
      timeout: { type: 'string' },
      budget: { type: 'string' },
      json: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(HELP);
    process.exit(0);
  }
  const quick = values.quick ?? false;
  const reps = values.reps ? Number.parseInt(values.reps, 10) : quick ? 3 : 5;
  if (!(reps >= 1)) throw new Error(`--reps: not a positive integer: ${values.reps}`);
  const directions = values.directions!.split(',').filter(Boolean) as Direction[];
  for (const d of directions) if (d !== 'download' && d !== 'upload') throw new Error(`--directions: ${d}?`);
  const verify = values.verify as 'content' | 'full';
  if (verify !== 'content' && verify !== 'full') throw new Error(`--verify: content or full, not ${verify}`);
  const json = values.json === '-' ? null : (values.json ?? join(REPO_ROOT, 'bench', 'results', 'latest.json'));
  return {
    quick,
    reps,
    images: values.images!.split(',').filter(Boolean),
    directions,
    only: values.only ? new RegExp(values.only) : null,
    skip: values.skip ? new RegExp(values.skip) : null,
    list: values.list ?? false,
    dir: values.dir ?? null,
    keep: values.keep ?? false,
    verify,
    timeoutMs: (values.timeout ? Number(values.timeout) : quick ? 60 : 300) * 1000,
    budgetSeconds: values.budget ? Number(values.budget) : quick ? 55 : 840,
    json,
  };
}

const log = (msg = ''): void => {
  process.stdout.write(`${msg}\n`);
};

// ------------------------------------------------------------------------------ work directory

function freeBytes(path: string): number {
  const s = statfsSync(path);
  return s.bavail * s.bsize;
}

function existingAllocation(dir: string): number {
  if (!existsSync(dir)) return 0;
  let n = 0;
  for (const f of readdirSync(dir)) {
    try {
      n += statSync(join(dir, f)).blocks * 512;
    } catch {
      /* gone */
    }
  }
  return n;
}

/** Where to work: tmpfs when there is room for the images plus one copy, else a temp dir. */
function chooseWorkDir(opts: Options, needBytes: number): { base: string; where: string } {
  const describe = (base: string): string => {
    const parent = existsSync(base) ? base : dirname(base);
    const tmpfs = statfsSync(parent).type === TMPFS_MAGIC;
    return `${tmpfs ? 'tmpfs' : 'disk (not tmpfs: timings include disk I/O)'} ${base}, ` +
      `${fmtBytes(freeBytes(parent))} free, needs ~${fmtBytes(needBytes)}`;
  };
  if (opts.dir) return { base: opts.dir, where: describe(opts.dir) };
  const shm = '/dev/shm';
  if (existsSync(shm) && statfsSync(shm).type === TMPFS_MAGIC) {
    const base = join(shm, 'sparsevirt-bench');
    const free = freeBytes(shm) + existingAllocation(join(base, 'pool'));
    if (free >= needBytes) return { base, where: describe(base) };
    log(`not enough room on ${shm} (${fmtBytes(free)} free, need ~${fmtBytes(needBytes)}): using a temp dir`);
  }
  const base = join(tmpdir(), 'sparsevirt-bench');
  return { base, where: describe(base) };
}

// ------------------------------------------------------------------------------ statistics

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

interface RunRecord {
  rep: number;
  scenario: string;
  contender: string;
  ok: boolean;
  error?: string;
  wallSeconds: number;
  clientPeakKiB: number | null;
  clientCpuSeconds: number | null;
  daemonPeakKiB: number | null;
  daemonCpuSeconds: number | null;
  outputAllocated?: number;
  verifySeconds?: number;
}

interface Row {
  scenario: string;
  image: string;
  direction: Direction;
  sparse: boolean;
  contender: string;
  label: string;
  kind: string;
  runs: number;
  failures: number;
  medianSeconds: number | null;
  minSeconds: number | null;
  maxSeconds: number | null;
  dataMiBps: number | null;
  clientPeakKiB: number | null;
  daemonPeakKiB: number | null;
  clientCpuSeconds: number | null;
  /** Median CPU seconds (user + system) of the daemon(s) during a run. */
  daemonCpuSeconds: number | null;
  ratioToReference: number | null;
  /** Median over the median of `cp --sparse=always` on the same image (the local floor). */
  ratioToCp: number | null;
  /** Median over the median of `rbd import` / `rbd export` in the same scenario (RBD target ≤ 1). */
  ratioToRbd: number | null;
  errors: string[];
}

// ------------------------------------------------------------------------------ verification

async function verifyCopy(img: BuiltImage, output: string, mode: 'content' | 'full', fullShaCache: Map<string, string>):
  Promise<{ ok: boolean; error?: string; allocated: number; seconds: number }> {
  const t0 = performance.now();
  if (!existsSync(output)) return { ok: false, error: 'no output file', allocated: 0, seconds: 0 };
  const d = await contentDigest(output);
  const seconds = (): number => (performance.now() - t0) / 1000;
  if (d.size !== img.spec.size) {
    return { ok: false, error: `size ${d.size} != ${img.spec.size}`, allocated: d.allocated, seconds: seconds() };
  }
  if (d.digest !== img.digest) {
    return { ok: false, error: `content SHA-256 differs (${d.digest.slice(0, 12)} != ${img.digest.slice(0, 12)})`, allocated: d.allocated, seconds: seconds() };
  }
  if (mode === 'full') {
    let src = fullShaCache.get(img.path);
    if (!src) {
      src = fullSha256(img.path);
      fullShaCache.set(img.path, src);
    }
    const got = fullSha256(output);
    if (got !== src) return { ok: false, error: `sha256 differs (${got.slice(0, 12)})`, allocated: d.allocated, seconds: seconds() };
  }
  const tolerance = 0.05 * img.allocated + MiB;
  if (Math.abs(d.allocated - img.allocated) > tolerance) {
    return {
      ok: false,
      error: `allocation ${fmtBytes(d.allocated)} vs source ${fmtBytes(img.allocated)} (tolerance 5% + 1 MiB)`,
      allocated: d.allocated,
      seconds: seconds(),
    };
  }
  return { ok: true, allocated: d.allocated, seconds: seconds() };
}

// ------------------------------------------------------------------------------ main

async function main(): Promise<number> {
  const opts = parseOptions(process.argv.slice(2));
  const started = performance.now();
  const specs = imageSpecs(opts.quick).filter((s) => opts.images.includes(s.id));
  const imagesBytes = specs.reduce((n, s) => n + dataBytes(s), 0);
  const biggest = Math.max(0, ...specs.map(dataBytes));
  const { base, where } = chooseWorkDir(opts, imagesBytes + biggest + 256 * MiB);
  const poolDir = join(base, 'pool');
  const outDir = join(base, 'out');
  const runDir = join(base, 'run');

  // ------------------------------------------------------------------ environment
  const [virshOk, cpOk, qemuImgOk, nbdkitOk, nbdcopyOk] = await Promise.all(
    ['virsh', 'cp', 'qemu-img', 'nbdkit', 'nbdcopy'].map((t) => which(t)),
  );
  const versions: Record<string, string | null> = {
    node: process.version,
    virsh: virshOk ? await toolVersion('virsh') : null,
    libvirtd: (await which('libvirtd')) ? await toolVersion('libvirtd') : null,
    nbdkit: nbdkitOk ? await toolVersion('nbdkit') : null,
    nbdcopy: nbdcopyOk ? await toolVersion('nbdcopy') : null,
    'qemu-img': qemuImgOk ? await toolVersion('qemu-img') : null,
    cp: cpOk ? await toolVersion('cp') : null,
  };
  const cpu = cpus()[0]?.model ?? '?';
  log(`sparsevirt bench ${opts.quick ? '--quick ' : ''}— ${new Date().toISOString()}`);
  log(`host: ${cpu}, ${cpus().length} CPUs, ${fmtBytes(totalmem())} RAM; ${Object.entries(versions)
    .map(([k, v]) => `${k} ${v ? v.replace(/^.*?(\d[\w.+:~-]*).*$/, '$1') : 'missing'}`)
    .join(', ')}`);
  log(`work dir: ${where}`);
  log(`repetitions: up to ${opts.reps} within a ${opts.budgetSeconds} s budget, alternating contenders; peak RSS via ${haveGnuTime ? 'GNU time %M' : 'polling /proc (install package "time" for exact client peaks)'}` +
    `; verify: ${opts.verify === 'content' ? 'content SHA-256 (non-zero 4 KiB blocks, holes skipped) + allocation within 5% + 1 MiB' : 'full SHA-256 + content SHA-256 + allocation'}`);
  const seekWhy = seekDataUnavailableReason();
  if (seekWhy) log(`note: SEEK_DATA unavailable (${seekWhy}); verification reads holes too`);

  mkdirSync(poolDir, { recursive: true });
  mkdirSync(outDir, { recursive: true });
  mkdirSync(runDir, { recursive: true });

  // ------------------------------------------------------------------ contenders' availability
  const cliMain = join(DIST, 'bin', 'sparsevirt.cjs'); // the bundled programs, as installed (`bin`)
  const daemonMain = join(DIST, 'bin', 'sparsevirtd.mjs');
  const sparse = await loadSparseApi();
  const ctx: BenchContext = {
    repoRoot: REPO_ROOT,
    outDir,
    runDir,
    libvirt: { skip: 'not set up yet' },
    ours: { skip: 'not set up yet' },
    cli: existsSync(cliMain) ? { mainJs: cliMain } : { skip: 'not built yet (dist/bin/sparsevirt.cjs missing: npm run build)' },
    localCopy: 'skip' in sparse ? sparse : { script: join(DIST, 'bench', 'local-copy.js') },
    tools: { cp: cpOk!, qemuImg: qemuImgOk!, nbdkit: nbdkitOk!, nbdcopy: nbdcopyOk!, virsh: virshOk! },
  };
  const wanted = allContenders().filter((c) => (!opts.only || opts.only.test(c.id)) && !(opts.skip?.test(c.id)));

  const cleanups: Array<() => Promise<void>> = [];
  let cleaned = false;
  const cleanupAll = async (): Promise<void> => {
    if (cleaned) return;
    cleaned = true;
    for (const f of cleanups.reverse()) await f().catch(() => undefined);
    rmSync(outDir, { recursive: true, force: true });
    rmSync(runDir, { recursive: true, force: true });
    if (!opts.keep) rmSync(base, { recursive: true, force: true });
  };
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      log(`\n${sig}: cleaning up`);
      void cleanupAll().finally(() => process.exit(130));
    });
  }

  try {
    // ---------------------------------------------------------------- images
    log('');
    log(`images (${opts.quick ? 'quick' : 'full'} set, deterministic; reused when unchanged since a --keep run):`);
    const images = opts.list ? [] : await buildImages(specs, poolDir, (m) => log(`  ${m}`));

    // ---------------------------------------------------------------- servers
    const needLibvirt = wanted.some((c) => c.id.endsWith('/libvirtd'));
    const needOurs = wanted.some((c) => c.id.endsWith('/sv-d'));
    if (needLibvirt) {
      if (!virshOk) ctx.libvirt = { skip: 'virsh not installed (run: sudo scripts/setup-libvirt.sh)' };
      else {
        const uri = 'qemu:///system';
        const probe = await virsh(uri, ['pool-list', '--all'], 15_000);
        if (probe.code !== 0) {
          ctx.libvirt = { skip: `libvirtd not reachable at ${uri}: ${probe.stderr.trim().split('\n').pop()} (run: sudo scripts/setup-libvirt.sh)` };
        } else if (!opts.list) {
          const pool = new DirPool(uri, BENCH_POOL, poolDir);
          await pool.up();
          if (!opts.keep) cleanups.push(() => pool.down());
          ctx.libvirt = { uri, pool, pid: await libvirtdPid() };
        } else ctx.libvirt = { uri, pool: new DirPool(uri, BENCH_POOL, poolDir), pid: null };
      }
    }
    if (needOurs) {
      if (!existsSync(daemonMain)) ctx.ours = { skip: 'not built yet (dist/bin/sparsevirtd.mjs missing: npm run build)' };
      else if (!virshOk) ctx.ours = { skip: 'virsh needed to define the bench pool on sparsevirtd' };
      else if (!opts.list) {
        const daemon = new OurDaemon(daemonMain, join(runDir, 'sparsevirtd.sock'), join(base, 'sparsevirtd-state'));
        try {
          await daemon.start();
          cleanups.push(() => daemon.stop());
          const pool = new DirPool(daemon.uri, BENCH_POOL, poolDir);
          await pool.up();
          ctx.ours = { daemon, pool };
        } catch (err) {
          ctx.ours = { skip: `sparsevirtd not usable: ${(err as Error).message.slice(0, 300)}` };
        }
      }
    }

    if (wanted.some((c) => c.id.endsWith('-rbd') || c.id === 'rbd-cli')) {
      const clusterJson = join(process.env.SPARSEVIRT_CEPH_DIR ?? '/var/lib/sparsevirt-ceph', 'cluster.json');
      if (!existsSync(clusterJson)) ctx.rbd = { skip: `no Ceph cluster (${clusterJson}; run: sudo scripts/setup-ceph.sh)` };
      else if (!existsSync(daemonMain)) ctx.rbd = { skip: 'not built yet (dist/bin/sparsevirtd.mjs missing: npm run build)' };
      else if (!virshOk) ctx.rbd = { skip: 'virsh needed to define the RBD pool on sparsevirtd' };
      else if (!opts.list) {
        const daemon = new OurDaemon(daemonMain, join(runDir, 'sparsevirtd-rbd.sock'), join(base, 'sparsevirtd-rbd-state'));
        try {
          await daemon.start();
          cleanups.push(() => daemon.stop());
          const rbd = new RbdBench(daemon, clusterJson);
          cleanups.push(() => rbd.down());
          await rbd.up(runDir);
          ctx.rbd = rbd;
        } catch (err) {
          ctx.rbd = { skip: `RBD pool not usable: ${(err as Error).message.slice(0, 300)}` };
        }
      }
    }

    const skipped: Array<{ contender: string; reason: string }> = [];
    const active: Contender[] = [];
    for (const c of wanted) {
      const why = c.unavailable(ctx);
      if (why) skipped.push({ contender: c.id, reason: why });
      else active.push(c);
    }
    log('');
    log('contenders:');
    for (const c of wanted) {
      const s = skipped.find((x) => x.contender === c.id);
      log(`  ${c.id.padEnd(16)} ${c.label.padEnd(34)} ${s ? `SKIPPED: ${s.reason}` : 'ok'}`);
    }
    if (opts.list) return 0;
    const copyWanted = copyContenders().some((c) => (!opts.only || opts.only.test(c.id)) && !opts.skip?.test(c.id))
      && images.some((i) => COPY_IMAGES.includes(i.spec.id));
    if (active.length === 0 && !copyWanted) {
      log('nothing to run');
      return 1;
    }

    // ---------------------------------------------------------------- scenarios
    const scenarios: Scenario[] = [];
    for (const image of images) {
      for (const direction of opts.directions) {
        scenarios.push({ image, direction, sparse: true, key: `${image.spec.id}/${direction}/sparse` });
      }
    }
    for (const image of images.filter((i) => i.spec.plain)) {
      for (const direction of opts.directions) {
        scenarios.push({ image, direction, sparse: false, key: `${image.spec.id}/${direction}/plain` });
      }
    }

    /** The scenario whose runs stand for (c, s): direction-free local copies run once per image. */
    const runKey = (c: Contender, s: Scenario): string =>
      c.directionFree && s.direction === 'upload' && opts.directions.includes('download')
        ? s.key.replace('/upload/', '/download/')
        : s.key;

    // ---------------------------------------------------------------- runs
    log('');
    log('runs:');
    const records: RunRecord[] = [];
    const fullShaCache = new Map<string, string>();
    const repSeconds: number[] = [];
    let stoppedEarly: string | null = null;
    for (let rep = 0; rep < opts.reps; rep++) {
      const elapsed = (performance.now() - started) / 1000;
      if (rep > 0 && elapsed + Math.max(...repSeconds) > opts.budgetSeconds) {
        stoppedEarly =
          `stopped after ${rep} of ${opts.reps} repetitions: another (~${Math.max(...repSeconds).toFixed(0)} s) ` +
          `would end past the ${opts.budgetSeconds} s budget (--budget)`;
        log(`  ${stoppedEarly}`);
        break;
      }
      const repStart = performance.now();
      for (const s of scenarios) {
        const list = active.filter((c) => c.supports(s) && runKey(c, s) === s.key);
        const order = list.map((_, i) => list[(i + rep) % list.length]!); // rotate: alternate A/B
        for (const c of order) {
          const rec: RunRecord = {
            rep, scenario: s.key, contender: c.id, ok: false, wallSeconds: NaN,
            clientPeakKiB: null, clientCpuSeconds: null, daemonPeakKiB: null, daemonCpuSeconds: null,
          };
          let cleanup: (() => Promise<void>) | undefined;
          try {
            const p = await c.prepare(ctx, s);
            cleanup = p.cleanup;
            const m = await measure(p.spec, p.daemonPids, opts.timeoutMs);
            await p.afterRun?.();
            Object.assign(rec, {
              wallSeconds: m.wallSeconds,
              clientPeakKiB: m.clientPeakKiB,
              clientCpuSeconds: m.clientCpuSeconds,
              daemonPeakKiB: m.daemonPeakKiB,
              daemonCpuSeconds: m.daemonCpuSeconds,
            });
            if (m.timedOut) rec.error = `timed out after ${opts.timeoutMs / 1000} s`;
            else if (m.exitCode !== 0) rec.error = `exit ${m.exitCode ?? m.signal}: ${m.output.split('\n').slice(-3).join(' | ')}`;
            else {
              const v = await verifyCopy(s.image, p.output, opts.verify, fullShaCache);
              rec.ok = v.ok;
              rec.outputAllocated = v.allocated;
              rec.verifySeconds = v.seconds;
              if (v.error) rec.error = `verification: ${v.error}`;
            }
          } catch (err) {
            rec.error = `setup: ${(err as Error).message}`;
          } finally {
            await cleanup?.().catch(() => undefined);
          }
          records.push(rec);
          const mem = (k: number | null): string => (k ? `${(k / 1024).toFixed(0)} MiB` : '-');
          log(
            `  ${rep + 1}/${opts.reps} ${s.key.padEnd(17)} ${c.label.padEnd(34)} ` +
              `${Number.isFinite(rec.wallSeconds) ? rec.wallSeconds.toFixed(3).padStart(8) : '       -'} s  ` +
              `${rec.ok ? 'ok  ' : 'FAIL'} client ${mem(rec.clientPeakKiB).padStart(8)} daemon ${mem(rec.daemonPeakKiB).padStart(8)}` +
              `${rec.error ? `  ${rec.error}` : ''}`,
          );
        }
      }
      repSeconds.push((performance.now() - repStart) / 1000);
    }
    const repsDone = repSeconds.length;

    // ---------------------------------------------------------------- summary
    const rows: Row[] = [];
    for (const s of scenarios) {
      const list = active.filter((c) => c.supports(s));
      const refRuns = records.filter((r) => r.scenario === s.key && r.contender === REFERENCE_ID && r.ok);
      const refMedian = refRuns.length ? median(refRuns.map((r) => r.wallSeconds)) : null;
      // local floors run once per image (under the download key)
      const cpRuns = records.filter((r) => r.contender === 'cp' && r.ok && r.scenario === runKey(active.find((c) => c.id === 'cp') ?? list[0]!, s));
      const cpMedian = cpRuns.length ? median(cpRuns.map((r) => r.wallSeconds)) : null;
      const rbdRuns = records.filter((r) => r.scenario === s.key && r.contender === RBD_REFERENCE_ID && r.ok);
      const rbdMedian = rbdRuns.length ? median(rbdRuns.map((r) => r.wallSeconds)) : null;
      for (const c of list) {
        const rs = records.filter((r) => r.scenario === runKey(c, s) && r.contender === c.id);
        const ok = rs.filter((r) => r.ok);
        const times = ok.map((r) => r.wallSeconds);
        const med = times.length ? median(times) : null;
        const maxOf = (xs: Array<number | null>): number | null => {
          const v = xs.filter((x): x is number => x !== null);
          return v.length ? Math.max(...v) : null;
        };
        const cpuTimes = ok.map((r) => r.clientCpuSeconds).filter((x): x is number => x !== null);
        const daemonCpu = ok.map((r) => r.daemonCpuSeconds).filter((x): x is number => x !== null);
        rows.push({
          scenario: s.key,
          image: s.image.spec.id,
          direction: s.direction,
          sparse: s.sparse,
          contender: c.id,
          label: runKey(c, s) === s.key ? c.label : `${c.label} (= download)`,
          kind: c.kind,
          runs: rs.length,
          failures: rs.length - ok.length,
          medianSeconds: med,
          minSeconds: times.length ? Math.min(...times) : null,
          maxSeconds: times.length ? Math.max(...times) : null,
          dataMiBps: med && s.image.dataBytes ? s.image.dataBytes / MiB / med : null,
          clientPeakKiB: maxOf(ok.map((r) => r.clientPeakKiB)),
          daemonPeakKiB: maxOf(ok.map((r) => r.daemonPeakKiB)),
          clientCpuSeconds: cpuTimes.length ? median(cpuTimes) : null,
          daemonCpuSeconds: daemonCpu.length ? median(daemonCpu) : null,
          ratioToReference: med !== null && refMedian ? med / refMedian : null,
          ratioToCp: med !== null && cpMedian ? med / cpMedian : null,
          ratioToRbd: med !== null && rbdMedian ? med / rbdMedian : null,
          errors: [...new Set(rs.filter((r) => !r.ok).map((r) => r.error ?? '?'))],
        });
      }
    }
    if (active.length) printTable(scenarios, rows);
    if (skipped.length) {
      log('');
      log('skipped:');
      for (const s of skipped) log(`  ${s.contender}: ${s.reason}`);
    }
    const notes = active.filter((c) => c.note).map((c) => `  ${c.id}: ${c.note}`);
    if (notes.length) {
      log('');
      log('notes:');
      for (const n of notes) log(n);
    }

    // copy rows: volume → volume between servers (bench/copy.ts)
    const copy = copyWanted
      ? await runCopyBench({
        images, base, poolDir, repoRoot: REPO_ROOT, reps: opts.reps, timeoutMs: opts.timeoutMs, only: opts.only, skip: opts.skip, log,
        libvirt: needLibvirt ? ctx.libvirt : undefined,
      })
      : null;
    const failures = records.filter((r) => !r.ok).length + (copy?.failures ?? 0);
    const totalSeconds = (performance.now() - started) / 1000;
    log('');
    log(`${records.length} runs in ${repsDone} repetition(s), ${failures} failed, ${totalSeconds.toFixed(0)} s in all` +
      (stoppedEarly ? ` (${stoppedEarly})` : ''));

    if (opts.json) {
      mkdirSync(dirname(opts.json), { recursive: true });
      const doc = {
        date: new Date().toISOString(),
        quick: opts.quick,
        reps: opts.reps,
        repsDone,
        repSeconds,
        stoppedEarly,
        budgetSeconds: opts.budgetSeconds,
        verify: opts.verify,
        host: { cpu, cpus: cpus().length, memBytes: totalmem() },
        workDir: where,
        versions,
        rssMethod: { client: haveGnuTime ? 'GNU time %M' : 'poll /proc VmHWM', daemon: 'VmHWM after clear_refs (else VmRSS polled)' },
        reference: REFERENCE_ID,
        images: images.map((i) => ({
          id: i.spec.id, file: i.spec.file, title: i.spec.title, size: i.spec.size, extents: i.spec.extents.length,
          dataBytes: i.dataBytes, allocated: i.allocated, digest: i.digest, buildSeconds: i.buildSeconds, reused: i.reused,
        })),
        contenders: wanted.map((c) => ({ id: c.id, label: c.label, kind: c.kind, note: c.note ?? null,
          skipped: skipped.find((s) => s.contender === c.id)?.reason ?? null })),
        rows,
        runs: records,
        copy,
        totalSeconds,
      };
      writeFileSync(opts.json, `${JSON.stringify(doc, null, 2)}\n`);
      log(`results: ${opts.json}`);
    }
    return failures ? 1 : 0;
  } finally {
    await cleanupAll();
  }
}

function printTable(scenarios: Scenario[], rows: Row[]): void {
  const f = (x: number | null, d = 3): string => (x === null ? '-' : x.toFixed(d));
  const mib = (k: number | null): string => (k === null ? '-' : `${(k / 1024).toFixed(0)} MiB`);
  log('');
  log(`results (wall time incl. process start; ×ref = median / median of ${REFERENCE_ID}, ×cp = median / median of cp --sparse=always, ×rbd = median / median of ${RBD_REFERENCE_ID}; < 1 is faster):`);
  for (const s of scenarios) {
    const img = s.image;
    log('');
    log(`${s.key}  —  ${img.spec.title}; ${img.spec.extents.length} extents, ${fmtBytes(img.dataBytes)} data of ${fmtBytes(img.spec.size)}`);
    const header = ['contender', 'median s', 'min–max s', 'data MiB/s', '×ref', '×cp', '×rbd', 'client RSS', 'daemon RSS', 'client CPU s', 'daemon CPU s', 'runs'];
    const body = rows
      .filter((r) => r.scenario === s.key)
      .map((r) => [
        r.label,
        f(r.medianSeconds),
        r.minSeconds === null ? '-' : `${f(r.minSeconds)}–${f(r.maxSeconds)}`,
        r.dataMiBps === null ? '-' : r.dataMiBps.toFixed(0),
        r.ratioToReference === null ? '-' : r.ratioToReference.toFixed(2),
        r.ratioToCp === null ? '-' : r.ratioToCp.toFixed(2),
        r.ratioToRbd === null ? '-' : r.ratioToRbd.toFixed(2),
        mib(r.clientPeakKiB),
        mib(r.daemonPeakKiB),
        f(r.clientCpuSeconds, 2),
        f(r.daemonCpuSeconds, 2),
        r.failures ? `${r.runs - r.failures}/${r.runs} FAIL: ${r.errors[0] ?? ''}` : `${r.runs}`,
      ]);
    const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
    const line = (cells: string[]): string =>
      '  ' + cells.map((c, i) => (i === 0 || i === cells.length - 1 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
    log(line(header));
    for (const b of body) log(line(b));
  }
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(err instanceof Error ? err.stack ?? err.message : err);
    process.exit(1);
  },
);

