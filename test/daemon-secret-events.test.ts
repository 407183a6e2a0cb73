/**
 * Secret events and the secret procedures, sparsevirtd next to libvirtd 9.0: `virsh
 * secret-event --loop` prints the same events for the same commands (lifecycle: Defined at every
 * define, Undefined; value-changed, filtered by secret), libvirt's Python client gets the same
 * event fields, also on a read-only connection, and none after it deregistered; virsh's secret
 * commands (define, set-value, get-value of a private secret, list, dumpxml, undefine, and the
 * read-only refusals) give the same output and status from both. Locally a missing libvirtd or
 * python3-libvirt skips; in CI it fails.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { startTestDaemon } from './helpers/daemon.js';
import { run } from './helpers/run.js';
import { LIBVIRTD_URI, PYTHON, requireLibvirt, requirePython, virsh, virshOk } from './helpers/libvirt.js';

/** `virsh secret-event --loop` running; its lines as they come. */
class EventWatcher {
  readonly lines: string[] = [];
  private readonly waiters: Array<{ re: RegExp; resolve: () => void }> = [];
  private readonly child;
  readonly exited: Promise<void>;

  constructor(uri: string, args: string[]) {
    this.child = spawn('virsh', ['-q', '-c', uri, 'secret-event', '--loop', '--timeout', '120', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let buf = '';
    this.child.stdout.setEncoding('utf8').on('data', (s: string) => {
      buf += s;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        if (!line) continue;
        this.lines.push(line);
        for (const w of this.waiters.splice(0)) {
          if (w.re.test(line)) w.resolve();
          else this.waiters.push(w);
        }
      }
    });
    this.child.stderr.resume();
    this.exited = new Promise((resolve) => this.child.once('close', () => resolve()));
  }

  /** Resolves once a line matching `re` came (or came already); rejects after `ms`. */
  seen(re: RegExp, ms = 20_000): Promise<void> {
    if (this.lines.some((l) => re.test(l))) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no event ${re} within ${ms} ms; got: ${this.lines.join(' | ')}`)), ms);
      this.waiters.push({ re, resolve: () => { clearTimeout(timer); resolve(); } });
    });
  }

  async stop(): Promise<void> {
    this.child.kill('SIGINT');
    await this.exited;
  }
}

/**
 * Starts a watcher and waits until it is registered: `poke` (a change it reports) runs until the
 * watcher reports `re`. Returns it with the lines so far marked as seen.
 */
async function watch(uri: string, args: string[], poke: () => Promise<void>, re: RegExp): Promise<{ w: EventWatcher; from: number }> {
  const w = new EventWatcher(uri, args);
  for (let i = 0; ; i++) {
    await poke();
    try {
      await w.seen(re, 500);
      await new Promise((r) => setTimeout(r, 200));
      return { w, from: w.lines.length };
    } catch (err) {
      if (i >= 40) {
        await w.stop();
        throw err;
      }
    }
  }
}

/** The same commands against `uri`; the events each watcher printed for them. */
async function eventsOf(uri: string, dir: string, ids: { uuid: string; eph: string; other: string; probe: string }): Promise<{ lifecycle: string[]; value: string[] }> {
  const f = (name: string, text: string) => {
    const p = path.join(dir, name);
    return fsp.writeFile(p, text).then(() => p);
  };
  const xml = await f('ev.xml', `<secret ephemeral='no' private='yes'><uuid>${ids.uuid}</uuid><usage type='ceph'><name>events ${ids.uuid}</name></usage></secret>`);
  const eph = await f('eph.xml', `<secret ephemeral='yes' private='no'><uuid>${ids.eph}</uuid></secret>`);
  const other = await f('other.xml', `<secret ephemeral='no' private='no'><uuid>${ids.other}</uuid><usage type='volume'><volume>/events/${ids.other}</volume></usage></secret>`);
  const probe = await f('probe.xml', `<secret ephemeral='yes' private='no'><uuid>${ids.probe}</uuid></secret>`);
  const key = await f('ev.key', 'c2VjcmV0');
  // virsh looks the secret of --secret up when it starts: it exists before
  await virshOk(['secret-define', xml], { uri });
  const value = await watch(uri, ['--event', 'value-changed', '--secret', ids.uuid], () => virshOk(['secret-set-value', ids.uuid, '--file', key], { uri }).then(() => undefined), new RegExp(ids.uuid));
  let lifecycle: { w: EventWatcher; from: number } | null = null;
  try {
    lifecycle = await watch(uri, ['--event', 'lifecycle'], async () => {
      await virshOk(['secret-define', probe], { uri });
      await virshOk(['secret-undefine', ids.probe], { uri });
    }, new RegExp(`${ids.probe}: Undefined`));
    for (const args of [
      ['secret-set-value', ids.uuid, '--file', key], ['secret-define', xml],
      ['secret-define', other], ['secret-set-value', ids.other, '--file', key], ['secret-set-value', ids.uuid, '--file', key],
      ['secret-define', eph], ['secret-undefine', ids.eph], ['secret-undefine', ids.other], ['secret-undefine', ids.uuid],
    ]) await virshOk(args, { uri });
    await lifecycle.w.seen(new RegExp(`${ids.uuid}: Undefined`));
    // anything more would come now: give it many times what a local event takes
    await new Promise((r) => setTimeout(r, 500));
  } finally {
    await value.w.stop();
    await lifecycle?.w.stop();
    await virsh(['secret-undefine', ids.uuid], { uri });
  }
  const mine = (l: string) => l.includes(ids.uuid) || l.includes(ids.eph) || l.includes(ids.other);
  return { lifecycle: lifecycle.w.lines.slice(lifecycle.from).filter(mine), value: value.w.lines.slice(value.from).filter(mine) };
}

/** Fields of the events libvirt's Python client receives: one line per event, then the checks' results. */
const PY_EVENTS = String.raw`
import libvirt, os, threading, time
libvirt.virEventRegisterDefaultImpl()
libvirt.registerErrorHandler(lambda *a: None, None)
uri = os.environ['URI']; u = os.environ['UUID']
stop = False
def loop():
    while not stop: libvirt.virEventRunDefaultImpl()
threading.Thread(target=loop, daemon=True).start()
c = libvirt.open(uri)
r = libvirt.openReadOnly(uri)
out = []
def lc(conn, sec, ev, det, tag):
    if sec.UUIDString() == u: out.append('%s lifecycle %s %d %s %d %d' % (tag, sec.UUIDString(), sec.usageType(), sec.usageID(), ev, det))
def vc(conn, sec, tag):
    if sec.UUIDString() == u: out.append('%s value %s %d %s' % (tag, sec.UUIDString(), sec.usageType(), sec.usageID()))
a = c.secretEventRegisterAny(None, libvirt.VIR_SECRET_EVENT_ID_LIFECYCLE, lc, 'rw')
b = r.secretEventRegisterAny(None, libvirt.VIR_SECRET_EVENT_ID_VALUE_CHANGED, vc, 'ro')
s = c.secretDefineXML("<secret ephemeral='no' private='yes'><uuid>%s</uuid><usage type='ceph'><name>py events %s</name></usage></secret>" % (u, u))
s.setValue(b'one')
deadline = time.time() + 20
while len(out) < 2 and time.time() < deadline: time.sleep(0.05)
# filtered to this secret, on the read-only connection
f = r.secretEventRegisterAny(r.secretLookupByUUIDString(u), libvirt.VIR_SECRET_EVENT_ID_LIFECYCLE, lc, 'ro-filtered')
r.secretEventDeregisterAny(b)
s.setValue(b'two')
s.undefine()
deadline = time.time() + 20
while len(out) < 4 and time.time() < deadline: time.sleep(0.05)
time.sleep(0.5)
c.secretEventDeregisterAny(a)
r.secretEventDeregisterAny(f)
stop = True
print('\n'.join(sorted(out[:2]) + sorted(out[2:])))
`;

test('secret events: virsh secret-event --loop prints from sparsevirtd what it prints from libvirtd', { timeout: 180_000 }, async (t) => {
  if (!(await requireLibvirt(t))) return;
  const d = await startTestDaemon();
  try {
    const id = (n: number) => `e7e7e7e7-0000-4000-8000-${randomBytes(5).toString('hex')}${n}0`;
    const ids = { uuid: id(1), eph: id(2), other: id(3), probe: id(4) };
    const theirs = await eventsOf(LIBVIRTD_URI, d.dir, ids);
    const ours = await eventsOf(d.virshUri, d.dir, ids);
    t.diagnostic(`libvirtd: ${theirs.lifecycle.join(' | ')} || ${theirs.value.join(' | ')}`);
    assert.deepEqual(ours, theirs);
    assert.deepEqual(ours.lifecycle, [
      `event 'lifecycle' for secret ${ids.uuid}: Defined`, `event 'lifecycle' for secret ${ids.other}: Defined`,
      `event 'lifecycle' for secret ${ids.eph}: Defined`, `event 'lifecycle' for secret ${ids.eph}: Undefined`,
      `event 'lifecycle' for secret ${ids.other}: Undefined`, `event 'lifecycle' for secret ${ids.uuid}: Undefined`,
    ]);
    assert.deepEqual(ours.value, [`event 'value-changed' for secret ${ids.uuid}`, `event 'value-changed' for secret ${ids.uuid}`]);
  } finally {
    await d.stop();
  }
});

test("secret events: libvirt's Python client gets the same fields, read-only too, filtered by secret, none after deregistering", { timeout: 120_000 }, async (t) => {
  if (!(await requireLibvirt(t)) || !(await requirePython(t))) return;
  const d = await startTestDaemon();
  try {
    const uuid = `e8e8e8e8-0000-4000-8000-${randomBytes(6).toString('hex')}`;
    const py = async (uri: string): Promise<string[]> => {
      const r = await run(PYTHON, ['-c', PY_EVENTS], { timeoutMs: 90_000, env: { ...process.env, URI: uri, UUID: uuid } });
      assert.equal(r.code, 0, r.stderr);
      return r.stdout.trim().split('\n');
    };
    const theirs = await py(LIBVIRTD_URI);
    const ours = await py(d.virshUri);
    assert.deepEqual(ours, theirs);
    assert.deepEqual(ours, [
      `ro value ${uuid} 2 py events ${uuid}`, `rw lifecycle ${uuid} 2 py events ${uuid} 0 0`,
      `ro-filtered lifecycle ${uuid} 2 py events ${uuid} 1 0`, `rw lifecycle ${uuid} 2 py events ${uuid} 1 0`,
    ]);
  } finally {
    await d.stop();
  }
});

test('secret procedures: virsh gets the same output and status from sparsevirtd as from libvirtd', { timeout: 120_000 }, async (t) => {
  if (!(await requireLibvirt(t))) return;
  const d = await startTestDaemon();
  const uuid = `e9e9e9e9-0000-4000-8000-${randomBytes(6).toString('hex')}`;
  const open = `eaeaeaea-0000-4000-8000-${randomBytes(6).toString('hex')}`;
  try {
    const f = async (name: string, text: string) => {
      const p = path.join(d.dir, name);
      await fsp.writeFile(p, text);
      return p;
    };
    const priv = await f('priv.xml', `<secret ephemeral='no' private='yes'><uuid>${uuid}</uuid><description>private one</description><usage type='ceph'><name>cmp ${uuid}</name></usage></secret>`);
    const pub = await f('pub.xml', `<secret ephemeral='no' private='no'><uuid>${open}</uuid><usage type='iscsi'><target>cmp ${open}</target></usage></secret>`);
    const key = await f('key', 'AQAvPhZrZNsULhAA+az/MWVwAzsxuo+ZpbKfpA==');
    const steps: string[][] = [
      ['secret-define', priv], ['secret-define', pub], ['secret-set-value', uuid, '--file', key], ['secret-set-value', open, '--file', key],
      ['secret-get-value', uuid], ['secret-get-value', open], ['secret-dumpxml', uuid], ['secret-dumpxml', open],
      ['-r', 'secret-dumpxml', uuid], ['-r', 'secret-get-value', open], ['-r', 'secret-define', priv],
      ['-r', 'secret-set-value', uuid, '--file', key], ['-r', 'secret-undefine', uuid],
      ['secret-undefine', open], ['secret-undefine', open], ['secret-dumpxml', open], ['secret-undefine', uuid],
    ];
    const lines = (out: string) => out.split('\n').filter((l) => l.includes(uuid) || l.includes(open)).map((l) => l.trim().replace(/\s+/g, ' '));
    const trace: string[] = [];
    for (const args of steps) {
      const a = await virsh(args, { uri: d.virshUri });
      const b = await virsh(args);
      assert.deepEqual([a.code, a.stdout, a.stderr], [b.code, b.stdout, b.stderr], args.join(' '));
      trace.push(`${args.join(' ')} → ${a.code}${a.stderr ? ` (${a.stderr.trim().split('\n').pop()})` : ''}`);
      if (args[0] === 'secret-set-value' && args[1] === open) {
        // both defined and valued: the lists, also filtered, also read-only
        for (const list of [['secret-list'], ['secret-list', '--private'], ['secret-list', '--no-private'], ['-r', 'secret-list']]) {
          assert.deepEqual(lines(await virshOk(list, { uri: d.virshUri })), lines(await virshOk(list)), list.join(' '));
        }
      }
    }
    t.diagnostic(trace.join('; '));
  } finally {
    for (const u of [uuid, open]) await virsh(['secret-undefine', u]);
    await d.stop();
  }
});
