/**
 * Support for the CLI tests: run `sparsevirt` (the built bin) and real `virsh` with the same
 * arguments and compare stdout, stderr and exit status byte for byte.
 *
 * The server both talk to is `SPARSEVIRT_CLI_URI` (default: the helpers' libvirtd URI,
 * qemu:///system), so the same golden tests can run against sparsevirtd:
 * `SPARSEVIRT_CLI_URI='sparsevirt+unix:///system?socket=…' node --test dist/test/cli*.test.js`.
 */
import assert from 'node:assert/strict';
import { readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestContext } from 'node:test';
import { withScratchDir } from './helpers/images.js';
import { LIBVIRTD_URI, requireLibvirt } from './helpers/libvirt.js';
import { runBytes, type RunOptions, type RunResult as Result } from './helpers/run.js';

export type { RunOptions };

/** dist/test/cli-support.js → dist/bin/sparsevirt.cjs: the program users run (`bin`: the launcher of the bundle). */
export const CLI_MAIN = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../bin/sparsevirt.cjs');

/** The server under test. */
export const CLI_URI = process.env.SPARSEVIRT_CLI_URI ?? LIBVIRTD_URI;

export type RunResult = Result<Buffer>;

/** A program's run, output as bytes; 120 s unless told. */
function exec(file: string, args: string[], opts: RunOptions): Promise<RunResult> {
  return runBytes(file, args, { ...opts, timeoutMs: opts.timeoutMs ?? 120_000 });
}

/** `virsh ARGS` exactly as given (no -c added). */
export function virshRaw(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return exec('virsh', args, opts);
}

/** `sparsevirt ARGS` exactly as given. */
export function cliRaw(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return exec(process.execPath, [CLI_MAIN, ...args], opts);
}

/** `sparsevirt -c CLI_URI ARGS`. */
export function cli(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return cliRaw(['-c', CLI_URI, ...args], opts);
}

/** `virsh -c CLI_URI ARGS`. */
export function virshC(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return virshRaw(['-c', CLI_URI, ...args], opts);
}

export function show(r: RunResult): string {
  return `exit ${r.code}\n--- stdout\n${r.stdout.toString('utf8')}--- stderr\n${r.stderr.toString('utf8')}`;
}

/** Asserts identical stdout, stderr (bytes) and exit status. */
export function assertSame(ours: RunResult, theirs: RunResult, what: string): void {
  if (ours.code === theirs.code && ours.stdout.equals(theirs.stdout) && ours.stderr.equals(theirs.stderr)) return;
  assert.equal(show(ours), show(theirs), `sparsevirt differs from virsh for: ${what}`);
}

export function isSame(a: RunResult, b: RunResult): boolean {
  return a.code === b.code && a.stdout.equals(b.stdout) && a.stderr.equals(b.stderr);
}

/**
 * Runs virsh, then sparsevirt, with `args` (raw: include -c yourself) and asserts identical
 * results. `retries`: for output that other processes can change between the two runs (the
 * free space of /dev/shm, the host's list of pools), the pair is rerun until they agree.
 */
export async function same(args: string[], opts: RunOptions & { retries?: number } = {}): Promise<RunResult> {
  let theirs = await virshRaw(args, opts);
  let ours = await cliRaw(args, opts);
  for (let i = 0; i < (opts.retries ?? 0) && !isSame(ours, theirs); i++) {
    theirs = await virshRaw(args, opts);
    ours = await cliRaw(args, opts);
  }
  assertSame(ours, theirs, args.join(' '));
  return ours;
}

/** Whether the server under test answers; skips (locally) or fails (CI) like requireLibvirt. */
export async function requireServer(t: TestContext): Promise<boolean> {
  if (CLI_URI === LIBVIRTD_URI) return requireLibvirt(t);
  return true;
}

export function text(b: Buffer): string {
  return b.toString('utf8');
}

/**
 * `CMD ARGS` reading `input` from a real pipe on its stdin (`cat FILE | CMD …`, as in a shell;
 * Node's own stdio 'pipe' is a socket, which /dev/stdin cannot be opened on).
 */
export function withStdin(cmd: string[], input: Buffer | string, opts: RunOptions = {}): Promise<RunResult> {
  return withScratchDir(tmpdir(), 'sparsevirt-cli-input-', async (dir) => {
    const file = path.join(dir, 'input');
    await writeFile(file, input);
    return exec('/bin/sh', ['-c', 'cat "$0" | exec "$@"', file, ...cmd], opts);
  });
}

/** `sparsevirt ARGS` with `input` piped into its stdin. */
export function cliWithInput(args: string[], input: Buffer | string, opts: RunOptions = {}): Promise<RunResult> {
  return withStdin([process.execPath, CLI_MAIN, ...args], input, opts);
}

/**
 * Runs `cmd ARGS` with its stdout going into a real pipe (`cmd … | cat`), as a shell would:
 * `/dev/stdout` is then a FIFO (Node's own stdio is a socket, which cannot be opened).
 */
export function throughPipe(cmd: string[], opts: RunOptions = {}): Promise<RunResult> {
  return withScratchDir(tmpdir(), 'sparsevirt-cli-pipe-', async (dir) => {
    const status = path.join(dir, 'status');
    const r = await exec('/bin/sh', ['-c', '{ "$@"; echo $? > "$0"; } | cat', status, ...cmd], opts);
    return { ...r, code: Number((await readFile(status, 'utf8')).trim()) };
  });
}

/** `same` for many read-only argument lists, a few pairs at a time. */
export async function sameAll(list: string[][], opts: RunOptions & { retries?: number; concurrency?: number } = {}): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < list.length) await same(list[next++]!, opts);
  };
  await Promise.all(Array.from({ length: Math.min(opts.concurrency ?? 4, list.length) }, worker));
}
