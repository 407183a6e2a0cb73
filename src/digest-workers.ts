/**
 * The content digest (`digest.ts`) computed on worker threads: a range's digest is a SHA-256 over
 * the digests of its 1 MiB blocks, in order, so blocks can be hashed anywhere and combined here.
 *
 * `ParallelContentDigest` is fed the range's data in order, as pieces at volume positions:
 * - `addFile`: bytes of an open file (an fd, with the file's offset of the piece): the worker reads
 *   them itself (pread), so they never pass through the caller's thread;
 * - `addBytes`: bytes in memory (copied once into a buffer that moves to the worker);
 * - anything not fed is a hole (zeros): it costs nothing.
 * Pieces are cut into tasks of whole blocks (`taskBytes` of data or more), handed to the
 * process's pool of workers (`digestWorkers()`: up to 4, as many as the CPUs), and their block
 * digests are folded into the range's digest in order, at most `maxInFlight` tasks ahead.
 *
 * A caller that hands fds must keep them open until `digest()` or `settle()` resolved.
 *
 * The workers run the code of `workerMain` (below), given to them as text (`eval`): the
 * programs are bundled into one file each, and a worker needs no file of its own that way. It
 * uses nothing but Node's modules.
 */
import { createHash, type Hash } from 'node:crypto';
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { SparsevirtError } from './errors.js';
import { DIGEST_BLOCK, DIGEST_NAME, DIGEST_PAGE } from './digest.js';

/**
 * A worker's loop: each message is a task `{ id, offset, end, pieces, data }` (`pieces`: a
 * Float64Array of [position, length, fd (-1: in `data`), file offset or offset in `data`]);
 * it answers `{ id, blocks }` (block index, digest, …, for the blocks with a non-zero page) or
 * `{ id, error, code }`. Self-contained: it runs as the text of this function.
 */
function workerMain(require: (id: string) => unknown, PAGE: number, BLOCK: number): void {
  const { parentPort, workerData } = require('node:worker_threads') as typeof import('node:worker_threads');
  const { createHash } = require('node:crypto') as typeof import('node:crypto');
  const { readSync, readlinkSync } = require('node:fs') as typeof import('node:fs');
  const { setPriority } = require('node:os') as typeof import('node:os');
  const nice = (workerData as { nice?: number } | null)?.nice ?? 0;
  if (nice > 0) {
    // this thread alone (Linux: a thread's id names it for setpriority); elsewhere it stays as is
    try {
      setPriority(Number(readlinkSync('/proc/thread-self').split('/').pop()), nice);
    } catch {
      /* no /proc, or not allowed: the default priority */
    }
  }
  const buf = Buffer.alloc(BLOCK);
  const zero = Buffer.alloc(PAGE);
  const idx = Buffer.alloc(2);
  const touched = new Uint8Array(BLOCK / PAGE);
  parentPort!.on('message', (m: { id: number; offset: number; end: number; pieces: Float64Array; data: ArrayBuffer | null }) => {
    const { id, offset, end, pieces } = m;
    const data = m.data ? Buffer.from(m.data) : null;
    const blocks: Array<number | Uint8Array> = [];
    let block = -1;
    let pages: number[] = [];
    const flush = (): void => {
      if (block < 0) return;
      const base = block * BLOCK;
      let h = null;
      for (const p of pages) {
        touched[p] = 0;
        const s = Math.max(p * PAGE, offset - base);
        const e = Math.min((p + 1) * PAGE, end - base);
        if (e <= s || zero.compare(buf, s, e, 0, e - s) === 0) continue;
        h ??= createHash('sha256');
        idx.writeUInt16BE(p);
        h.update(idx);
        h.update(buf.subarray(s, e));
      }
      if (h) blocks.push(block, h.digest());
      pages = [];
      block = -1;
    };
    try {
      for (let i = 0; i < pieces.length; i += 4) {
        let pos = pieces[i]!;
        let len = pieces[i + 1]!;
        const fd = pieces[i + 2]!;
        let from = pieces[i + 3]!;
        while (len > 0) {
          const b = Math.floor(pos / BLOCK);
          if (b !== block) {
            flush();
            block = b;
          }
          const at = pos - b * BLOCK;
          const n = Math.min(len, BLOCK - at);
          // a page is zeroed when first touched, unless this piece fills it: what no piece
          // covers is a hole
          for (let p = Math.floor(at / PAGE), last = Math.floor((at + n - 1) / PAGE); p <= last; p++) {
            if (touched[p]) continue;
            touched[p] = 1;
            if (p * PAGE < at || (p + 1) * PAGE > at + n) buf.fill(0, p * PAGE, (p + 1) * PAGE);
            pages.push(p);
          }
          if (fd >= 0) {
            for (let have = 0; have < n;) {
              const got = readSync(fd, buf, at + have, n - have, from + have);
              if (got === 0) throw Object.assign(new Error(`file shrank while reading (EOF at ${from + have})`), { code: 'ERR_IO' });
              have += got;
            }
          } else {
            data!.copy(buf, at, from, from + n);
          }
          pos += n;
          len -= n;
          from += n;
        }
      }
      flush();
      parentPort!.postMessage({ id, blocks });
    } catch (err) {
      touched.fill(0);
      const e = err as { message?: string; code?: string };
      parentPort!.postMessage({ id, error: String(e.message ?? err), code: typeof e.code === 'string' ? e.code : undefined });
    }
  });
}

const WORKER_SOURCE = `(${workerMain.toString()})(require, ${DIGEST_PAGE}, ${DIGEST_BLOCK});`;

interface Task {
  offset: number;
  end: number;
  pieces: Float64Array;
  data: ArrayBuffer | null;
}

type TaskResult = Array<number | Uint8Array>;

interface Slot {
  worker: Worker;
  pending: Map<number, { resolve: (r: TaskResult) => void; reject: (e: Error) => void }>;
}

/**
 * A small pool of digest workers; they keep the process alive only while they have work.
 * `nice`: the workers' threads run at that nice value (Linux), so that they take the CPU that
 * the process's other work (a transfer) leaves.
 */
export class DigestWorkers {
  readonly size: number;
  readonly nice: number;
  #slots: Array<Slot | null>;
  #next = 0;
  #ids = 0;
  #closed = false;
  #tasks = 0;

  constructor(size: number, opts: { nice?: number } = {}) {
    if (!Number.isInteger(size) || size < 1) throw new SparsevirtError('ERR_INVALID_ARG', `digest workers: a count of at least 1, got ${size}`);
    this.size = size;
    this.nice = opts.nice ?? 0;
    this.#slots = new Array<Slot | null>(size).fill(null);
  }

  /** Tasks handed out so far. */
  get tasks(): number {
    return this.#tasks;
  }

  /** The block digests of one task, from the least busy worker. */
  run(task: Task): Promise<TaskResult> {
    if (this.#closed) return Promise.reject(new SparsevirtError('ERR_STREAM_STATE', 'digest workers closed'));
    this.#tasks++;
    let best = -1;
    for (let k = 0; k < this.size; k++) {
      const i = (this.#next + k) % this.size;
      if (best < 0 || (this.#slots[i]?.pending.size ?? 0) < (this.#slots[best]?.pending.size ?? 0)) best = i;
    }
    this.#next = (best + 1) % this.size;
    const slot = (this.#slots[best] ??= this.#spawn(best));
    const id = ++this.#ids;
    return new Promise<TaskResult>((resolve, reject) => {
      slot.pending.set(id, { resolve, reject });
      if (slot.pending.size === 1) slot.worker.ref();
      slot.worker.postMessage({ id, ...task }, task.data ? [task.data, task.pieces.buffer as ArrayBuffer] : [task.pieces.buffer as ArrayBuffer]);
    });
  }

  /** Ends the workers; tasks still running fail. */
  async close(): Promise<void> {
    this.#closed = true;
    const slots = this.#slots.filter((s): s is Slot => s !== null);
    this.#slots.fill(null);
    await Promise.all(slots.map((s) => s.worker.terminate()));
  }

  #spawn(i: number): Slot {
    const worker = new Worker(WORKER_SOURCE, { eval: true, name: 'sparsevirt-digest', workerData: { nice: this.nice } });
    const slot: Slot = { worker, pending: new Map() };
    worker.unref();
    const fail = (err: Error): void => {
      if (this.#slots[i] === slot) this.#slots[i] = null;
      for (const p of slot.pending.values()) p.reject(err);
      slot.pending.clear();
    };
    worker.on('message', (m: { id: number; blocks?: TaskResult; error?: string; code?: string }) => {
      const p = slot.pending.get(m.id);
      if (!p) return;
      slot.pending.delete(m.id);
      if (slot.pending.size === 0) worker.unref();
      // a read failed (a system error: its code kept in `cause`) or the file shrank
      if (m.error !== undefined) p.reject(new SparsevirtError('ERR_IO', m.error, { cause: m.code ? Object.assign(new Error(m.error), { code: m.code }) : undefined }));
      else p.resolve(m.blocks!);
    });
    worker.on('error', (err) => fail(err instanceof Error ? err : new Error(String(err))));
    worker.on('exit', (code) => fail(new SparsevirtError('ERR_IO', `a digest worker exited (code ${code})`)));
    return slot;
  }
}

let shared: DigestWorkers | null = null;
let background: DigestWorkers | null = null;

/** The nice value of the background pool's threads. */
export const BACKGROUND_NICE = 10;

/**
 * The process's digest workers: as many as the CPUs, at most 4; started on first use.
 * `background`: a second pool whose threads run at nice `BACKGROUND_NICE`, for a digest that
 * must not slow the transfers the process serves meanwhile (it takes the CPU they leave).
 */
export function digestWorkers(opts: { background?: boolean } = {}): DigestWorkers {
  const size = Math.max(1, Math.min(4, availableParallelism()));
  if (opts.background) return (background ??= new DigestWorkers(size, { nice: BACKGROUND_NICE }));
  return (shared ??= new DigestWorkers(size));
}

function u64(n: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
}

export interface ParallelDigestOptions {
  workers?: DigestWorkers;
  /** Data bytes per task at least (whole blocks; default 4 MiB). */
  taskBytes?: number;
  /** Tasks handed out before the oldest is waited for (default 2 per worker). */
  maxInFlight?: number;
}

/** The content digest of `offset`..`offset+length`, fed in order, hashed by the workers. */
export class ParallelContentDigest {
  readonly #outer: Hash;
  readonly #end: number;
  readonly #workers: DigestWorkers;
  readonly #taskBytes: number;
  readonly #maxInFlight: number;
  #pos: number;
  /** The task being gathered. */
  #pieces: number[] = [];
  #data: Buffer | null = null;
  #dataUsed = 0;
  #taskData = 0;
  #taskBlock = -1;
  #inFlight: Array<Promise<TaskResult>> = [];
  #failed: unknown = null;
  #done: string | null = null;

  constructor(readonly offset: number, readonly length: number, opts: ParallelDigestOptions = {}) {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 || offset + length > Number.MAX_SAFE_INTEGER) {
      throw new SparsevirtError('ERR_INVALID_ARG', `digest range ${offset}+${length} is not a byte range below 2^53`);
    }
    this.#pos = offset;
    this.#end = offset + length;
    this.#workers = opts.workers ?? digestWorkers();
    this.#taskBytes = Math.max(1, opts.taskBytes ?? 4 * DIGEST_BLOCK);
    this.#maxInFlight = Math.max(1, opts.maxInFlight ?? 2 * this.#workers.size);
    this.#outer = createHash('sha256').update(`${DIGEST_NAME}\0`).update(u64(offset)).update(u64(length));
  }

  /** Bytes fed so far (holes included: they are what lies between pieces). */
  get position(): number {
    return this.#pos - this.offset;
  }

  /** `n` bytes that read as zero. */
  zeros(n: number): void {
    this.#advance(this.#pos, n);
  }

  /**
   * `length` bytes of the file `fd` from `fileOffset`, at volume position `pos` (at or after the
   * last piece's end). Resolves when the task queue has room again.
   */
  async addFile(pos: number, length: number, fd: number, fileOffset: number): Promise<void> {
    if (!Number.isSafeInteger(fd) || fd < 0) throw new SparsevirtError('ERR_INVALID_ARG', `fd must be a non-negative integer, got ${fd}`);
    await this.#add(pos, length, fd, fileOffset, null);
  }

  /** `bytes` at volume position `pos` (copied: the caller may reuse them once this resolved or not). */
  async addBytes(pos: number, bytes: Uint8Array): Promise<void> {
    await this.#add(pos, bytes.length, -1, 0, bytes);
  }

  /** The range's digest (hex), once every task is done; every byte of the range must have been fed. */
  async digest(): Promise<string> {
    if (this.#done !== null) return this.#done;
    if (this.#pos !== this.#end) {
      await this.settle();
      throw new SparsevirtError('ERR_STREAM_STATE', `digest of ${this.length} bytes asked after ${this.#pos - this.offset}`);
    }
    this.#dispatch();
    while (this.#inFlight.length > 0) await this.#foldOldest();
    this.#done = this.#outer.digest('hex');
    return this.#done;
  }

  /** Waits for every task handed out (for a caller that must close its fds), whatever their outcome. */
  async settle(): Promise<void> {
    const all = this.#inFlight;
    this.#inFlight = [];
    this.#failed ??= new SparsevirtError('ERR_STREAM_STATE', 'digest abandoned');
    await Promise.allSettled(all);
  }

  #advance(pos: number, n: number): void {
    if (this.#done !== null || this.#failed !== null) throw new SparsevirtError('ERR_STREAM_STATE', 'digest already taken or failed');
    if (!Number.isSafeInteger(pos) || !Number.isSafeInteger(n) || n < 0 || pos < this.#pos) {
      throw new SparsevirtError('ERR_INVALID_ARG', `digest piece ${pos}+${n} is not at or after position ${this.#pos}`);
    }
    if (pos + n > this.#end) {
      throw new SparsevirtError('ERR_PROTOCOL', `content runs past the digest's range (${pos + n - this.offset} > ${this.length} bytes)`);
    }
    this.#pos = pos + n;
  }

  async #add(pos: number, length: number, fd: number, from: number, bytes: Uint8Array | null): Promise<void> {
    this.#advance(pos, length);
    let at = 0;
    while (at < length) {
      const p = pos + at;
      const block = Math.floor(p / DIGEST_BLOCK);
      const n = Math.min(length - at, (block + 1) * DIGEST_BLOCK - p);
      if (this.#taskData >= this.#taskBytes && block !== this.#taskBlock) {
        this.#dispatch();
        if (this.#inFlight.length >= this.#maxInFlight) await this.#foldOldest();
      }
      if (bytes) {
        this.#data ??= Buffer.from(new ArrayBuffer(this.#taskBytes + DIGEST_BLOCK));
        this.#data.set(bytes.subarray(at, at + n), this.#dataUsed);
        this.#pieces.push(p, n, -1, this.#dataUsed);
        this.#dataUsed += n;
      } else {
        this.#pieces.push(p, n, fd, from + at);
      }
      this.#taskData += n;
      this.#taskBlock = block;
      at += n;
    }
  }

  #dispatch(): void {
    if (this.#pieces.length === 0) return;
    const task: Task = {
      offset: this.offset, end: this.#end, pieces: Float64Array.from(this.#pieces),
      data: this.#data ? (this.#data.buffer as ArrayBuffer) : null,
    };
    this.#pieces = [];
    this.#data = null;
    this.#dataUsed = 0;
    this.#taskData = 0;
    const p = this.#workers.run(task);
    p.catch(() => undefined); // seen when folded (or settled)
    this.#inFlight.push(p);
  }

  async #foldOldest(): Promise<void> {
    const p = this.#inFlight.shift()!;
    let blocks: TaskResult;
    try {
      blocks = await p;
    } catch (err) {
      this.#failed = err;
      await this.settle();
      throw err;
    }
    for (let i = 0; i < blocks.length; i += 2) this.#outer.update(u64(blocks[i] as number)).update(blocks[i + 1] as Uint8Array);
  }
}
