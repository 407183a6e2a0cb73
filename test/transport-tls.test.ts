/**
 * The TLS client checks the server: our client (the library's `connect('qemu+tls://…')` and the
 * `sparsevirt` CLI) pointed at sparsevirtd's TLS listener serving
 *  - a certificate from a CA the client does not trust,
 *  - a certificate for another host name,
 *  - an expired certificate,
 * refuses each with the reason, before any procedure runs; with `no_verify=1` it accepts each, as
 * libvirt's client does (virsh, when installed, is run against the same servers and must agree),
 * while the server still checks the client's certificate. The PKI is made here with openssl.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import diagnostics from 'node:diagnostics_channel';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { tmpdir } from 'node:os';
import { fileURLToPath } from 'node:url';
import { after, before, describe, test } from 'node:test';
import { connect } from '../src/client/index.js';
import { SparsevirtError } from '../src/errors.js';
import { startDaemon, type DaemonHandle } from '../src/daemon/index.js';
import { scratchDir } from './helpers/images.js';

const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../bin/sparsevirt.cjs');

interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

function run(cmd: string, args: string[], opts: { cwd?: string; timeoutMs?: number } = {}): Promise<Ran> {
  return new Promise((resolve) => {
    execFile(cmd, args, { cwd: opts.cwd, timeout: opts.timeoutMs ?? 30_000, encoding: 'utf8' }, (err, stdout, stderr) => {
      const c = (err as { code?: unknown } | null)?.code;
      resolve({ code: err ? (typeof c === 'number' ? c : -1) : 0, stdout, stderr: err && c === 'ENOENT' ? String(err.message) : stderr });
    });
  });
}

async function openssl(cwd: string, args: string[]): Promise<void> {
  const r = await run('openssl', args, { cwd });
  assert.equal(r.code, 0, `openssl ${args.join(' ')}: ${r.stderr}`);
}

/** A CA: <name>cert.pem, <name>key.pem. */
async function makeCa(dir: string, name: string): Promise<void> {
  await openssl(dir, ['req', '-x509', '-new', '-newkey', 'rsa:2048', '-nodes', '-sha256', '-days', '30',
    '-keyout', `${name}key.pem`, '-out', `${name}cert.pem`, '-subj', `/O=sparsevirt test/CN=${name} CA`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
}

/**
 * A leaf certificate signed by CA `ca`: <name>cert.pem, <name>key.pem. `expired`: valid for one
 * day in 2020 only (openssl ca can set the dates; x509 -req cannot backdate).
 */
async function makeLeaf(dir: string, name: string, o: { ca: string; eku: 'serverAuth' | 'clientAuth'; san: string; expired?: boolean }): Promise<void> {
  await fsp.writeFile(path.join(dir, `${name}.ext`), [
    'basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature,keyEncipherment',
    `extendedKeyUsage=${o.eku}`, `subjectAltName=${o.san}`, '',
  ].join('\n'));
  await openssl(dir, ['req', '-new', '-newkey', 'rsa:2048', '-nodes', '-sha256', '-keyout', `${name}key.pem`, '-out', `${name}.csr`, '-subj', `/O=sparsevirt test/CN=${name}`]);
  if (!o.expired) {
    await openssl(dir, ['x509', '-req', '-sha256', '-days', '30', '-in', `${name}.csr`, '-CA', `${o.ca}cert.pem`, '-CAkey', `${o.ca}key.pem`,
      '-set_serial', String(1000 + Math.floor(Math.random() * 1e6)), '-extfile', `${name}.ext`, '-out', `${name}cert.pem`]);
    return;
  }
  const db = path.join(dir, `${name}-db`);
  await fsp.mkdir(db);
  await fsp.writeFile(path.join(db, 'index.txt'), '');
  await fsp.writeFile(path.join(db, 'serial'), '1001\n');
  await fsp.writeFile(path.join(dir, `${name}-ca.cnf`), [
    '[ ca ]', 'default_ca = test', '[ test ]', `database = ${db}/index.txt`, `new_certs_dir = ${db}`, `serial = ${db}/serial`,
    'default_md = sha256', 'policy = any', 'unique_subject = no', '[ any ]', 'commonName = supplied', 'organizationName = optional', '',
  ].join('\n'));
  await openssl(dir, ['ca', '-batch', '-config', `${name}-ca.cnf`, '-cert', `${o.ca}cert.pem`, '-keyfile', `${o.ca}key.pem`,
    '-startdate', '20200101000000Z', '-enddate', '20200102000000Z', '-extfile', `${name}.ext`, '-notext', '-in', `${name}.csr`, '-out', `${name}cert.pem`]);
}

/** A client pkipath in libvirt's layout: cacert.pem (the CA it trusts), clientcert.pem, clientkey.pem. */
async function clientPki(dir: string, name: string, ca: string, client: string): Promise<string> {
  const p = path.join(dir, name);
  await fsp.mkdir(p);
  await fsp.copyFile(path.join(dir, `${ca}cert.pem`), path.join(p, 'cacert.pem'));
  await fsp.copyFile(path.join(dir, `${client}cert.pem`), path.join(p, 'clientcert.pem'));
  await fsp.copyFile(path.join(dir, `${client}key.pem`), path.join(p, 'clientkey.pem'));
  return p;
}

type Case = 'good' | 'unknown-ca' | 'other-host' | 'expired';

/** What the client says for each bad server certificate (Node's OpenSSL wording). */
const REASON: Record<Exclude<Case, 'good'>, RegExp> = {
  'unknown-ca': /unable to verify the first certificate|unable to get local issuer certificate|self[- ]signed certificate/,
  'other-host': /Hostname\/IP does not match certificate's altnames/,
  expired: /certificate has expired/,
};

describe('the TLS client refuses a server certificate it cannot verify', () => {
  let dir: string;
  let pki: string;
  let roguePki: string;
  let virshPresent = false;
  const daemons = new Map<Case, { handle: DaemonHandle; port: number }>();

  before(async () => {
    dir = await scratchDir(tmpdir(), 'svtls-');
    await Promise.all([makeCa(dir, 'trusted'), makeCa(dir, 'rogue')]);
    const hostSan = 'DNS:localhost,IP:127.0.0.1';
    await Promise.all([
      makeLeaf(dir, 'good', { ca: 'trusted', eku: 'serverAuth', san: hostSan }),
      makeLeaf(dir, 'unknown-ca', { ca: 'rogue', eku: 'serverAuth', san: hostSan }),
      makeLeaf(dir, 'other-host', { ca: 'trusted', eku: 'serverAuth', san: 'DNS:other-host.example' }),
      makeLeaf(dir, 'expired', { ca: 'trusted', eku: 'serverAuth', san: hostSan, expired: true }),
      makeLeaf(dir, 'client', { ca: 'trusted', eku: 'clientAuth', san: 'DNS:localhost' }),
      makeLeaf(dir, 'rogue-client', { ca: 'rogue', eku: 'clientAuth', san: 'DNS:localhost' }),
    ]);
    pki = await clientPki(dir, 'pki', 'trusted', 'client');
    roguePki = await clientPki(dir, 'pki-rogue-client', 'trusted', 'rogue-client');
    for (const c of ['good', 'unknown-ca', 'other-host', 'expired'] as const) {
      const handle = await startDaemon({
        stateDir: path.join(dir, `state-${c}`), listen: ['tls:127.0.0.1:0'], defaultPool: false, logSink: () => undefined,
        // the server trusts the client's CA: only the server's own certificate is at fault
        tls: { cert: path.join(dir, `${c}cert.pem`), key: path.join(dir, `${c}key.pem`), ca: path.join(dir, 'trustedcert.pem') },
      });
      daemons.set(c, { handle, port: (handle.addresses[0] as { port: number }).port });
    }
    virshPresent = (await run('virsh', ['--version'])).code === 0;
  });
  after(async () => {
    for (const d of daemons.values()) await d.handle.close();
    await fsp.rm(dir, { recursive: true, force: true });
  });

  const uri = (c: Case, host: string, extra = '', p = pki) => `qemu+tls://${host}:${daemons.get(c)!.port}/system?pkipath=${p}${extra}`;
  const cli = (u: string) => run(process.execPath, [CLI, '-c', u, 'pool-list', '--all', '--name']);
  const virsh = (u: string) => run('virsh', ['-c', u, 'pool-list', '--all', '--name']);

  test('control: a certificate from the trusted CA for the host: the library and the CLI connect, by name and by address', async () => {
    for (const host of ['localhost', '127.0.0.1']) {
      const conn = await connect(uri('good', host), { timeout: 10_000 });
      assert.equal(await conn.getType(), 'sparsevirt');
      await conn.close();
      const r = await cli(uri('good', host));
      assert.equal(r.code, 0, r.stderr);
    }
  });

  for (const c of ['unknown-ca', 'other-host', 'expired'] as const) {
    const what = { 'unknown-ca': 'from a CA the client does not trust', 'other-host': 'issued for another host name', expired: 'that has expired' }[c];
    test(`a server certificate ${what}: the library and the CLI refuse it with the reason; no procedure runs`, async () => {
      const d = daemons.get(c)!;
      // every RPC frame the in-process daemon receives or sends (our refused clients make no Peer here)
      const frames: unknown[] = [];
      const onFrame = (m: unknown) => frames.push(m);
      diagnostics.subscribe('sparsevirt:rpc:frame', onFrame);
      try {
        await refusedEverywhere(c, d.port);
      } finally {
        diagnostics.unsubscribe('sparsevirt:rpc:frame', onFrame);
      }
      assert.deepEqual(frames, [], 'not one RPC frame passed');
    });
  }

  async function refusedEverywhere(c: Exclude<Case, 'good'>, port: number): Promise<void> {
    for (const host of ['localhost', '127.0.0.1']) {
      const u = uri(c, host);
      const err = await connect(u, { timeout: 10_000 }).then(async (conn) => {
        await conn.close();
        return null;
      }, (e: unknown) => e);
      assert.ok(err instanceof SparsevirtError, `${u}: connected (${String(err)})`);
      assert.equal(err.code, 'ERR_CONNECTION_CLOSED', err.message);
      assert.match(err.message, new RegExp(`^failed to connect to tls ${host.replace(/\./g, '\\.')}:${port}: `));
      assert.match(err.message, REASON[c]);

      const r = await cli(u);
      assert.equal(r.code, 1, `CLI exit status; stderr: ${r.stderr}`);
      assert.equal(r.stdout, '');
      const lines = r.stderr.trimEnd().split('\n');
      assert.equal(lines[0], 'error: failed to connect to the hypervisor', r.stderr);
      assert.match(lines.at(-1)!, REASON[c]);

      if (virshPresent) {
        // libvirt's own client refuses it too (the certificate is bad for GnuTLS as well)
        const v = await virsh(u);
        assert.equal(v.code, 1, `virsh: ${v.stderr}`);
        assert.match(v.stderr, /Failed to verify peer's certificate/);
      }
    }
  }

  test('no_verify=1, as libvirt: each of those certificates is accepted (virsh agrees); the server still refuses a client certificate it does not trust', async () => {
    for (const c of ['unknown-ca', 'other-host', 'expired'] as const) {
      for (const host of ['localhost', '127.0.0.1']) {
        const u = uri(c, host, '&no_verify=1');
        const conn = await connect(u, { timeout: 10_000 });
        assert.equal(await conn.getType(), 'sparsevirt', u);
        assert.deepEqual(await conn.listAllStoragePools(), []);
        await conn.close();
        const r = await cli(u);
        assert.equal(r.code, 0, `${u}: ${r.stderr}`);
        if (virshPresent) {
          const v = await virsh(u);
          assert.equal(v.code, 0, `virsh ${u}: ${v.stderr}`);
        }
      }
    }
    // no_verify is about the client's checks only: a client certificate from another CA is still refused
    for (const c of ['good', 'expired'] as const) {
      const u = uri(c, '127.0.0.1', '&no_verify=1', roguePki);
      const err = await connect(u, { timeout: 10_000 }).then(async (conn) => {
        await conn.close();
        return null;
      }, (e: unknown) => e);
      assert.ok(err instanceof SparsevirtError && ['ERR_ACCESS_DENIED', 'ERR_CONNECTION_CLOSED'].includes(err.code), `${u}: ${String(err)}`);
      const r = await cli(u);
      assert.equal(r.code, 1, r.stderr);
      if (virshPresent) assert.equal((await virsh(u)).code, 1, 'virsh is refused as well');
    }
  });
});
