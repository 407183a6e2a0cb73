/**
 * vol-copy (a sparsevirt extension): a volume from the connection's host to another's, straight
 * through (`copyVolume`: the source's download stream feeds the destination's upload stream), with
 * one progress bar, optional creation of the destination and verification by content digest.
 */
import type { Connection, StoragePool, StorageVol } from '../client/index.js';
import { attributeOf, childElement, parseXml } from '../xml.js';
import type { Ctl } from './ctl.js';
import { catchInterrupts } from './exit.js';
import { lookupVol, requiredOpt, stringOpt } from './lookup.js';
import { parseULongLong } from './numbers.js';
import { ProgressBar, summaryLine } from './progress.js';
import { optBool, type ParsedCmd } from './vsh.js';

type Handler = (ctl: Ctl, cmd: ParsedCmd) => Promise<void>;

function byteOpt(ctl: Ctl, cmd: ParsedCmd, name: string): number {
  const v = cmd.opts.get(name);
  if (v === undefined || v === true) return 0;
  const n = parseULongLong(v, false);
  if (n === null || n > BigInt(Number.MAX_SAFE_INTEGER)) ctl.fail(`Numeric value '${v}' for <${name}> option is malformed or out of range`);
  return Number(n);
}

/** The format of a volume, from its XML (raw when it does not say). */
async function formatOf(vol: StorageVol): Promise<string> {
  const root = parseXml(await vol.xmlDesc());
  return attributeOf(childElement(childElement(root, 'target'), 'format'), 'type') ?? 'raw';
}

const volCopy: Handler = async (ctl, cmd) => {
  const destUri = requiredOpt(ctl, cmd, 'desturi');
  const offset = byteOpt(ctl, cmd, 'offset');
  const length = byteOpt(ctl, cmd, 'length');
  const { vol: src, name } = await lookupVol(ctl, cmd);
  const destPoolName = stringOpt(ctl, cmd, 'dest-pool') ?? src.pool;
  const destVolName = stringOpt(ctl, cmd, 'dest-vol') ?? src.name;
  const { connect } = await import('../client/index.js');
  let dest: Connection;
  try {
    dest = await connect(destUri, { keepaliveInterval: ctl.opts.keepaliveInterval, keepaliveCount: ctl.opts.keepaliveCount });
  } catch (err) {
    return ctl.fail(`failed to connect to the destination '${destUri}'`, err);
  }
  const ac = new AbortController();
  const stopInterrupt = catchInterrupts(ac, (signal) => {
    ctl.interrupted ??= signal;
  });
  let created: StorageVol | null = null;
  let ok = false;
  let bar: ProgressBar | null = null;
  try {
    let pool: StoragePool;
    try {
      pool = await dest.storagePoolLookupByName(destPoolName);
    } catch (err) {
      return ctl.fail(`failed to get the destination pool '${destPoolName}'`, err);
    }
    let dst: StorageVol | null = null;
    try {
      dst = await pool.volLookupByName(destVolName);
    } catch (err) {
      if ((err as { code?: string }).code !== 'VIR_ERR_NO_STORAGE_VOL') return ctl.fail(`failed to get the destination volume '${destVolName}'`, err);
    }
    const info = await src.info();
    if (dst === null) {
      if (!optBool(cmd, 'create')) {
        return ctl.fail(`the destination volume '${destVolName}' does not exist in pool '${destPoolName}' (add --create to create it)`);
      }
      try {
        created = await pool.createVol({ name: destVolName, capacity: info.capacity, allocation: 0, format: await formatOf(src) });
      } catch (err) {
        return ctl.fail(`failed to create the destination volume '${destVolName}'`, err);
      }
      dst = created;
    }
    const total = Math.max(0, (length > 0 ? Math.min(length, info.capacity - offset) : info.capacity - offset));
    const tty = ctl.io.stderrTTY;
    if (tty && !ctl.quiet) {
      bar = new ProgressBar(tty, { verb: 'copy', total });
      ctl.statusLine = bar;
    }
    const { copyVolume } = await import('../client/copy.js');
    let r;
    try {
      r = await copyVolume(src, dst, {
        sparse: optBool(cmd, 'sparse'), offset, length, verify: optBool(cmd, 'verify'), signal: ac.signal,
        onProgress: (p) => bar?.update(p),
      });
    } catch (err) {
      return ctl.fail(`cannot copy volume ${name}`, ac.signal.aborted && ac.signal.reason instanceof Error ? ac.signal.reason : err);
    }
    ok = true;
    if (bar) {
      bar.draw();
      bar.clear();
      ctl.statusLine = null;
      bar = null;
    }
    if (optBool(cmd, 'verbose')) ctl.io.err(summaryLine('copy', r, r.seconds));
    if (optBool(cmd, 'json')) {
      ctl.print(`${JSON.stringify({
        name: src.name, pool: src.pool, destUri, destPool: destPoolName, destName: destVolName, created: created !== null,
        sparse: r.sparse, offset, bytes: r.dataBytes + r.holeBytes, data: r.dataBytes, holes: r.holeBytes,
        seconds: Math.round(r.seconds * 1e6) / 1e6, rate: r.seconds > 0 ? Math.round(r.dataBytes / r.seconds) : 0,
        ...(r.digest ? { digest: r.digest } : {}),
      }, null, 2)}\n`);
    } else if (r.digest) {
      ctl.printExtra(`Verified: sha256 content digest ${r.digest}\n`);
    }
  } finally {
    stopInterrupt();
    if (bar) {
      bar.clear();
      ctl.statusLine = null;
    }
    // a volume this command created is removed when the copy failed; an existing one keeps what was written
    if (!ok && created) await created.delete().catch(() => undefined);
    await dest.close().catch(() => undefined);
  }
};

export const handlers: Record<string, Handler> = { 'vol-copy': volCopy };
