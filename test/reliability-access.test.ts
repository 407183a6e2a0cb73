/**
 * Access. Complements test/daemon-client.test.ts (no client certificate, a CN not on
 * the allow-list, the read-only refusals through the client library) and test/daemon-cli.test.ts
 * (the parsed defaults) with:
 *  - a client certificate from another CA is refused in the TLS handshake: no session, so no
 *    procedure can run; a plain-TCP client talking to the TLS port gets nothing either;
 *  - a running daemon with default options listens on no TCP port at all;
 *  - every procedure that changes something is refused on a read-only connection (by the
 *    protocol table, not a hand-picked list), before its arguments are even looked up, and
 *    nothing changes.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { after, before, describe, test } from 'node:test';
import { connect } from '../src/client/index.js';
import { startDaemon } from '../src/daemon/index.js';
import { MessageType, REMOTE_PROGRAM, Status, buildFrame } from '../src/rpc/message.js';
import { P, PROCEDURES_BY_NUM } from '../src/protocol/remote.js';
import { startTestDaemon } from './helpers/daemon.js';
import { RawClient, errorOf } from './helpers/raw-client.js';
import { run } from './helpers/run.js';
import { encode } from '../src/xdr/index.js';
import { makeImage, scratchDir, sha256File } from './helpers/images.js';
import { synthesizedExchanges } from './long/fuzz.js';
import { isRoot, listeningTcpInodes, openFds, spawnDaemon, waitUntil } from './long/harness.js';

describe('TLS: who gets in', () => {
  let dir: string;
  let pkiA: string;
  let pkiB: string;
  before(async () => {
    dir = await scratchDir();
    pkiA = path.join(dir, 'pki-a');
    pkiB = path.join(dir, 'pki-b');
    const script = path.resolve('scripts', 'setup-tls.sh');
    const [a, b] = await Promise.all([run('bash', [script, pkiA]), run('bash', [script, pkiB])]);
    assert.equal(a.code, 0, a.stderr);
    assert.equal(b.code, 0, b.stderr);
  });
  after(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
  });

  test('a client certificate from another CA is refused in the handshake, before any session exists; plain TCP on the TLS port gets nothing', async (t) => {
    const logs: string[] = [];
    const daemon = await startDaemon({
      stateDir: path.join(dir, 'state'), listen: ['tls:127.0.0.1:0'], tls: { pkipath: pkiA }, defaultPool: false, logSink: (l) => logs.push(l),
    });
    try {
      const a = daemon.addresses[0] as { port: number; uri: string };
      // the client trusts the server (CA A) but presents a certificate signed by CA B
      const mixed = path.join(dir, 'mixed');
      await fsp.mkdir(mixed);
      await fsp.copyFile(path.join(pkiA, 'cacert.pem'), path.join(mixed, 'cacert.pem'));
      await fsp.copyFile(path.join(pkiB, 'clientcert.pem'), path.join(mixed, 'clientcert.pem'));
      await fsp.copyFile(path.join(pkiB, 'clientkey.pem'), path.join(mixed, 'clientkey.pem'));
      const err = await connect(`${a.uri}?pkipath=${mixed}`, { timeout: 5000, signal: AbortSignal.timeout(10000) }).then(() => null, (e: unknown) => e);
      t.diagnostic(`client with a certificate of another CA: ${(err as Error)?.message}`);
      assert.ok(err instanceof Error && ['ERR_ACCESS_DENIED', 'ERR_CONNECTION_CLOSED'].includes((err as { code?: string }).code ?? ''), String(err));

      // the same by hand: the handshake fails, no application byte ever comes back
      const outcome = await new Promise<string>((resolve) => {
        const s = tls.connect({
          host: '127.0.0.1', port: a.port, servername: 'localhost', ca: fs.readFileSync(path.join(pkiA, 'cacert.pem')),
          cert: fs.readFileSync(path.join(pkiB, 'clientcert.pem')), key: fs.readFileSync(path.join(pkiB, 'clientkey.pem')),
        });
        s.on('secureConnect', () => s.write(buildFrame({ prog: REMOTE_PROGRAM, vers: 1, proc: 66, type: MessageType.CALL, serial: 0, status: Status.OK })));
        s.on('data', () => resolve('got an answer'));
        s.on('error', (e) => resolve(`error: ${e.message}`));
        s.on('close', () => resolve('closed'));
      });
      assert.notEqual(outcome, 'got an answer');

      // plain TCP to the TLS port: a libvirt frame is not TLS; nothing answers it
      const plain = await new Promise<string>((resolve) => {
        const s = net.createConnection({ host: '127.0.0.1', port: a.port });
        s.on('connect', () => s.write(buildFrame({ prog: REMOTE_PROGRAM, vers: 1, proc: 66, type: MessageType.CALL, serial: 0, status: Status.OK })));
        s.on('data', (b) => {
          // a TLS alert, never a libvirt REPLY
          resolve(b.length >= 28 && b.readUInt32BE(4) === REMOTE_PROGRAM ? 'libvirt reply' : 'tls alert');
        });
        s.on('error', () => resolve('error'));
        s.on('close', () => resolve('closed'));
      });
      assert.notEqual(plain, 'libvirt reply');

      assert.equal(daemon.clientCount, 0);
      assert.ok(!logs.some((l) => /"client connected"/.test(l)), 'no session was ever created, so no procedure ran');
      assert.ok(logs.filter((l) => /TLS handshake refused/.test(l)).length >= 2, logs.join(''));

      // the same daemon lets its own CA's client in
      const ok = await connect(`${a.uri}?pkipath=${pkiA}`);
      assert.equal(await ok.getType(), 'sparsevirt');
      await ok.close();
    } finally {
      await daemon.close();
    }
  });
});

describe('plain TCP is off unless asked for', () => {
  test('a daemon started with default options listens on its unix socket and on no TCP port', async () => {
    const dir = await scratchDir();
    try {
      // not root, so that the defaults land in this directory (root's are /run and /var/lib)
      const home = path.join(dir, 'home');
      await fsp.mkdir(path.join(home, 'run'), { recursive: true });
      const env = { HOME: home, XDG_RUNTIME_DIR: path.join(home, 'run'), XDG_STATE_HOME: path.join(home, 'state') };
      const before = listeningTcpInodes();
      const d = await spawnDaemon({ dir, listen: null, asNobody: true, env, args: [], waitReady: false });
      try {
        const sock = path.join(home, 'run', 'sparsevirt', 'sparsevirt-sock');
        await waitUntil(() => fs.existsSync(sock), 10000, 'the default socket');
        const inodes = openFds(d.pid).map((f) => /^socket:\[(\d+)\]$/.exec(f)?.[1]).filter((x): x is string => !!x);
        assert.ok(inodes.length > 0, 'the daemon has sockets');
        const tcp = listeningTcpInodes();
        assert.deepEqual(inodes.filter((i) => tcp.has(i) && !before.has(i)), [], 'no TCP listener');
        if (isRoot()) {
          // the socket answers (root may connect to nobody's 0600 socket)
          const c = await RawClient.connect(sock);
          await c.handshake();
          c.close();
        }
      } finally {
        await d.stop();
      }
    } finally {
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('read-only connections', () => {
  test('every procedure that changes something is refused read-only, before its arguments are looked up, and nothing changes', async () => {
    const d = await startTestDaemon();
    try {
      const poolDir = path.join(d.dir, 'pool');
      const conn = await connect(d.uri);
      const pool = await conn.storagePoolDefineDir('anchor', poolDir);
      await pool.build();
      await pool.create();
      const v = await pool.createVol({ name: 'proto-sparse.img', capacity: 4 << 20, allocation: 0 });
      const src = path.join(d.dir, 'src.img');
      await makeImage(src, [{ kind: 'data', length: 70000 }, { kind: 'hole', length: (4 << 20) - 70000 }], 4);
      await v.uploadFile(src, { sparse: true });
      const snapshot = async () => JSON.stringify({
        pools: await Promise.all((await conn.listAllStoragePools()).map(async (p) => [p.name, await p.isActive(), await p.autostart()])),
        files: (await fsp.readdir(poolDir)).sort(),
        sha: await sha256File(path.join(poolDir, 'proto-sparse.img')),
        size: fs.statSync(path.join(poolDir, 'proto-sparse.img')).size,
      });
      const before = await snapshot();

      const ro = await RawClient.connect(d.socket);
      await ro.handshake(1);
      // well-formed calls on things that do and do not exist: the refusal comes first either way
      const existing = synthesizedExchanges({ anchor: poolDir, proto: path.join(d.dir, 'proto') }).map((s) => s.frames[0]!);
      const defineXml = `<pool type='dir'><name>ro-pool</name><target><path>${path.join(d.dir, 'ro-pool')}</path></target></pool>`;
      existing.push({ h: { prog: REMOTE_PROGRAM, vers: 1, proc: P.STORAGE_POOL_DEFINE_XML.num, type: 0, serial: 0, status: 0 }, payload: encode(P.STORAGE_POOL_DEFINE_XML.args, { xml: defineXml, flags: 0 }), marks: [] });
      existing.push({ h: { prog: REMOTE_PROGRAM, vers: 1, proc: P.STORAGE_POOL_CREATE_XML.num, type: 0, serial: 0, status: 0 }, payload: encode(P.STORAGE_POOL_CREATE_XML.args, { xml: defineXml, flags: 1 }), marks: [] });
      existing.push({ h: { prog: REMOTE_PROGRAM, vers: 1, proc: P.CONNECT_FIND_STORAGE_POOL_SOURCES.num, type: 0, serial: 0, status: 0 }, payload: encode(P.CONNECT_FIND_STORAGE_POOL_SOURCES.args, { type: 'dir', srcSpec: null, flags: 0 }), marks: [] });
      const anchorRef = { name: 'anchor', uuid: Buffer.from(pool.uuidString.replace(/-/g, ''), 'hex') };
      existing.push({
        h: { prog: REMOTE_PROGRAM, vers: 1, proc: P.STORAGE_VOL_CREATE_XML_FROM.num, type: 0, serial: 0, status: 0 },
        payload: encode(P.STORAGE_VOL_CREATE_XML_FROM.args, {
          pool: anchorRef, xml: "<volume><name>ro-clone.img</name><capacity>0</capacity></volume>", clonevol: { pool: 'anchor', name: 'proto-sparse.img', key: '' }, flags: 0,
        }),
        marks: [],
      });
      const writes = [...PROCEDURES_BY_NUM.values()].filter((p) => p.writes && p.num !== P.STORAGE_VOL_DOWNLOAD.num);
      assert.ok(writes.length >= 14, `${writes.length} procedures change something`);
      let serial = 500;
      for (const proc of writes) {
        const frames = existing.filter((f) => f.h.proc === proc.num);
        assert.ok(frames.length > 0, `a sample call of ${proc.name}`);
        for (const f of frames) {
          const s = serial++;
          ro.send({ proc: proc.num, serial: s }, f.payload);
          const r = await ro.waitFor((x) => x.serial === s && x.type === MessageType.REPLY);
          assert.equal(r.status, Status.ERROR, proc.name);
          const e = errorOf(r);
          assert.equal(e.virCode, 29, `${proc.name}: ${e.message}`);
          assert.match(e.message, /^operation forbidden: read only access prevents vir\w+$/);
        }
      }
      // an upload's stream packets sent anyway have no stream to go to
      ro.send({ proc: P.STORAGE_VOL_UPLOAD.num, serial: 700, type: MessageType.STREAM, status: Status.CONTINUE }, Buffer.alloc(4096, 1));
      ro.send({ proc: P.STORAGE_VOL_UPLOAD.num, serial: 700, type: MessageType.STREAM, status: Status.OK });
      const orphan = await ro.waitFor((x) => x.serial === 700);
      assert.match(errorOf(orphan).message, /no stream is open/);
      // reading is still allowed
      const dl = await ro.call(P.STORAGE_VOL_DOWNLOAD, { vol: { pool: 'anchor', name: 'proto-sparse.img', key: '' }, offset: 0n, length: 0n, flags: 1 });
      assert.equal(dl.status, Status.OK);
      ro.close();
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(await snapshot(), before, 'nothing changed');
      await conn.close();
    } finally {
      await d.stop();
    }
  });
});
