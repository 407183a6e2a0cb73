/**
 * qemu-img, run the way libvirtd 9.0's storage driver runs it for qcow2 and the other formats
 * it does not write itself. Recorded from libvirtd 9.0 (execve of its qemu-img children):
 *
 *   vol-create-as … --format qcow2                 create -f qcow2 -o compat=0.10 PATH 10240K
 *   … --prealloc-metadata --allocation 0           create -f qcow2 -o preallocation=metadata,compat=0.10 …
 *   … --prealloc-metadata (allocation = capacity)  create -f qcow2 -o preallocation=falloc,compat=0.10 …
 *   … --backing-vol a.qcow2 --backing-vol-format qcow2
 *                                                  create -f qcow2 -b /abs/a.qcow2 -o backing_fmt=qcow2,compat=0.10 …
 *   <compat>1.1</compat><features><lazy_refcounts/>  -o compat=1.1,lazy_refcounts (features without compat: 1.1)
 *   vol-create-as … --format qed|vmdk              create -f qed PATH 10240K (no -o)
 *   vol-create-from raw → qcow2                    convert -f raw -O qcow2 -o compat=0.10 SRC DST
 *   vol-create-from qcow2 → raw                    convert -f qcow2 -O raw SRC DST
 *   vol-clone of a qcow2                           convert -f qcow2 -O qcow2 -o compat=0.10,cluster_size=65536 SRC DST
 *   vol-resize                                     resize [--shrink] PATH BYTES
 *
 * The size of `create` is the capacity in KiB rounded up (`${ceil(capacity / 1024)}K`), as libvirt.
 * Differences here, for safety: `-f FMT` is also given to `resize`; `--` ends the options before
 * file names; paths must be absolute (so never taken for an option or a protocol); an existing
 * destination is refused unless `overwrite` is set; every run is bounded in time, and a failure
 * carries qemu-img's stderr.
 */
import { execFile } from 'node:child_process';
import { constants as FS } from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { SparsevirtError } from '../../errors.js';
import { isImageFormat, type ImageFormat } from './probe.js';

/** Formats qemu-img can create or convert to, by libvirt's names. */
export const WRITABLE_FORMATS = ['raw', 'qcow2', 'qcow', 'qed', 'vmdk', 'vdi', 'vpc'] as const;
export type WritableFormat = (typeof WRITABLE_FORMATS)[number];

export const QEMU_IMG_PACKAGE = 'qemu-utils';

/** Default time bounds (ms): convert copies data, the rest only touch metadata. */
export const DEFAULT_TIMEOUTS = { create: 120_000, resize: 120_000, convert: 3_600_000, check: 600_000, info: 60_000 } as const;

export class QemuImgError extends SparsevirtError {
  readonly argv: string[];
  readonly exitCode: number | null;
  readonly stderr: string;
  constructor(code: string, message: string, argv: string[], exitCode: number | null, stderr: string, cause?: unknown) {
    super(code, message, { cause });
    this.name = 'QemuImgError';
    this.argv = argv;
    this.exitCode = exitCode;
    this.stderr = stderr;
  }
}

// ------------------------------------------------------------------ finding qemu-img

const found = new Map<string, string>();

export interface FindOptions {
  /** Environment to read PATH and SPARSEVIRT_QEMU_IMG from (default process.env). */
  env?: NodeJS.ProcessEnv;
}

/**
 * The qemu-img to run: $SPARSEVIRT_QEMU_IMG if set (an absolute path), else the first executable
 * `qemu-img` on PATH. Missing: SparsevirtError('ERR_QEMU_IMG_NOT_FOUND') naming the Debian package.
 */
export async function findQemuImg(opts: FindOptions = {}): Promise<string> {
  const env = opts.env ?? process.env;
  const override = env.SPARSEVIRT_QEMU_IMG;
  if (override) {
    if (!path.isAbsolute(override)) {
      throw new SparsevirtError('ERR_INVALID_ARG', `SPARSEVIRT_QEMU_IMG must be an absolute path, got ${JSON.stringify(override)}`);
    }
    if (!(await isExecutable(override))) {
      throw new SparsevirtError('ERR_QEMU_IMG_NOT_FOUND', `SPARSEVIRT_QEMU_IMG=${override} is not an executable file`);
    }
    return override;
  }
  const pathVar = env.PATH ?? '';
  const cached = found.get(pathVar);
  if (cached && (await isExecutable(cached))) return cached;
  for (const dir of pathVar.split(':')) {
    if (!dir || !path.isAbsolute(dir)) continue;
    const cand = path.join(dir, 'qemu-img');
    if (await isExecutable(cand)) {
      found.set(pathVar, cand);
      return cand;
    }
  }
  throw new SparsevirtError(
    'ERR_QEMU_IMG_NOT_FOUND',
    `qemu-img was not found on PATH (${pathVar || 'empty'}); it is needed for qcow2 and the other non-raw formats: install the Debian package ${QEMU_IMG_PACKAGE} (apt-get install ${QEMU_IMG_PACKAGE})`,
  );
}

async function isExecutable(p: string): Promise<boolean> {
  try {
    const st = await fsp.stat(p);
    if (!st.isFile()) return false;
    await fsp.access(p, FS.X_OK);
    return true;
  } catch {
    return false;
  }
}

// ------------------------------------------------------------------ running it

export interface RunOptions {
  /** Kill qemu-img (SIGKILL) after this many ms. */
  timeoutMs?: number;
  signal?: AbortSignal;
  /** The qemu-img binary (default: findQemuImg()). */
  qemuImg?: string;
}

export interface RunResult {
  argv: string[];
  stdout: string;
  stderr: string;
  exitCode: number;
}

/**
 * Run qemu-img with `args` (no shell), LC_ALL=C. Resolves for the exit codes in `okCodes`
 * (default [0]); otherwise rejects with QemuImgError: ERR_QEMU_IMG (exit code and stderr in the
 * message), ERR_TIMEOUT, ERR_ABORTED.
 */
export async function runQemuImg(args: string[], opts: RunOptions & { okCodes?: number[]; defaultTimeoutMs?: number } = {}): Promise<RunResult> {
  const bin = opts.qemuImg ?? (await findQemuImg());
  const timeout = opts.timeoutMs ?? opts.defaultTimeoutMs ?? 120_000;
  const argv = [bin, ...args];
  const okCodes = opts.okCodes ?? [0];
  return new Promise((resolve, reject) => {
    const child = execFile(
      bin,
      args,
      {
        env: { ...process.env, LC_ALL: 'C' },
        timeout,
        killSignal: 'SIGKILL',
        maxBuffer: 16 * 1024 * 1024,
        encoding: 'utf8',
        ...(opts.signal ? { signal: opts.signal } : {}),
      },
      (err, stdout, stderr) => {
        const exitCode = typeof child.exitCode === 'number' ? child.exitCode : null;
        if (!err) return resolve({ argv, stdout, stderr, exitCode: 0 });
        const e = err as NodeJS.ErrnoException & { killed?: boolean; signal?: string | null; code?: unknown };
        if (e.name === 'AbortError' || opts.signal?.aborted) {
          return reject(new QemuImgError('ERR_ABORTED', `qemu-img ${args[0]} aborted`, argv, exitCode, stderr, err));
        }
        if (e.killed && e.signal === 'SIGKILL') {
          return reject(new QemuImgError('ERR_TIMEOUT', `qemu-img ${args[0]} did not finish within ${timeout} ms${stderr ? `: ${stderr.trim()}` : ''}`, argv, exitCode, stderr, err));
        }
        if (e.code === 'ENOENT' || e.code === 'EACCES') {
          return reject(new QemuImgError('ERR_QEMU_IMG_NOT_FOUND', `cannot run ${bin}: ${e.message}; install the Debian package ${QEMU_IMG_PACKAGE}`, argv, null, stderr, err));
        }
        if (e.code === 'ERR_CHILD_PROCESS_STDIO_MAXBUFFER') {
          return reject(new QemuImgError('ERR_QEMU_IMG', `qemu-img ${args[0]} wrote more output than expected`, argv, exitCode, stderr.slice(0, 4096), err));
        }
        const code = typeof e.code === 'number' ? e.code : exitCode;
        if (code !== null && okCodes.includes(code)) return resolve({ argv, stdout, stderr, exitCode: code });
        const why = stderr.trim() || stdout.trim() || `signal ${e.signal ?? 'unknown'}`;
        reject(new QemuImgError('ERR_QEMU_IMG', `qemu-img ${args[0]} failed (exit ${code ?? 'none'}): ${why}`, argv, code, stderr, err));
      },
    );
  });
}

// ------------------------------------------------------------------ argument checks

function invalid(msg: string): SparsevirtError {
  return new SparsevirtError('ERR_INVALID_ARG', msg);
}

function checkPath(p: unknown, what: string): string {
  if (typeof p !== 'string' || p.length === 0) throw invalid(`${what} must be a non-empty string`);
  if (p.includes('\0')) throw invalid(`${what} must not contain NUL`);
  if (!path.isAbsolute(p)) throw invalid(`${what} must be an absolute path, got ${JSON.stringify(p)}`);
  return p;
}

function checkFormat(f: unknown, what: string): WritableFormat {
  if (typeof f !== 'string' || !(WRITABLE_FORMATS as readonly string[]).includes(f)) {
    throw invalid(`${what} must be one of ${WRITABLE_FORMATS.join(', ')}, got ${JSON.stringify(f)}`);
  }
  return f as WritableFormat;
}

function checkReadableFormat(f: unknown, what: string): ImageFormat {
  if (typeof f !== 'string' || !isImageFormat(f) || f === 'none' || f === 'dir' || f === 'fat' || f === 'vhd') {
    throw invalid(`${what} must be an image format qemu-img reads, got ${JSON.stringify(f)}`);
  }
  return f;
}

const MAX_SIZE = (1n << 63n) - 1n;

function checkSize(n: unknown, what: string): bigint {
  let v: bigint;
  if (typeof n === 'bigint') v = n;
  else if (typeof n === 'number' && Number.isSafeInteger(n)) v = BigInt(n);
  else throw invalid(`${what} must be an integer byte count (number up to 2^53 or bigint), got ${String(n)}`);
  if (v < 0n || v > MAX_SIZE) throw invalid(`${what} must be between 0 and 2^63-1, got ${v}`);
  return v;
}

/** A backing name for -b: relative names are relative to the new image's directory. */
function backingArg(name: string): string {
  if (name.length === 0 || name.includes('\0')) throw invalid('backing path must be a non-empty string without NUL');
  if (path.isAbsolute(name)) return name;
  // A relative name that looks like an option or a protocol ("nbd:x") gets a "./" prefix:
  // the same file for qemu, never anything else.
  const colon = name.indexOf(':');
  const slash = name.indexOf('/');
  if (name.startsWith('-') || (colon >= 0 && (slash < 0 || colon < slash))) return `./${name}`;
  return name;
}

async function refuseExisting(p: string, overwrite: boolean | undefined): Promise<void> {
  if (overwrite) return;
  try {
    await fsp.lstat(p);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new SparsevirtError('ERR_IO', `${p}: ${(err as Error).message}`, { cause: err });
  }
  throw new SparsevirtError('ERR_EXISTS', `${p} already exists (pass overwrite: true to replace it)`);
}

export type Compat = '0.10' | '1.1';
export type Preallocation = 'metadata' | 'falloc';

interface QcowOptions {
  /** qcow2 only; default '0.10' as libvirtd ('1.1' when lazyRefcounts or extendedL2 is asked). */
  compat?: Compat;
  /** qcow2 only; needs compat 1.1. */
  lazyRefcounts?: boolean;
  /** qcow2 only: the cluster size in bytes (a power of two, 512..2 MiB). */
  clusterSize?: number;
  /**
   * 'metadata' (qcow2 only: L2 tables written, data sparse) or 'falloc' (all of the capacity
   * allocated: never on tmpfs for big images). libvirtd uses 'metadata' when the allocation is
   * below the capacity and 'falloc' when they are equal.
   */
  preallocation?: Preallocation;
}

/** The -o value libvirtd would pass, in its order. Empty string: no -o at all. */
export function buildOptions(format: WritableFormat, o: QcowOptions & { backingFormat?: ImageFormat }): string {
  const parts: string[] = [];
  const qcow2 = format === 'qcow2';
  if (!qcow2 && (o.compat !== undefined || o.lazyRefcounts || o.clusterSize !== undefined)) {
    throw invalid(`compat, lazyRefcounts and clusterSize are qcow2 options, not ${format}`);
  }
  if (o.backingFormat) parts.push(`backing_fmt=${o.backingFormat}`);
  if (o.preallocation !== undefined) {
    if (o.preallocation !== 'metadata' && o.preallocation !== 'falloc') throw invalid(`preallocation must be 'metadata' or 'falloc'`);
    if (o.preallocation === 'metadata' && !qcow2) throw invalid(`metadata preallocation is not supported for ${format} volumes`);
    if (o.preallocation === 'falloc' && !qcow2 && format !== 'raw') throw invalid(`falloc preallocation is not supported for ${format} volumes`);
    parts.push(`preallocation=${o.preallocation}`);
  }
  if (qcow2) {
    if (o.compat !== undefined && o.compat !== '0.10' && o.compat !== '1.1') throw invalid(`compat must be '0.10' or '1.1'`);
    const compat = o.compat ?? (o.lazyRefcounts ? '1.1' : '0.10');
    if (o.lazyRefcounts && compat === '0.10') throw invalid('lazy_refcounts not supported with compat level 0.10');
    parts.push(`compat=${compat}`);
    if (o.clusterSize !== undefined) {
      const c = o.clusterSize;
      if (!Number.isSafeInteger(c) || c < 512 || c > 2 * 1024 * 1024 || (c & (c - 1)) !== 0) {
        throw invalid(`clusterSize must be a power of two between 512 and 2097152, got ${c}`);
      }
      parts.push(`cluster_size=${c}`);
    }
    if (o.lazyRefcounts) parts.push('lazy_refcounts');
  }
  return parts.join(',');
}

// ------------------------------------------------------------------ operations

export interface CreateImageOptions extends QcowOptions, RunOptions {
  path: string;
  format: WritableFormat;
  /** Virtual size in bytes (rounded up to KiB as libvirtd does). Optional with a backing file. */
  capacity?: bigint | number;
  /** A backing file: absolute, or relative to the new image's directory; its format is required. */
  backing?: { path: string; format: ImageFormat };
  /** Replace an existing file (default: refuse with ERR_EXISTS). */
  overwrite?: boolean;
}

/** `qemu-img create` as libvirtd runs it. Resolves with the argv run. */
export async function createImage(o: CreateImageOptions): Promise<{ argv: string[] }> {
  const file = checkPath(o.path, 'path');
  const format = checkFormat(o.format, 'format');
  const args = ['create', '-f', format];
  let backingFormat: ImageFormat | undefined;
  if (o.backing) {
    backingFormat = checkReadableFormat(o.backing.format, 'backing format');
    args.push('-b', backingArg(o.backing.path));
  }
  if (o.capacity === undefined && !o.backing) throw invalid('capacity is required without a backing file');
  const opts = buildOptions(format, { ...o, ...(backingFormat ? { backingFormat } : {}) });
  if (opts) args.push('-o', opts);
  args.push('--', file);
  if (o.capacity !== undefined) {
    const cap = checkSize(o.capacity, 'capacity');
    args.push(`${(cap + 1023n) / 1024n}K`);
  }
  await refuseExisting(file, o.overwrite);
  const r = await runQemuImg(args, { ...o, defaultTimeoutMs: DEFAULT_TIMEOUTS.create });
  return { argv: r.argv };
}

export interface ResizeOptions extends RunOptions {
  /** Needed to make the image smaller (qemu-img refuses otherwise; libvirtd passes it then). */
  shrink?: boolean;
}

/** `qemu-img resize [--shrink] -f FMT -- PATH BYTES`. */
export async function resizeImage(file: string, format: ImageFormat, newSize: bigint | number, o: ResizeOptions = {}): Promise<{ argv: string[] }> {
  checkPath(file, 'path');
  const fmt = checkReadableFormat(format, 'format');
  const size = checkSize(newSize, 'newSize');
  const args = ['resize'];
  if (o.shrink) args.push('--shrink');
  args.push('-f', fmt, '--', file, size.toString());
  const r = await runQemuImg(args, { ...o, defaultTimeoutMs: DEFAULT_TIMEOUTS.resize });
  return { argv: r.argv };
}

export interface ConvertOptions extends QcowOptions, RunOptions {
  /** Keep zero runs of the source as holes (qemu-img's default, -S 4k); false writes them (-S 0). */
  sparse?: boolean;
  /** Replace an existing destination (default: refuse with ERR_EXISTS). */
  overwrite?: boolean;
}

/**
 * `qemu-img convert -f SRCFMT -O DSTFMT [-o …] -- SRC DST`: clone or create-from between formats.
 * A qcow2 source with a backing chain is read through it (the copy is flattened).
 */
export async function convertImage(
  src: string, srcFormat: ImageFormat, dst: string, dstFormat: WritableFormat, o: ConvertOptions = {},
): Promise<{ argv: string[] }> {
  checkPath(src, 'src');
  checkPath(dst, 'dst');
  const sf = checkReadableFormat(srcFormat, 'srcFormat');
  const df = checkFormat(dstFormat, 'dstFormat');
  if (path.resolve(src) === path.resolve(dst)) throw invalid('src and dst are the same file');
  const args = ['convert', '-f', sf, '-O', df];
  const opts = buildOptions(df, o);
  if (opts) args.push('-o', opts);
  if (o.sparse === false) args.push('-S', '0');
  args.push('--', src, dst);
  await refuseExisting(dst, o.overwrite);
  const r = await runQemuImg(args, { ...o, defaultTimeoutMs: DEFAULT_TIMEOUTS.convert });
  return { argv: r.argv };
}

export interface CheckResult {
  /** False for formats qemu-img cannot check (raw): exit 63. */
  supported: boolean;
  /** 0 clean, 2 corruptions, 3 leaked clusters (qemu-img check's exit codes). */
  exitCode: number;
  /** `qemu-img check --output=json`, when supported. */
  report: QemuCheckReport | null;
}

export interface QemuCheckReport {
  filename: string;
  format: string;
  'check-errors': number;
  corruptions?: number;
  leaks?: number;
  'image-end-offset'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  [k: string]: unknown;
}

/** `qemu-img check --output=json -f FMT -- PATH` (read-only). */
export async function checkImage(file: string, format: ImageFormat, o: RunOptions = {}): Promise<CheckResult> {
  checkPath(file, 'path');
  const fmt = checkReadableFormat(format, 'format');
  const r = await runQemuImg(['check', '--output=json', '-f', fmt, '--', file], { ...o, okCodes: [0, 2, 3, 63], defaultTimeoutMs: DEFAULT_TIMEOUTS.check });
  if (r.exitCode === 63) return { supported: false, exitCode: 63, report: null };
  return { supported: true, exitCode: r.exitCode, report: parseJson<QemuCheckReport>(r, 'check') };
}

export interface QemuImageInfo {
  filename: string;
  format: string;
  'virtual-size': number;
  'actual-size'?: number;
  'cluster-size'?: number;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  'dirty-flag'?: boolean;
  encrypted?: boolean;
  'format-specific'?: { type: string; data: Record<string, unknown> };
  [k: string]: unknown;
}

export interface InfoOptions extends RunOptions {
  /** Give the format (recommended: without it qemu-img probes). */
  format?: ImageFormat;
  /** The whole chain: an array, the image first. */
  backingChain?: boolean;
}

/** `qemu-img info --output=json -U [-f FMT] [--backing-chain] -- PATH`. */
export async function infoImage(file: string, o: InfoOptions & { backingChain: true }): Promise<QemuImageInfo[]>;
export async function infoImage(file: string, o?: InfoOptions): Promise<QemuImageInfo>;
export async function infoImage(file: string, o: InfoOptions = {}): Promise<QemuImageInfo | QemuImageInfo[]> {
  checkPath(file, 'path');
  const args = ['info', '--output=json', '-U'];
  if (o.format !== undefined) args.push('-f', checkReadableFormat(o.format, 'format'));
  if (o.backingChain) args.push('--backing-chain');
  args.push('--', file);
  const r = await runQemuImg(args, { ...o, defaultTimeoutMs: DEFAULT_TIMEOUTS.info });
  return parseJson<QemuImageInfo | QemuImageInfo[]>(r, 'info');
}

function parseJson<T>(r: RunResult, what: string): T {
  try {
    return JSON.parse(r.stdout) as T;
  } catch (err) {
    throw new QemuImgError('ERR_QEMU_IMG', `qemu-img ${what} printed no JSON: ${r.stdout.slice(0, 200)}`, r.argv, r.exitCode, r.stderr, err);
  }
}

/** `qemu-img --version`: e.g. "7.2.22". */
export async function qemuImgVersion(o: RunOptions = {}): Promise<string> {
  const r = await runQemuImg(['--version'], { ...o, defaultTimeoutMs: 10_000 });
  const m = /qemu-img version (\S+)/.exec(r.stdout);
  if (!m) throw new QemuImgError('ERR_QEMU_IMG', `unexpected qemu-img --version output: ${r.stdout.slice(0, 200)}`, r.argv, 0, r.stderr);
  return m[1]!;
}
