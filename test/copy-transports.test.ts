/**
 * copyVolume and `sparsevirt vol-copy` with the source and the destination each reached over
 * tcp, tls and ssh: sparsevirtd → sparsevirtd (both daemons listening on tcp and tls with the
 * test PKI, and reached over ssh by netcat to their unix sockets) and libvirtd → sparsevirtd
 * (libvirtd's TCP 16509 and TLS 16514 listeners, and ssh with virt-ssh-helper). Every copy keeps
 * the bytes (sha256) and the hole map, and the verified digest is the source's.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { connect, type Connection } from '../src/index.js';
import { copyVolume } from '../src/client/copy.js';
import { ContentDigest } from '../src/digest.js';
import { cliRaw } from './cli-support.js';
import { startTestDaemon, type TestDaemon } from './helpers/daemon.js';
import { extentMap, makeImage, scratchDir, sha256File, type Layout } from './helpers/images.js';
import {
  createVolume, LIBVIRTD_PKI_DIR, LIBVIRTD_TCP_URI, LIBVIRTD_TLS_URI, requireLibvirtListeners, withScratchPool,
} from './helpers/libvirt.js';

const MiB = 1 << 20;
const LAYOUT: Layout = [
  { kind: 'data', length: 3 * MiB + 4096 },
  { kind: 'hole', length: 13 * MiB - 4096 },
  { kind: 'data', length: 20 * MiB },
  { kind: 'hole', length: 20 * MiB },
  { kind: 'data', length: 8 * MiB },
  { kind: 'hole', length: 8 * MiB },
];
const SIZE = 72 * MiB;
const DATA = 31 * MiB + 4096;

const SSH_DIR = process.env.SPARSEVIRT_SSH_DIR ?? '/etc/pki/sparsevirt-test/ssh';
const SSH_PORT = Number(process.env.SPARSEVIRT_SSH_PORT ?? 2222);
const KEY = path.join(SSH_DIR, 'id_ed25519');
const sshParams = `keyfile=${KEY}&no_verify=1&no_tty=1&known_hosts=/dev/null`;

let sshCache: Promise<boolean> | undefined;
/** Whether the test sshd answers; fails in CI when .ci/run said it set it up. */
async function requireSsh(t: TestContext): Promise<boolean> {
  sshCache ??= new Promise((resolve) => {
    execFile('ssh', ['-q', '-p', String(SSH_PORT), '-i', KEY, '-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=no',
      '-o', 'UserKnownHostsFile=/dev/null', 'root@127.0.0.1', 'true'], { timeout: 20_000 }, (err) => resolve(!err));
  });
  if (await sshCache) return true;
  const hint = `no test sshd on 127.0.0.1:${SSH_PORT} with key ${KEY} (run: sudo scripts/setup-ssh.sh)`;
  if (process.env.CI && process.env.SPARSEVIRT_EXPECT_SSH === '1') throw new Error(hint);
  t.skip(hint);
  return false;
}

const PKI_FILES = ['cacert.pem', 'servercert.pem', 'serverkey.pem', 'clientcert.pem', 'clientkey.pem'];
function requirePki(t: TestContext): boolean {
  if (PKI_FILES.every((f) => fs.existsSync(path.join(LIBVIRTD_PKI_DIR, f)))) return true;
  const hint = `no test PKI in ${LIBVIRTD_PKI_DIR} (run: sudo scripts/setup-libvirt.sh --tcp-tls)`;
  if (process.env.CI && process.env.SPARSEVIRT_EXPECT_TLS === '1') throw new Error(hint);
  t.skip(hint);
  return false;
}

function fileDigest(file: string): string {
  const d = new ContentDigest(0, SIZE);
  d.update({ kind: 'data', bytes: fs.readFileSync(file) });
  return d.digest();
}

type Transport = 'tcp' | 'tls' | 'ssh';

/** A sparsevirtd listening on unix (for ssh), tcp and tls, with a dir pool `name`. */
interface SvSide {
  d: TestDaemon;
  poolDir: string;
  uri(t: Transport): string;
}

async function svSide(dir: string, name: string): Promise<SvSide> {
  const base = path.join(dir, name);
  fs.mkdirSync(base);
  const socket = path.join(base, 'sock');
  const d = await startTestDaemon({ dir: base, listen: [`unix:${socket}`, 'tcp:127.0.0.1:0', 'tls:127.0.0.1:0'], tls: { pkipath: LIBVIRTD_PKI_DIR } });
  const tcp = d.daemon.addresses.find((a) => a.kind === 'tcp')!;
  const tls = d.daemon.addresses.find((a) => a.kind === 'tls')!;
  const poolDir = path.join(base, 'pool');
  const c = await connect(d.uri);
  try {
    const pool = await c.storagePoolDefineDir(name, poolDir);
    await pool.build();
    await pool.create();
  } finally {
    await c.close();
  }
  return {
    d, poolDir,
    uri: (t) => t === 'tcp' ? tcp.uri
      : t === 'tls' ? `${tls.uri}?pkipath=${LIBVIRTD_PKI_DIR}`
      : `qemu+ssh://root@127.0.0.1:${SSH_PORT}/system?${sshParams}&socket=${encodeURIComponent(socket)}`,
  };
}

const libvirtdUri = (t: Transport): string =>
  t === 'tcp' ? LIBVIRTD_TCP_URI : t === 'tls' ? LIBVIRTD_TLS_URI : `qemu+ssh://root@127.0.0.1:${SSH_PORT}/system?${sshParams}&proxy=native`;

async function checkCopy(srcFile: string, dstFile: string): Promise<void> {
  assert.equal(await sha256File(dstFile), await sha256File(srcFile), 'the same bytes');
  assert.deepEqual(await extentMap(dstFile), await extentMap(srcFile), 'the same holes');
}

async function withConns<T>(a: string, b: string, fn: (a: Connection, b: Connection) => Promise<T>): Promise<T> {
  const ca = await connect(a, { timeout: 30_000 });
  try {
    const cb = await connect(b, { timeout: 30_000 });
    try {
      return await fn(ca, cb);
    } finally {
      await cb.close();
    }
  } finally {
    await ca.close();
  }
}

test('sparsevirtd → sparsevirtd over tcp → tls, tls → ssh, ssh → tcp: bytes, holes and digest', { timeout: 180_000 }, async (t) => {
  if (!requirePki(t) || !(await requireSsh(t))) return;
  const dir = await scratchDir('/dev/shm', 'svd-copy-tr-');
  let a: SvSide | null = null;
  let b: SvSide | null = null;
  try {
    a = await svSide(dir, 'a');
    b = await svSide(dir, 'b');
    const srcFile = path.join(a.poolDir, 'disk.img');
    await makeImage(srcFile, LAYOUT, 61);
    const want = fileDigest(srcFile);
    const pairs: Array<[Transport, Transport]> = [['tcp', 'tls'], ['tls', 'ssh'], ['ssh', 'tcp']];
    for (const [from, to] of pairs) {
      const name = `${from}-${to}.img`;
      await withConns(a.uri(from), b.uri(to), async (ca, cb) => {
        const sp = await ca.storagePoolLookupByName('a');
        await sp.refresh();
        const src = await sp.volLookupByName('disk.img');
        const dst = await (await cb.storagePoolLookupByName('b')).createVol({ name, capacity: SIZE, allocation: 0, format: 'raw' });
        const r = await copyVolume(src, dst, { sparse: true, verify: true });
        assert.equal(r.dataBytes, DATA, `${from} → ${to}: data bytes`);
        assert.equal(r.holeBytes, SIZE - DATA, `${from} → ${to}: hole bytes`);
        assert.equal(r.digest, want, `${from} → ${to}: the digest`);
      });
      await checkCopy(srcFile, path.join(b.poolDir, name));
    }
  } finally {
    await a?.d.stop();
    await b?.d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('libvirtd → sparsevirtd over tcp → ssh, tls → tcp, ssh → tls (the CLI for the last): bytes, holes and digest', { timeout: 180_000 }, async (t) => {
  if (!(await requireLibvirtListeners(t)) || !requirePki(t) || !(await requireSsh(t))) return;
  const dir = await scratchDir('/dev/shm', 'svd-copy-trl-');
  let b: SvSide | null = null;
  try {
    b = await svSide(dir, 'b');
    const sv = b;
    await withScratchPool('copytr', async (sp) => {
      const srcFile = await createVolume(sp, 'disk.img', SIZE);
      await makeImage(srcFile, LAYOUT, 62);
      const want = fileDigest(srcFile);
      for (const [from, to] of [['tcp', 'ssh'], ['tls', 'tcp']] as Array<[Transport, Transport]>) {
        const name = `lv-${from}-${to}.img`;
        await withConns(libvirtdUri(from), sv.uri(to), async (ca, cb) => {
          const src = await (await ca.storagePoolLookupByName(sp.name)).volLookupByName('disk.img');
          const dst = await (await cb.storagePoolLookupByName('b')).createVol({ name, capacity: SIZE, allocation: 0, format: 'raw' });
          const r = await copyVolume(src, dst, { sparse: true, verify: true });
          assert.equal(r.dataBytes, DATA, `${from} → ${to}: data bytes`);
          assert.equal(r.digest, want, `${from} → ${to}: the digest`);
        });
        await checkCopy(srcFile, path.join(sv.poolDir, name));
      }
      // the CLI: libvirtd over ssh, sparsevirtd over tls, the destination created
      const r = await cliRaw(['-c', libvirtdUri('ssh'), 'vol-copy', '--pool', sp.name, 'disk.img', '--desturi', sv.uri('tls'),
        '--dest-pool', 'b', '--dest-vol', 'cli.img', '--create', '--sparse', '--verify', '--json'], { timeoutMs: 120_000 });
      assert.equal(r.code, 0, r.stderr.toString());
      const j = JSON.parse(r.stdout.toString());
      assert.equal(j.created, true);
      assert.equal(j.data, DATA);
      assert.equal(j.digest, want);
      await checkCopy(srcFile, path.join(sv.poolDir, 'cli.img'));
    });
  } finally {
    await b?.d.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
