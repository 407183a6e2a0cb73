/**
 * The ssh transport: the URI, the ssh command line and its remote script (quoting: a value can
 * never become shell code), and, with the test sshd of scripts/setup-ssh.sh, the client and the
 * CLI over ssh to the real libvirtd (virt-ssh-helper) and to sparsevirtd (netcat), next to the
 * real virsh over the same ssh; ssh's failures reach the caller in ssh's words.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { connect, type SparsevirtError } from '../src/index.js';
import { kPeer } from '../src/client/connection.js';
import { parseUri } from '../src/transport/uri.js';
import { shellQuote, sshCommand } from '../src/transport/ssh.js';
import { requireLibvirt, virsh, createVolume, withScratchPool } from './helpers/libvirt.js';
import { startTestDaemon, withShmDaemon } from './helpers/daemon.js';
import { allocatedBytes, extentMap, makeImage, scratchDir, sha256File, type Layout } from './helpers/images.js';
import { cliRaw } from './cli-support.js';

const SSH_DIR = process.env.SPARSEVIRT_SSH_DIR ?? '/etc/pki/sparsevirt-test/ssh';
const SSH_PORT = Number(process.env.SPARSEVIRT_SSH_PORT ?? 2222);
const KEY = path.join(SSH_DIR, 'id_ed25519');
const sshUri = (extra = '', pathPart = '/system', user = 'root', port = SSH_PORT): string =>
  `qemu+ssh://${user}@127.0.0.1:${port}${pathPart}?keyfile=${KEY}&no_verify=1&no_tty=1&known_hosts=/dev/null${extra}`;

function sh(script: string, env: NodeJS.ProcessEnv = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile('sh', ['-c', script], { env: { ...process.env, ...env }, timeout: 20_000 }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr });
    });
  });
}

let sshCache: Promise<boolean> | undefined;
/** Whether the test sshd answers (cached). Fails in CI when .ci/run said it set it up. */
async function requireSsh(t: TestContext): Promise<boolean> {
  sshCache ??= sh(`ssh -q -p ${SSH_PORT} -i ${shellQuote(KEY)} -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null root@127.0.0.1 true`).then((r) => r.code === 0);
  if (await sshCache) return true;
  const hint = `no test sshd on 127.0.0.1:${SSH_PORT} with key ${KEY} (run: sudo scripts/setup-ssh.sh)`;
  if (process.env.CI && process.env.SPARSEVIRT_EXPECT_SSH === '1') throw new Error(hint);
  t.skip(hint);
  return false;
}

test('ssh URIs: user, host, port (ssh\'s default when none), path; local parameters stay out of the name sent', () => {
  const u = parseUri('qemu+ssh://alice@host.example:2022/system?keyfile=/k&no_verify=1&no_tty=1&known_hosts=/kh&proxy=netcat&netcat=ncat&socket=/s&command=/usr/bin/ssh&extra=1');
  assert.equal(u.transport, 'ssh');
  assert.equal(u.user, 'alice');
  assert.equal(u.host, 'host.example');
  assert.equal(u.port, 2022);
  assert.equal(u.path, '/system');
  assert.equal(u.name, 'qemu:///system?extra=1');
  const d = parseUri('qemu+ssh://h/session');
  assert.equal(d.port, 0, 'no -p: ssh picks its port (~/.ssh/config, 22)');
  assert.equal(d.user, null);
  assert.equal(parseUri('qemu+ssh:///system').host, 'localhost');
  assert.equal(parseUri('qemu+tls://h/system').port, 16514, 'tcp and tls keep their defaults');
  assert.throws(() => parseUri('qemu+ext://h/system'), /use unix, tcp, tls or ssh/);
});

test('the ssh command line: libvirt\'s options, "--" before the host, one quoted remote command', () => {
  const c = sshCommand(parseUri('qemu+ssh://alice@h:2022/system?keyfile=/keys/id&no_verify=1&no_tty=1&known_hosts=/kh&command=/opt/ssh'));
  assert.equal(c.file, '/opt/ssh');
  assert.deepEqual(c.args.slice(0, -1), ['-p', '2022', '-l', 'alice', '-i', '/keys/id', '-T', '-e', 'none', '-o', 'BatchMode=yes', '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/kh', '--', 'h']);
  assert.match(c.args.at(-1)!, /^sh -c '/);
  const plain = sshCommand(parseUri('qemu+ssh://h/system'));
  assert.equal(plain.file, 'ssh');
  assert.deepEqual(plain.args.slice(0, -1), ['-T', '-e', 'none', '--', 'h'], 'nothing the URI did not ask for');
  // ssh must never take a host or a user for one of its options
  assert.throws(() => sshCommand(parseUri('qemu+ssh://-oProxyCommand=touch%20x/system')), (e: SparsevirtError) => e.code === 'ERR_INVALID_ARG');
  assert.throws(() => sshCommand(parseUri('qemu+ssh://-oProxyCommand=x@h/system')), (e: SparsevirtError) => e.code === 'ERR_INVALID_ARG' && /ssh user/.test(e.message));
  assert.throws(() => sshCommand(parseUri('qemu+ssh://h/system?proxy=telnet')), /proxy must be auto, netcat or native/);
  assert.throws(() => sshCommand(parseUri('qemu+ssh://h/system?proxy=native&socket=/s')), /socket= and netcat= need proxy=netcat/);
});

test('ssh proxies as libvirt picks them: socket= or netcat= mean netcat, a session means virt-ssh-helper; read-only uses its socket and -r; bad names refused', () => {
  const remote = (uri: string, ro = false) => sshCommand(parseUri(uri), ro).args.at(-1)!;
  assert.match(remote('qemu+ssh://h/system'), /command -v virt-ssh-helper.*exec virt-ssh-helper .*qemu:\/\/\/system.*exec .*nc.* -U /);
  assert.doesNotMatch(remote('qemu+ssh://h/system?netcat=ncat'), /virt-ssh-helper/);
  assert.match(remote('qemu+ssh://h/system?netcat=ncat'), /ncat/);
  assert.doesNotMatch(remote('qemu+ssh://h/system?socket=/s'), /virt-ssh-helper/);
  assert.doesNotMatch(remote('qemu+ssh://h/session'), /nc/, 'a session: virt-ssh-helper only');
  assert.match(remote('qemu+ssh://h/session'), /virt-ssh-helper .*qemu:\/\/\/session/);
  assert.match(remote('qemu+ssh://h/system?proxy=native&extra=1'), /virt-ssh-helper .*qemu:\/\/\/system\?extra=1/, 'the helper gets the name CONNECT_OPEN sends');
  assert.match(remote('qemu+ssh://h/system?proxy=native', true), /virt-ssh-helper -r /);
  assert.match(remote('qemu+ssh://h/system?proxy=netcat', true), /libvirt-sock-ro/);
  assert.throws(() => sshCommand(parseUri('qemu+ssh://h/system?proxy=native&netcat=nc')), /need proxy=netcat/);
  assert.throws(() => sshCommand(parseUri('qemu+ssh://h/session?proxy=netcat')), /needs socket=/);
  for (const user of ['a%20b', 'x%24(id)', 'a%0Ab', 'a%60id%60', '-x']) {
    assert.throws(() => sshCommand(parseUri(`qemu+ssh://${user}@h/system`)), (e: SparsevirtError) => e.code === 'ERR_INVALID_ARG' && /invalid ssh user/.test(e.message), user);
  }
  for (const host of ['h%0Ax', 'a%20b', '-oProxyCommand=x', 'h%3Bid']) {
    assert.throws(() => sshCommand(parseUri(`qemu+ssh://${host}/system`)), (e: SparsevirtError) => e.code === 'ERR_INVALID_ARG' && /invalid ssh host/.test(e.message), host);
  }
  assert.equal(sshCommand(parseUri('qemu+ssh://[fe80::1%25eth0]:22/system')).args.includes('fe80::1%eth0'), true, 'an IPv6 zone, unescaped');
  assert.equal(sshCommand(parseUri('qemu+ssh://j.doe@h/system')).args.includes('j.doe'), true);
  assert.throws(() => parseUri('qemu+tcp://a%zz@h/system'), (e: SparsevirtError) => e.code === 'ERR_INVALID_ARG' && /bad %-escape/.test(e.message));
});

test('shell quoting: any string comes back as itself from sh, quotes and $() included', async () => {
  const tricky = ["plain", "it's", "'", "''", "a b\tc\nd", "$(touch /tmp/sv-pwned)", "`id`", "\\'\\", "; rm -rf /nonexistent;", "-n", "*", "${HOME}", "é ü ✓"];
  for (const s of tricky) {
    const r = await sh(`printf '%s' ${shellQuote(s)}`);
    assert.equal(r.stdout, s, JSON.stringify(s));
  }
  assert.equal(fs.existsSync('/tmp/sv-pwned'), false);
});

test('the remote script, run by sh as the remote login shell would: virt-ssh-helper when there, netcat otherwise; a hostile socket path stays one argument', async () => {
  const dir = fs.mkdtempSync('/tmp/sv-ssh-script-');
  try {
    const log = path.join(dir, 'calls');
    const bin = path.join(dir, 'bin');
    fs.mkdirSync(bin);
    // PATH is the fakes, then only what the script needs besides them (no system virt-ssh-helper)
    for (const b of ['sh', 'grep', 'printf']) fs.symlinkSync(fs.realpathSync(`/bin/${b}`), path.join(bin, b));
    const fake = (name: string, extra = '') => {
      fs.writeFileSync(path.join(dir, name), `#!/bin/sh\n${extra}printf '%s\\n' "${name}" "$@" >> ${shellQuote(log)}\n`, { mode: 0o755 });
    };
    const run = async (uri: string, withHelper: boolean) => {
      fs.rmSync(log, { force: true });
      for (const f of ['virt-ssh-helper', 'nc']) fs.rmSync(path.join(dir, f), { force: true });
      if (withHelper) fake('virt-ssh-helper');
      // OpenBSD netcat: `nc -q` alone complains that -q requires an argument
      fake('nc', `[ "$1" = -q ] && [ $# -eq 1 ] && { echo "nc: option requires an argument -- 'q'" >&2; exit 1; }\n`);
      const r = await sh(sshCommand(parseUri(uri)).args.at(-1)!, { PATH: `${dir}:${bin}` });
      return { code: r.code, calls: fs.existsSync(log) ? fs.readFileSync(log, 'utf8').trimEnd().split('\n') : [] };
    };
    assert.deepEqual(await run('qemu+ssh://h/system', true), { code: 0, calls: ['virt-ssh-helper', 'qemu:///system'] });
    assert.deepEqual(await run('qemu+ssh://h/session', true), { code: 0, calls: ['virt-ssh-helper', 'qemu:///session'] });
    assert.deepEqual(await run('qemu+ssh://h/system', false), { code: 0, calls: ['nc', '-q0', '-U', '/var/run/libvirt/libvirt-sock'] });
    assert.deepEqual(await run('qemu+ssh://h/system?proxy=netcat', true), { code: 0, calls: ['nc', '-q0', '-U', '/var/run/libvirt/libvirt-sock'] });
    const hostile = "/run/x'; touch /tmp/sv-pwned2; echo '$(id)";
    assert.deepEqual(await run(`qemu+ssh://h/system?socket=${encodeURIComponent(hostile)}`, true), { code: 0, calls: ['nc', '-q0', '-U', hostile] });
    assert.equal(fs.existsSync('/tmp/sv-pwned2'), false);
    // native: virt-ssh-helper or nothing
    const native = await run('qemu+ssh://h/system?proxy=native', false);
    assert.notEqual(native.code, 0);
    assert.deepEqual(native.calls, []);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

const layout: Layout = [
  { kind: 'hole', length: 1 << 20 }, { kind: 'data', length: 300_000 }, { kind: 'hole', length: 5 << 20 },
  { kind: 'data', length: 4096 }, { kind: 'hole', length: 64 << 20 }, { kind: 'data', length: 2 << 20 }, { kind: 'hole', length: 3 << 20 },
];

test('over ssh to the real libvirtd (virt-ssh-helper): sparse upload and download keep bytes and extents, with the library and the CLI', { timeout: 120_000 }, async (t) => {
  if (!(await requireLibvirt(t)) || !(await requireSsh(t))) return;
  const dir = await scratchDir('/dev/shm', 'sv-ssh-');
  try {
    await withScratchPool('ssh', async (pool) => {
      const src = path.join(dir, 'src.img');
      const size = await makeImage(src, layout, 21);
      const [hash, map] = [await sha256File(src), await extentMap(src)];
      const volPath = await createVolume(pool, 'v.img', size);
      // proxy=native: through virt-ssh-helper, nothing else
      const conn = await connect(sshUri('&proxy=native'));
      try {
        assert.ok((await conn.listAllStoragePools()).some((p) => p.name === pool.name));
        const vol = await (await conn.storagePoolLookupByName(pool.name)).volLookupByName('v.img');
        const up = await vol.uploadFile(src, { sparse: true });
        const data = 300_000 + 4096 + (2 << 20);
        assert.ok(up.dataBytes >= data && up.dataBytes <= data + 4 * 4096, `${up.dataBytes} data bytes (extents end on 4 KiB blocks)`);
        assert.equal(await sha256File(volPath), hash);
        assert.deepEqual(await extentMap(volPath), map);
        const out = path.join(dir, 'lib.img');
        await vol.downloadFile(out, { sparse: true });
        assert.equal(await sha256File(out), hash);
        assert.deepEqual(await extentMap(out), map);
        assert.ok(await allocatedBytes(out) <= 3 << 20, 'the copy is sparse');
      } finally {
        await conn.close();
      }
      const cliOut = path.join(dir, 'cli.img');
      const r = await cliRaw(['-c', sshUri('&proxy=netcat'), 'vol-download', '--pool', pool.name, 'v.img', cliOut, '--sparse']);
      assert.equal(r.code, 0, r.stderr.toString());
      assert.equal(await sha256File(cliOut), hash);
      assert.deepEqual(await extentMap(cliOut), map);
    });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('over ssh to sparsevirtd (netcat to its socket): our client and the real virsh get the same sparse copy', { timeout: 120_000 }, async (t) => {
  if (!(await requireSsh(t))) return;
  await withShmDaemon('sv-ssh-d-', async ({ dir, poolDir, d, pool }) => {
    const src = path.join(poolDir, 'v.img');
    await makeImage(src, layout, 22);
    await pool.refresh();
    const [hash, map] = [await sha256File(src), await extentMap(src)];
    const uri = sshUri(`&socket=${encodeURIComponent(d.socket)}`);
    const conn = await connect(uri);
    try {
      const vol = await (await conn.storagePoolLookupByName(pool.name)).volLookupByName('v.img');
      const out = path.join(dir, 'ours.img');
      await vol.downloadFile(out, { sparse: true });
      assert.equal(await sha256File(out), hash);
      assert.deepEqual(await extentMap(out), map);
    } finally {
      await conn.close();
    }
    const vout = path.join(dir, 'virsh.img');
    const r = await virsh(['vol-download', '--pool', pool.name, 'v.img', vout, '--sparse'], { uri });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(await sha256File(vout), hash);
    assert.deepEqual(await extentMap(vout), map);
  });
});

const sshProcesses = async (needle: string): Promise<string[]> =>
  (await sh('pgrep -a . || true')).stdout.split('\n').filter((l) => l.includes(needle) && !l.includes('pgrep'));

async function gone(needle: string, ms: number): Promise<string[]> {
  const end = Date.now() + ms;
  for (;;) {
    const left = await sshProcesses(needle);
    if (left.length === 0 || Date.now() > end) return left;
    await new Promise((r) => setTimeout(r, 100));
  }
}

const openFds = (): number => fs.readdirSync('/proc/self/fd').length;

test('ssh failures in ssh\'s own words: refused port, refused key, missing program, missing remote socket; nothing left running', { timeout: 60_000 }, async (t) => {
  if (!(await requireSsh(t))) return;
  const fails = async (uri: string, re: RegExp) => {
    await assert.rejects(connect(uri, { timeout: 20_000 }), (e: SparsevirtError) => {
      assert.equal(e.code, 'ERR_CONNECTION_CLOSED', e.message);
      assert.match(e.message, re);
      return true;
    });
  };
  await fails(sshUri('', '/system', 'root', 1), /ssh to root@127\.0\.0\.1:1 exited with code 255: .*Connection refused/);
  await fails(sshUri('', '/system', 'nobody'), /exited with code 255: .*Permission denied/);
  await fails(sshUri('&command=/nonexistent/ssh'), /cannot run '\/nonexistent\/ssh' for the ssh transport/);
  await fails(sshUri('&socket=/nonexistent/sv.sock'), /exited with code 1: .*nc: .*No such file or directory/);
  const r = await cliRaw(['-c', sshUri('', '/system', 'nobody'), 'pool-list']);
  assert.equal(r.code, 1);
  assert.match(r.stderr.toString(), /error: failed to connect to the hypervisor\nerror: .*Permission denied \(publickey\)/);
  assert.deepEqual(await gone(`-i ${KEY}`, 3000), [], 'no ssh process left');
});

test('an ssh that hangs at a prompt: connect() gives up after its timeout, quotes the prompt, and ends it', { timeout: 30_000 }, async () => {
  const dir = fs.mkdtempSync('/tmp/sv-ssh-hang-');
  try {
    const fake = path.join(dir, 'ssh-hangs');
    fs.writeFileSync(fake, "#!/bin/sh\necho \"Enter passphrase for key '/k':\" >&2\nexec sleep 30\n", { mode: 0o755 });
    const t0 = Date.now();
    await assert.rejects(connect(`qemu+ssh://h/system?command=${fake}`, { timeout: 800 }), (e: SparsevirtError) => {
      assert.equal(e.code, 'ERR_TIMEOUT');
      assert.match(e.message, /no answer through ssh to h within 800 ms: ssh said: Enter passphrase for key '\/k':/);
      return true;
    });
    assert.ok(Date.now() - t0 < 5000);
    assert.deepEqual(await gone(fake, 3000), [], 'the hanging program was ended');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('over ssh: an abort signal after connect leaves the connection alone; a connection destroyed mid-download ends ssh and leaks no fd; close() ends an ssh whose remote side never exits', { timeout: 120_000 }, async (t) => {
  if (!(await requireLibvirt(t)) || !(await requireSsh(t))) return;
  const dir = await scratchDir('/dev/shm', 'sv-ssh-end-');
  try {
    await withScratchPool('ssh-end', async (pool) => {
      const ac = new AbortController();
      const conn = await connect(sshUri(), { signal: ac.signal });
      ac.abort();
      await new Promise((r) => setTimeout(r, 200));
      assert.ok((await conn.listAllStoragePools()).length > 0, 'still connected after the abort');
      await conn.close();

      // a download cut by destroying the connection
      const src = path.join(dir, 'big.img');
      const size = await makeImage(src, [{ kind: 'data', length: 48 << 20 }, { kind: 'hole', length: 16 << 20 }], 23);
      const volPath = await createVolume(pool, 'big.img', size);
      fs.copyFileSync(src, volPath);
      const fds = openFds();
      const c2 = await connect(sshUri('&proxy=netcat'));
      const s = await (await (await c2.storagePoolLookupByName(pool.name)).volLookupByName('big.img')).download({ sparse: true });
      for await (const chunk of s) {
        assert.equal(chunk.kind, 'data');
        c2[kPeer].destroy(new Error('cut'));
        break;
      }
      assert.deepEqual(await gone(`-i ${KEY}`, 5000), [], 'ssh ended with the connection');
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(openFds(), fds, 'no fd left open');
    });

    // a remote end that keeps ssh's channel open after our side closed: a netcat that, once
    // done, leaves a process holding its output (the probe `nc -q` is answered at once)
    const d = await startTestDaemon({ dir: path.join(dir, 'd') });
    try {
      const wrapper = path.join(dir, 'nc-stays');
      fs.writeFileSync(wrapper, '#!/bin/sh\n[ $# -eq 1 ] && exec nc "$@"\nnc "$@"\nexec sleep 60\n', { mode: 0o755 });
      const c3 = await connect(sshUri(`&socket=${encodeURIComponent(d.socket)}&netcat=${encodeURIComponent(wrapper)}`));
      assert.equal((await c3.listAllStoragePools()).length, 0);
      const t0 = Date.now();
      await c3.close();
      assert.deepEqual(await gone(wrapper, 8000), [], 'ssh (and its remote netcat) ended');
      assert.ok(Date.now() - t0 < 8000);
    } finally {
      await d.stop();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('read-only over ssh, as virsh -r: virt-ssh-helper -r and netcat to libvirt-sock-ro; listing works, a change is refused by libvirtd', { timeout: 60_000 }, async (t) => {
  if (!(await requireLibvirt(t)) || !(await requireSsh(t))) return;
  for (const proxy of ['native', 'netcat']) {
    const conn = await connect(sshUri(`&proxy=${proxy}`), { readonly: true });
    try {
      assert.ok((await conn.listAllStoragePools()).length > 0, proxy);
      await assert.rejects(conn.storagePoolDefineDir(`sv-ro-${process.pid}`, '/dev/shm/sv-ro-never'), (e: SparsevirtError) => {
        assert.match(e.message, /read only access prevents/, proxy);
        return true;
      });
    } finally {
      await conn.close();
    }
  }
});
