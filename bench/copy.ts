/**
 * Copy rows: a volume from one server to another, timed end to end (process start included).
 *
 * - `sparsevirt vol-copy --sparse` sparsevirtd → sparsevirtd and libvirtd → sparsevirtd (our CLI
 *   pipes the source's download into the destination's upload);
 * - the same sparsevirtd → sparsevirtd copy with `--verify` (each daemon digests its side);
 * - `virsh vol-download --sparse` into a tmpfs file then `virsh vol-upload --sparse` of it, timed
 *   together, between the same two servers (the round trip a person would do with virsh);
 * - `nbdcopy` between two `nbdkit file` servers on unix sockets (the anchor);
 * - each source's download alone into a tmpfs file (`sparsevirt vol-download --sparse`): the
 *   floor of any copy from that server.
 *
 * The destination volume (or nbdkit's target file) is made empty and unallocated before each run,
 * untimed; every copy is verified (content digest and allocation, as the bench's other rows) and
 * deleted. Contenders take turns in a rotated order in each repetition.
 *
 * Run by `npm run bench` on images a and b (after the transfer table), or alone:
 *   node dist/bench/copy.js [--quick] [--reps N] [--images a,b] [--only REGEX] [--keep] [--build ROOT]
 * `--build ROOT`: the CLI and daemon of another checkout's build (ROOT/dist/bin), for A/B runs
 * with the same harness. Besides wall time, each run records the CPU seconds (user + sys) of the
 * client and of the servers (the source's and destination's, all threads, from /proc).
 */
import { closeSync, existsSync, mkdirSync, openSync, rmSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { MiB, buildImages, contentDigest, fmtBytes, imageSpecs, type BuiltImage } from './images.js';
import { measure, type RunSpec } from './measure.js';
import { DirPool, NbdkitFile, OurDaemon, libvirtdPid, virsh, which } from './services.js';

/** Images the copy rows use: a (16 GiB, ~1.08 GiB data) and b (2 GiB dense). */
export const COPY_IMAGES = ['a', 'b'];

const SRC_POOL = 'svbench';
const DST_POOL = 'svcopy';
const LIBVIRT_POOL = 'svcopy-src';

export interface CopyBenchOptions {
  images: BuiltImage[];
  /** The bench's work directory (tmpfs): daemons' state, the destination pool, temp files. */
  base: string;
  /** The directory holding the images (the source pools' target). */
  poolDir: string;
  repoRoot: string;
  reps: number;
  timeoutMs: number;
  /** Contenders whose id matches (null: all). */
  only: RegExp | null;
  skip: RegExp | null;
  /**
   * libvirtd's dir pool on `poolDir`, when the caller has one (libvirt refuses a second pool on
   * the same directory); else one is defined here, or why libvirtd is not usable.
   */
  libvirt?: { uri: string; pool: DirPool } | { skip: string };
  log: (msg?: string) => void;
}

export interface CopyRunRecord {
  rep: number;
  image: string;
  contender: string;
  ok: boolean;
  error?: string;
  wallSeconds: number;
  clientPeakKiB: number | null;
  daemonPeakKiB: number | null;
  clientCpuSeconds: number | null;
  /** CPU seconds the servers (source and destination daemons) spent during the run. */
  serverCpuSeconds: number | null;
}

export interface CopyRow {
  image: string;
  contender: string;
  label: string;
  runs: number;
  failures: number;
  medianSeconds: number | null;
  minSeconds: number | null;
  maxSeconds: number | null;
  dataMiBps: number | null;
  clientPeakKiB: number | null;
  daemonPeakKiB: number | null;
  /** Medians of the runs' CPU seconds. */
  clientCpuSeconds: number | null;
  serverCpuSeconds: number | null;
  /** Median over the median of the virsh round trip between the same servers. */
  ratioToVirsh: number | null;
  /** Median over the median of nbdcopy. */
  ratioToNbdcopy: number | null;
  errors: string[];
}

export interface CopyBenchResult {
  contenders: Array<{ id: string; label: string; skipped: string | null }>;
  rows: CopyRow[];
  runs: CopyRunRecord[];
  /** Ratios the issue sets targets for, per image. */
  targets: Array<{ image: string; what: string; ratio: number | null; target: string; met: boolean | null }>;
  failures: number;
}

interface Env {
  cli: string;
  src: { daemon: OurDaemon; pool: DirPool } | { skip: string };
  dst: { daemon: OurDaemon; pool: DirPool } | { skip: string };
  libvirt: { uri: string; pool: DirPool; pid: number | null } | { skip: string };
  nbd: true | { skip: string };
  runDir: string;
  tmpDir: string;
}

interface Prepared {
  spec: RunSpec;
  daemonPids: number[];
  /** The copy to verify against the image. */
  output: string;
  cleanup: () => Promise<void>;
}

interface CopyContender {
  id: string;
  label: string;
  unavailable(env: Env): string | null;
  prepare(env: Env, img: BuiltImage): Promise<Prepared>;
}

const skipOf = (x: object): string | null => ('skip' in x ? (x as { skip: string }).skip : null);
const pidsOf = (...ps: Array<number | null>): number[] => ps.filter((p): p is number => p !== null && p > 0);

/** The destination sparsevirtd's volume for `img`, made empty (untimed). */
async function freshDst(env: Env, img: BuiltImage): Promise<{ pool: DirPool; name: string; path: string; pid: number | null }> {
  const dst = env.dst as { daemon: OurDaemon; pool: DirPool };
  const name = img.spec.file;
  const path = await dst.pool.createEmpty(name, img.spec.size);
  return { pool: dst.pool, name, path, pid: dst.daemon.pid };
}

function source(env: Env, from: 'sv-d' | 'libvirtd'): { uri: string; pool: string; pid: number | null } {
  if (from === 'sv-d') {
    const s = env.src as { daemon: OurDaemon; pool: DirPool };
    return { uri: s.daemon.uri, pool: s.pool.name, pid: s.daemon.pid };
  }
  const l = env.libvirt as { uri: string; pool: DirPool; pid: number | null };
  return { uri: l.uri, pool: l.pool.name, pid: l.pid };
}

function svCopy(from: 'sv-d' | 'libvirtd', verify: boolean): CopyContender {
  return {
    id: `copy:${from}/sv-d${verify ? '+verify' : ''}`,
    label: `sparsevirt vol-copy ${from === 'sv-d' ? 'sparsevirtd' : 'libvirtd'} → sparsevirtd${verify ? ' --verify' : ''}`,
    unavailable: (env) => skipOf(env.dst) ?? skipOf(from === 'sv-d' ? env.src : env.libvirt),
    async prepare(env, img) {
      const src = source(env, from);
      const dst = await freshDst(env, img);
      const dstUri = (env.dst as { daemon: OurDaemon }).daemon.uri;
      return {
        spec: {
          cmd: env.cli,
          args: ['-c', src.uri, 'vol-copy', '--pool', src.pool, img.spec.file, '--desturi', dstUri, '--dest-pool', dst.pool.name, '--sparse',
            ...(verify ? ['--verify'] : [])],
        },
        daemonPids: pidsOf(src.pid, dst.pid),
        output: dst.path,
        cleanup: () => dst.pool.delete(dst.name),
      };
    },
  };
}

function virshRoundTrip(from: 'sv-d' | 'libvirtd'): CopyContender {
  return {
    id: `virsh:${from}/sv-d`,
    label: `virsh download+upload ${from === 'sv-d' ? 'sparsevirtd' : 'libvirtd'} → sparsevirtd`,
    unavailable: (env) => skipOf(env.dst) ?? skipOf(from === 'sv-d' ? env.src : env.libvirt),
    async prepare(env, img) {
      const src = source(env, from);
      const dst = await freshDst(env, img);
      const dstUri = (env.dst as { daemon: OurDaemon }).daemon.uri;
      const tmp = join(env.tmpDir, `roundtrip-${img.spec.id}.raw`);
      rmSync(tmp, { force: true });
      return {
        // the two virsh runs, back to back, timed together; no word of them reaches a shell
        spec: {
          cmd: 'sh',
          args: ['-c', 'virsh -q -c "$1" vol-download --pool "$2" "$3" "$4" --sparse && virsh -q -c "$5" vol-upload --pool "$6" "$7" "$4" --sparse',
            'sh', src.uri, src.pool, img.spec.file, tmp, dstUri, dst.pool.name, dst.name],
        },
        daemonPids: pidsOf(src.pid, dst.pid),
        output: dst.path,
        cleanup: async () => {
          rmSync(tmp, { force: true });
          await dst.pool.delete(dst.name);
        },
      };
    },
  };
}

/** The source's download alone, into a tmpfs file: what no copy from that server can beat. */
function downloadFloor(from: 'sv-d' | 'libvirtd'): CopyContender {
  return {
    id: `floor:${from}-download`,
    label: `sparsevirt vol-download from ${from === 'sv-d' ? 'sparsevirtd' : 'libvirtd'} (floor)`,
    unavailable: (env) => skipOf(from === 'sv-d' ? env.src : env.libvirt),
    async prepare(env, img) {
      const src = source(env, from);
      const out = join(env.tmpDir, `floor-${img.spec.id}.raw`);
      rmSync(out, { force: true });
      return {
        spec: { cmd: env.cli, args: ['-c', src.uri, 'vol-download', '--pool', src.pool, img.spec.file, out, '--sparse'] },
        daemonPids: pidsOf(src.pid),
        output: out,
        cleanup: async () => rmSync(out, { force: true }),
      };
    },
  };
}

const nbdcopy: CopyContender = {
  id: 'nbdcopy:nbdkit/nbdkit',
  label: 'nbdcopy nbdkit → nbdkit (unix)',
  unavailable: (env) => (env.nbd === true ? null : env.nbd.skip),
  async prepare(env, img) {
    const srcSock = join(env.runDir, `copy-nbd-src-${img.spec.id}.sock`);
    const dstSock = join(env.runDir, `copy-nbd-dst-${img.spec.id}.sock`);
    const target = join(env.tmpDir, `nbd-target-${img.spec.id}.raw`);
    rmSync(target, { force: true });
    closeSync(openSync(target, 'w'));
    truncateSync(target, img.spec.size);
    const src = new NbdkitFile(img.path, srcSock, true);
    const dst = new NbdkitFile(target, dstSock, false);
    const stop = async (): Promise<void> => {
      await Promise.all([src.stop(), dst.stop()]);
      rmSync(srcSock, { force: true });
      rmSync(dstSock, { force: true });
    };
    try {
      await src.start();
      await dst.start();
    } catch (err) {
      await stop();
      rmSync(target, { force: true });
      throw err;
    }
    return {
      spec: { cmd: 'nbdcopy', args: [src.uri, dst.uri] },
      daemonPids: pidsOf(src.pid, dst.pid),
      output: target,
      cleanup: async () => {
        await stop();
        rmSync(target, { force: true });
      },
    };
  },
};

/** In table order. */
export function copyContenders(): CopyContender[] {
  return [
    svCopy('sv-d', false),
    svCopy('sv-d', true),
    virshRoundTrip('sv-d'),
    svCopy('libvirtd', false),
    virshRoundTrip('libvirtd'),
    nbdcopy,
    downloadFloor('sv-d'),
    downloadFloor('libvirtd'),
  ];
}

/** Which virsh round trip a copy row is compared with. */
const virshOf = (id: string): string | null =>
  id.startsWith('copy:sv-d/') ? 'virsh:sv-d/sv-d' : id.startsWith('copy:libvirtd/') ? 'virsh:libvirtd/sv-d' : null;

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const medianOrNull = (xs: Array<number | null>): number | null => {
  const v = xs.filter((x): x is number => x !== null);
  return v.length ? median(v) : null;
};

async function verify(img: BuiltImage, output: string): Promise<string | null> {
  if (!existsSync(output)) return 'no output';
  const d = await contentDigest(output);
  if (d.size !== img.spec.size) return `size ${d.size} != ${img.spec.size}`;
  if (d.digest !== img.digest) return `content SHA-256 differs (${d.digest.slice(0, 12)} != ${img.digest.slice(0, 12)})`;
  if (Math.abs(d.allocated - img.allocated) > 0.05 * img.allocated + MiB) {
    return `allocation ${fmtBytes(d.allocated)} vs source ${fmtBytes(img.allocated)} (tolerance 5% + 1 MiB)`;
  }
  return null;
}

/** Sets up the servers, runs every copy contender on every image, prints the table, cleans up. */
export async function runCopyBench(o: CopyBenchOptions): Promise<CopyBenchResult> {
  const { log } = o;
  const images = o.images.filter((i) => COPY_IMAGES.includes(i.spec.id));
  const wanted = copyContenders().filter((c) => (!o.only || o.only.test(c.id)) && !o.skip?.test(c.id));
  const cleanups: Array<() => Promise<void>> = [];
  const runDir = join(o.base, 'copy-run');
  const tmpDir = join(o.base, 'copy-tmp');
  mkdirSync(runDir, { recursive: true });
  mkdirSync(tmpDir, { recursive: true });
  const cli = join(o.repoRoot, 'dist', 'bin', 'sparsevirt.cjs');
  const daemonMain = join(o.repoRoot, 'dist', 'bin', 'sparsevirtd.mjs');
  const env: Env = {
    cli,
    src: { skip: 'not set up' },
    dst: { skip: 'not set up' },
    libvirt: { skip: 'not set up' },
    nbd: { skip: 'not set up' },
    runDir,
    tmpDir,
  };
  const records: CopyRunRecord[] = [];
  // interrupted: the daemons started here go too (the libvirtd pool is replaced by the next run)
  const pids: number[] = [];
  const onSignal = (): void => {
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGTERM');
      } catch {
        /* gone */
      }
    }
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  try {
    const [virshOk, nbdkitOk, nbdcopyOk] = await Promise.all([which('virsh'), which('nbdkit'), which('nbdcopy')]);
    env.nbd = !nbdkitOk ? { skip: 'nbdkit not installed (Debian: apt-get install nbdkit)' }
      : !nbdcopyOk ? { skip: 'nbdcopy not installed (Debian: apt-get install libnbd-bin)' } : true;
    const needOurs = wanted.some((c) => c !== nbdcopy);
    if (needOurs) {
      if (!existsSync(cli) || !existsSync(daemonMain)) {
        env.src = env.dst = { skip: 'not built yet (dist/bin/sparsevirt.cjs, dist/bin/sparsevirtd.mjs: npm run build)' };
      } else if (!virshOk) {
        env.src = env.dst = { skip: 'virsh needed to define the bench pools (Debian: apt-get install libvirt-clients)' };
      } else {
        const start = async (name: string, dir: string, pool: string): Promise<{ daemon: OurDaemon; pool: DirPool } | { skip: string }> => {
          const daemon = new OurDaemon(daemonMain, join(runDir, `${name}.sock`), join(o.base, `${name}-state`));
          try {
            await daemon.start();
            if (daemon.pid) pids.push(daemon.pid);
            cleanups.push(() => daemon.stop());
            const p = new DirPool(daemon.uri, pool, dir);
            await p.up();
            return { daemon, pool: p };
          } catch (err) {
            return { skip: `sparsevirtd not usable: ${(err as Error).message.slice(0, 300)}` };
          }
        };
        env.src = await start('copy-src', o.poolDir, SRC_POOL);
        env.dst = await start('copy-dst', join(o.base, 'copy-dst-pool'), DST_POOL);
      }
      if (o.libvirt && 'skip' in o.libvirt) env.libvirt = o.libvirt;
      else if (o.libvirt) env.libvirt = { ...o.libvirt, pid: await libvirtdPid() };
      else if (!virshOk) env.libvirt = { skip: 'virsh not installed (run: sudo scripts/setup-libvirt.sh)' };
      else {
        const probe = await virsh('qemu:///system', ['pool-list', '--all'], 15_000);
        if (probe.code !== 0) env.libvirt = { skip: `libvirtd not reachable: ${probe.stderr.trim().split('\n').pop()} (run: sudo scripts/setup-libvirt.sh)` };
        else {
          // a name of its own: a bench run elsewhere on this libvirtd keeps its pools
          const pool = new DirPool('qemu:///system', LIBVIRT_POOL, o.poolDir);
          await pool.up();
          cleanups.push(() => pool.down());
          env.libvirt = { uri: 'qemu:///system', pool, pid: await libvirtdPid() };
        }
      }
    }

    const skipped = new Map<string, string>();
    const active: CopyContender[] = [];
    for (const c of wanted) {
      const why = c.unavailable(env);
      if (why) skipped.set(c.id, why);
      else active.push(c);
    }
    log('');
    log('copy contenders (volume → volume, server to server):');
    for (const c of wanted) log(`  ${c.id.padEnd(22)} ${c.label.padEnd(48)} ${skipped.has(c.id) ? `SKIPPED: ${skipped.get(c.id)}` : 'ok'}`);

    if (active.length && images.length) {
      log('');
      log('copy runs:');
      for (let rep = 0; rep < o.reps; rep++) {
        for (const img of images) {
          const order = active.map((_, i) => active[(i + rep) % active.length]!);
          for (const c of order) {
            const rec: CopyRunRecord = {
              rep, image: img.spec.id, contender: c.id, ok: false, wallSeconds: Number.NaN,
              clientPeakKiB: null, daemonPeakKiB: null, clientCpuSeconds: null, serverCpuSeconds: null,
            };
            let cleanup: (() => Promise<void>) | undefined;
            try {
              const p = await c.prepare(env, img);
              cleanup = p.cleanup;
              const m = await measure(p.spec, p.daemonPids, o.timeoutMs);
              Object.assign(rec, { wallSeconds: m.wallSeconds, clientPeakKiB: m.clientPeakKiB, daemonPeakKiB: m.daemonPeakKiB, clientCpuSeconds: m.clientCpuSeconds, serverCpuSeconds: m.daemonCpuSeconds });
              if (m.timedOut) rec.error = `timed out after ${o.timeoutMs / 1000} s`;
              else if (m.exitCode !== 0) rec.error = `exit ${m.exitCode ?? m.signal}: ${m.output.split('\n').slice(-3).join(' | ')}`;
              else {
                const bad = await verify(img, p.output);
                rec.ok = bad === null;
                if (bad) rec.error = `verification: ${bad}`;
              }
            } catch (err) {
              rec.error = `setup: ${(err as Error).message}`;
            } finally {
              await cleanup?.().catch(() => undefined);
            }
            records.push(rec);
            const mem = (k: number | null): string => (k ? `${(k / 1024).toFixed(0)} MiB` : '-');
            const cpu = (x: number | null): string => (x === null ? '-' : x.toFixed(2));
            log(`  ${rep + 1}/${o.reps} ${img.spec.id} ${c.label.padEnd(48)} ${Number.isFinite(rec.wallSeconds) ? rec.wallSeconds.toFixed(3).padStart(8) : '       -'} s  `
              + `${rec.ok ? 'ok  ' : 'FAIL'} client ${mem(rec.clientPeakKiB).padStart(8)} servers ${mem(rec.daemonPeakKiB).padStart(8)}`
              + `  CPU s client ${cpu(rec.clientCpuSeconds)} servers ${cpu(rec.serverCpuSeconds)}${rec.error ? `  ${rec.error}` : ''}`);
          }
        }
      }
    }

    const rows: CopyRow[] = [];
    const medianOf = (image: string, id: string): number | null => {
      const t = records.filter((r) => r.image === image && r.contender === id && r.ok).map((r) => r.wallSeconds);
      return t.length ? median(t) : null;
    };
    for (const img of images) {
      const nbd = medianOf(img.spec.id, nbdcopy.id);
      for (const c of active) {
        const rs = records.filter((r) => r.image === img.spec.id && r.contender === c.id);
        const times = rs.filter((r) => r.ok).map((r) => r.wallSeconds);
        const med = times.length ? median(times) : null;
        const vr = virshOf(c.id);
        const vMed = vr ? medianOf(img.spec.id, vr) : null;
        const peak = (xs: Array<number | null>): number | null => {
          const v = xs.filter((x): x is number => x !== null);
          return v.length ? Math.max(...v) : null;
        };
        rows.push({
          image: img.spec.id, contender: c.id, label: c.label, runs: rs.length, failures: rs.length - times.length,
          medianSeconds: med, minSeconds: times.length ? Math.min(...times) : null, maxSeconds: times.length ? Math.max(...times) : null,
          dataMiBps: med ? img.dataBytes / MiB / med : null,
          clientPeakKiB: peak(rs.filter((r) => r.ok).map((r) => r.clientPeakKiB)),
          daemonPeakKiB: peak(rs.filter((r) => r.ok).map((r) => r.daemonPeakKiB)),
          clientCpuSeconds: medianOrNull(rs.filter((r) => r.ok).map((r) => r.clientCpuSeconds)),
          serverCpuSeconds: medianOrNull(rs.filter((r) => r.ok).map((r) => r.serverCpuSeconds)),
          ratioToVirsh: med !== null && vMed ? med / vMed : null,
          ratioToNbdcopy: med !== null && nbd && c !== nbdcopy ? med / nbd : null,
          errors: [...new Set(rs.filter((r) => !r.ok).map((r) => r.error ?? '?'))],
        });
      }
    }

    const targets: CopyBenchResult['targets'] = [];
    for (const img of images) {
      const m = (id: string) => medianOf(img.spec.id, id);
      const ratio = (a: number | null, b: number | null): number | null => (a !== null && b ? a / b : null);
      const add = (what: string, r: number | null, limit: number, target: string) =>
        targets.push({ image: img.spec.id, what, ratio: r, target, met: r === null ? null : r <= limit });
      add('vol-copy sv-d→sv-d / virsh round trip sv-d→sv-d', ratio(m('copy:sv-d/sv-d'), m('virsh:sv-d/sv-d')), 0.5, '≤ 0.5');
      add('vol-copy libvirtd→sv-d / virsh round trip libvirtd→sv-d', ratio(m('copy:libvirtd/sv-d'), m('virsh:libvirtd/sv-d')), 0.5, '≤ 0.5');
      add('vol-copy sv-d→sv-d / nbdcopy', ratio(m('copy:sv-d/sv-d'), m(nbdcopy.id)), 1, '≤ 1');
      add('vol-copy libvirtd→sv-d / nbdcopy', ratio(m('copy:libvirtd/sv-d'), m(nbdcopy.id)), 1, '≤ 1');
      add('vol-copy sv-d→sv-d --verify / without', ratio(m('copy:sv-d/sv-d+verify'), m('copy:sv-d/sv-d')), 1.2, '≤ 1.2');
    }
    printCopyTable(log, images, rows, targets);
    const failures = records.filter((r) => !r.ok).length;
    return {
      contenders: wanted.map((c) => ({ id: c.id, label: c.label, skipped: skipped.get(c.id) ?? null })),
      rows, runs: records, targets, failures,
    };
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    for (const f of cleanups.reverse()) await f().catch(() => undefined);
    rmSync(runDir, { recursive: true, force: true });
    rmSync(tmpDir, { recursive: true, force: true });
    rmSync(join(o.base, 'copy-dst-pool'), { recursive: true, force: true });
  }
}

function printCopyTable(log: (m?: string) => void, images: BuiltImage[], rows: CopyRow[], targets: CopyBenchResult['targets']): void {
  const f = (x: number | null, d = 3): string => (x === null ? '-' : x.toFixed(d));
  const mib = (k: number | null): string => (k === null ? '-' : `${(k / 1024).toFixed(0)} MiB`);
  log('');
  log('copy results (wall time incl. process start; ×virsh = median / median of the virsh round trip between the same servers, '
    + '×nbdcopy = median / median of nbdcopy; < 1 is faster; servers RSS: the peak of the source and destination servers):');
  for (const img of images) {
    log('');
    log(`copy ${img.spec.id}  —  ${img.spec.title}; ${fmtBytes(img.dataBytes)} data of ${fmtBytes(img.spec.size)}`);
    const header = ['contender', 'median s', 'min–max s', 'data MiB/s', '×virsh', '×nbdcopy', 'client RSS', 'servers RSS', 'client CPU s', 'servers CPU s', 'runs'];
    const body = rows.filter((r) => r.image === img.spec.id).map((r) => [
      r.label, f(r.medianSeconds), r.minSeconds === null ? '-' : `${f(r.minSeconds)}–${f(r.maxSeconds)}`,
      r.dataMiBps === null ? '-' : r.dataMiBps.toFixed(0), f(r.ratioToVirsh, 2), f(r.ratioToNbdcopy, 2),
      mib(r.clientPeakKiB), mib(r.daemonPeakKiB), f(r.clientCpuSeconds, 2), f(r.serverCpuSeconds, 2), r.failures ? `${r.runs - r.failures}/${r.runs} FAIL: ${r.errors[0] ?? ''}` : `${r.runs}`,
    ]);
    const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
    const line = (cells: string[]): string =>
      `  ${cells.map((c, i) => (i === 0 || i === cells.length - 1 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ')}`;
    log(line(header));
    for (const b of body) log(line(b));
  }
  if (targets.length) {
    log('');
    log('copy targets:');
    for (const t of targets) {
      log(`  ${t.image}  ${t.what.padEnd(56)} ${t.ratio === null ? '    -' : t.ratio.toFixed(2).padStart(5)}  target ${t.target}  ${t.met === null ? 'not measured' : t.met ? 'met' : 'MISSED'}`);
    }
  }
}

// ------------------------------------------------------------------------------ standalone

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      quick: { type: 'boolean', default: false },
      reps: { type: 'string' },
      images: { type: 'string', default: COPY_IMAGES.join(',') },
      only: { type: 'string' },
      skip: { type: 'string' },
      dir: { type: 'string' },
      keep: { type: 'boolean', default: false },
      timeout: { type: 'string' },
      build: { type: 'string' },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(`usage: node dist/bench/copy.js [--quick] [--reps N] [--images a,b] [--only REGEX] [--skip REGEX] [--dir DIR] [--keep] [--timeout SEC] [--build ROOT]
  The copy rows of npm run bench alone (contender ids: ${copyContenders().map((c) => c.id).join(', ')}).
  --build ROOT runs the CLI and daemon of ROOT/dist/bin (another checkout's build) in this harness.
`);
    return 0;
  }
  const quick = values.quick ?? false;
  const base = values.dir ?? '/dev/shm/sparsevirt-copy-bench';
  const poolDir = join(base, 'pool');
  mkdirSync(poolDir, { recursive: true });
  const log = (m = ''): void => {
    process.stdout.write(`${m}\n`);
  };
  const specs = imageSpecs(quick).filter((s) => values.images!.split(',').includes(s.id) && COPY_IMAGES.includes(s.id));
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    // after runCopyBench's own handler (the same signal) has stopped its daemons
    process.on(sig, () => setImmediate(() => {
      if (!values.keep) rmSync(base, { recursive: true, force: true });
      process.exit(130);
    }));
  }
  log(`images (${quick ? 'quick' : 'full'} set):`);
  const images = await buildImages(specs, poolDir, (m) => log(`  ${m}`));
  try {
    const r = await runCopyBench({
      images, base, poolDir, repoRoot: values.build ?? fileURLToPath(new URL('../../', import.meta.url)),
      reps: values.reps ? Number.parseInt(values.reps, 10) : quick ? 3 : 5,
      timeoutMs: (values.timeout ? Number(values.timeout) : quick ? 60 : 300) * 1000,
      only: values.only ? new RegExp(values.only) : null, skip: values.skip ? new RegExp(values.skip) : null, log,
    });
    log('');
    log(`${r.runs.length} copy runs, ${r.failures} failed`);
    return r.failures ? 1 : 0;
  } finally {
    if (!values.keep) rmSync(base, { recursive: true, force: true });
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  main().then((code) => process.exit(code), (err: unknown) => {
    console.error(err instanceof Error ? err.stack ?? err.message : err);
    process.exit(1);
  });
}
