/**
 * Persistent daemon state: one JSON file per pool in `<stateDir>/pools/`, written atomically
 * (temp file + fsync + rename + fsync of the directory), so a crash at any point leaves either
 * the old or the new file, never a torn one. Stray temp files of an interrupted write are
 * removed at load.
 */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';

export interface PoolRecord {
  /** Format version of this file. */
  version: 1;
  name: string;
  uuid: string;
  type: 'dir';
  target: string;
  /** Mode for the target directory when built (null: libvirt's default 0711). */
  mode: number | null;
  autostart: boolean;
  /** Running when last saved: restarted with the daemon, as libvirt keeps its pools' status. */
  active: boolean;
}

const TMP_MARK = '.tmp-';

export class PoolStore {
  readonly dir: string;
  constructor(stateDir: string) {
    this.dir = path.join(stateDir, 'pools');
  }

  /** Creates the directory; returns true if it did not exist (a fresh state directory). */
  async init(): Promise<boolean> {
    let fresh = false;
    try {
      await fs.access(this.dir);
    } catch {
      fresh = true;
    }
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
    return fresh;
  }

  private file(name: string): string {
    // Pool names cannot contain '/' (refused at define); encode anything else unusual.
    return path.join(this.dir, `${encodeURIComponent(name)}.json`);
  }

  /** Every readable record; unreadable ones are reported through `onBad` and skipped. */
  async load(onBad: (file: string, err: unknown) => void): Promise<PoolRecord[]> {
    const out: PoolRecord[] = [];
    for (const entry of await fs.readdir(this.dir)) {
      const full = path.join(this.dir, entry);
      if (entry.includes(TMP_MARK)) {
        await fs.rm(full, { force: true }).catch(() => undefined);
        continue;
      }
      if (!entry.endsWith('.json')) continue;
      try {
        const rec = JSON.parse(await fs.readFile(full, 'utf8')) as PoolRecord;
        if (rec.version !== 1 || typeof rec.name !== 'string' || typeof rec.uuid !== 'string' || typeof rec.target !== 'string') {
          throw new Error('not a sparsevirtd pool record');
        }
        out.push({ ...rec, mode: typeof rec.mode === 'number' ? rec.mode : null, autostart: !!rec.autostart, active: !!rec.active, type: 'dir' });
      } catch (err) {
        onBad(full, err);
      }
    }
    return out;
  }

  async save(rec: PoolRecord): Promise<void> {
    await writeFileAtomic(this.file(rec.name), `${JSON.stringify(rec, null, 2)}\n`);
  }

  async remove(name: string): Promise<void> {
    await fs.rm(this.file(name), { force: true });
    await syncDir(this.dir);
  }
}

/** Write temp + fsync + rename + fsync(dir). */
export async function writeFileAtomic(file: string, content: string): Promise<void> {
  const dir = path.dirname(file);
  const tmp = path.join(dir, `${path.basename(file)}${TMP_MARK}${process.pid}-${randomBytes(4).toString('hex')}`);
  const fh = await fs.open(tmp, 'wx', 0o600);
  try {
    await fh.writeFile(content, 'utf8');
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => undefined);
    await fs.rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
  await fh.close();
  try {
    await fs.rename(tmp, file);
  } catch (err) {
    await fs.rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
  await syncDir(dir);
}

async function syncDir(dir: string): Promise<void> {
  const fh = await fs.open(dir, 'r');
  try {
    await fh.sync();
  } catch {
    // some filesystems refuse fsync on a directory; the rename is still atomic there
  } finally {
    await fh.close();
  }
}
