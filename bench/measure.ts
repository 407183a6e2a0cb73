/**
 * Runs one timed command: wall time from spawn to exit (process start included), peak RSS of
 * the client (GNU time's %M when /usr/bin/time exists, else polling /proc/<pid>/status VmHWM
 * every 10 ms) and peak RSS of the daemons serving it (their VmHWM reset through
 * /proc/<pid>/clear_refs before the run and read after it; else VmRSS polled every 10 ms).
 */
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface RunSpec {
  cmd: string;
  args: string[];
  env?: Record<string, string>;
  cwd?: string;
}

export interface Measured {
  wallSeconds: number;
  exitCode: number | null;
  signal: string | null;
  timedOut: boolean;
  /** Last lines of stderr (and stdout) for error reports. */
  output: string;
  clientPeakKiB: number | null;
  clientCpuSeconds: number | null;
  daemonPeakKiB: number | null;
  /** CPU time (user + system) the daemons spent during the run, from /proc/PID/stat. */
  daemonCpuSeconds: number | null;
  /** How the client / daemon peaks were measured. */
  rssMethod: { client: string; daemon: string };
}

const GNU_TIME = '/usr/bin/time';
export const haveGnuTime = existsSync(GNU_TIME);

function statusField(pid: number, field: 'VmHWM' | 'VmRSS'): number | null {
  try {
    const s = readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(s);
    return m ? Number(m[1]) : null;
  } catch {
    return null;
  }
}

/** Resets the peak RSS (VmHWM) of `pid` to its current RSS. Linux ≥ 4.0; needs ownership/root. */
function resetPeak(pid: number): boolean {
  try {
    writeFileSync(`/proc/${pid}/clear_refs`, '5');
    return true;
  } catch {
    return false;
  }
}

/** utime + stime of `pid` in seconds (/proc/PID/stat), null when it is gone. */
function cpuSeconds(pid: number): number | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLOCK_TICKS;
  } catch {
    return null;
  }
}
/** USER_HZ: 100 on every Linux architecture Node runs on. */
const CLOCK_TICKS = 100;

let seq = 0;

export async function measure(spec: RunSpec, daemonPids: number[], timeoutMs: number): Promise<Measured> {
  const timeFile = join(tmpdir(), `sparsevirt-bench-time-${process.pid}-${++seq}`);
  const useTime = haveGnuTime;
  const cmd = useTime ? GNU_TIME : spec.cmd;
  const args = useTime ? ['-f', '%M %U %S', '-o', timeFile, spec.cmd, ...spec.args] : spec.args;

  const live = daemonPids.filter((p) => existsSync(`/proc/${p}`));
  const resetOk = live.map((p) => resetPeak(p));
  let daemonPolled = 0;
  for (const p of live) daemonPolled = Math.max(daemonPolled, statusField(p, 'VmRSS') ?? 0);
  let clientPolled = 0;
  const cpuBefore = live.map((p) => cpuSeconds(p));

  const t0 = performance.now();
  const child = spawn(cmd, args, {
    cwd: spec.cwd,
    env: { ...process.env, ...spec.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  const keep = (d: Buffer): void => {
    out += d.toString('utf8');
    if (out.length > 16_384) out = out.slice(-8192);
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);

  const poll = setInterval(() => {
    for (const p of live) daemonPolled = Math.max(daemonPolled, statusField(p, 'VmRSS') ?? 0);
    if (!useTime && child.pid) {
      clientPolled = Math.max(clientPolled, statusField(child.pid, 'VmHWM') ?? 0);
    }
  }, 10);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, timeoutMs);

  const { code, signal } = await new Promise<{ code: number | null; signal: string | null }>((resolve) => {
    child.on('error', (err) => {
      keep(Buffer.from(String(err.message)));
      resolve({ code: 127, signal: null });
    });
    child.on('close', (c, s) => resolve({ code: c, signal: s }));
  });
  const wallSeconds = (performance.now() - t0) / 1000;
  clearInterval(poll);
  clearTimeout(timer);

  let clientPeakKiB: number | null = clientPolled || null;
  let clientCpuSeconds: number | null = null;
  if (useTime) {
    try {
      // With -o, GNU time may prepend "Command exited with non-zero status N".
      const lines = readFileSync(timeFile, 'utf8').trim().split('\n');
      const [m, u, s] = lines[lines.length - 1]!.trim().split(/\s+/).map(Number);
      if (Number.isFinite(m)) clientPeakKiB = m!;
      if (Number.isFinite(u) && Number.isFinite(s)) clientCpuSeconds = u! + s!;
    } catch {
      /* killed before writing */
    }
    rmSync(timeFile, { force: true });
  }

  let daemonCpuSeconds: number | null = null;
  live.forEach((p, i) => {
    const a = cpuBefore[i];
    const b = cpuSeconds(p);
    if (a !== null && a !== undefined && b !== null) daemonCpuSeconds = (daemonCpuSeconds ?? 0) + (b - a);
  });
  let daemonPeakKiB: number | null = null;
  if (live.length > 0) {
    let peak = daemonPolled;
    live.forEach((p, i) => {
      if (resetOk[i]) peak = Math.max(peak, statusField(p, 'VmHWM') ?? 0);
    });
    daemonPeakKiB = peak || null;
  }

  return {
    wallSeconds,
    exitCode: code,
    signal,
    timedOut,
    output: out.trim().split('\n').slice(-12).join('\n'),
    clientPeakKiB,
    clientCpuSeconds,
    daemonPeakKiB,
    daemonCpuSeconds,
    rssMethod: {
      client: useTime ? 'GNU time %M' : 'poll VmHWM 10 ms',
      daemon: live.length === 0 ? '-' : resetOk.every(Boolean) ? 'VmHWM after clear_refs' : 'poll VmRSS 10 ms',
    },
  };
}
