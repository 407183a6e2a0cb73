/**
 * Secrets through libvirt's own Python client and virsh, against sparsevirtd and libvirtd 9.0:
 * the same calls give the same results and the same errors (code, domain, message), including
 * the refusals (a private value, flags, read-only connections). Then what only the daemon's
 * files show: values mode 0600, ephemeral secrets never written, state kept across a restart.
 * Locally a missing python3-libvirt or libvirtd skips; in CI (CI set) it fails.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { startTestDaemon } from './helpers/daemon.js';
import { scratchDir } from './helpers/images.js';
import { run } from './helpers/run.js';
import { PYTHON, requireLibvirt, requirePython, virsh, virshOk } from './helpers/libvirt.js';

/** One line per call: `ok <value>` or `err <code> <domain> <message>`. */
const SCRIPT = String.raw`
import libvirt, os, sys
libvirt.registerErrorHandler(lambda *a: None, None)
uri = os.environ['URI']; u = os.environ['UUID']; usage = 'svtest ' + u[9:]
out = []
def t(f):
    try: out.append('ok %r' % (f(),))
    except libvirt.libvirtError as e: out.append('err %d %d %s' % (e.get_error_code(), e.get_error_domain(), e.get_error_message()))
c = libvirt.open(uri)
x = "<secret ephemeral='no' private='no'><uuid>%s</uuid><description>d &amp; e</description><usage type='ceph'><name>%s</name></usage></secret>" % (u, usage)
s = c.secretDefineXML(x)
t(lambda: s.value())
t(lambda: s.setValue(b'\x00\x01binary', 0))
t(lambda: s.value())
t(lambda: (s.UUIDString(), s.usageType(), s.usageID()))
t(lambda: s.XMLDesc())
t(lambda: c.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_CEPH, usage).UUIDString())
t(lambda: c.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_VOLUME, usage).UUIDString())
t(lambda: u in [z.UUIDString() for z in c.listAllSecrets(libvirt.VIR_CONNECT_LIST_SECRETS_NO_PRIVATE)])
t(lambda: u in [z.UUIDString() for z in c.listAllSecrets(libvirt.VIR_CONNECT_LIST_SECRETS_PRIVATE | libvirt.VIR_CONNECT_LIST_SECRETS_EPHEMERAL)])
t(lambda: u in c.listSecrets())
t(lambda: c.secretDefineXML(x.replace(usage, usage + 'x')).UUIDString())
t(lambda: c.secretDefineXML(x.replace(u[:8], 'ffffffff')).UUIDString())
t(lambda: c.secretDefineXML(x.replace("private='no'", "private='yes'")).XMLDesc())
t(lambda: s.value())
t(lambda: c.secretDefineXML(x).UUIDString())
t(lambda: s.setValue(b'x', 1))
t(lambda: s.value(1))
t(lambda: s.XMLDesc(1))
t(lambda: len(c.listAllSecrets(64)))
t(lambda: c.secretDefineXML("<secret><usage type='ceph'></usage></secret>").UUIDString())
t(lambda: c.secretDefineXML("<secret><usage type='bogus'><name>a</name></usage></secret>").UUIDString())
t(lambda: c.secretDefineXML("<secret ephemeral='maybe'/>").UUIDString())
t(lambda: c.secretDefineXML("<secret><uuid>nope</uuid></secret>").UUIDString())
t(lambda: c.secretDefineXML("<notsecret/>").UUIDString())
t(lambda: c.secretLookupByUUIDString('00000000-0000-4000-8000-00000000dead'))
r = libvirt.openReadOnly(uri)
t(lambda: r.secretLookupByUUIDString(u).usageID())
t(lambda: r.secretLookupByUUIDString(u).value())
t(lambda: r.secretLookupByUUIDString(u).setValue(b'y', 0))
t(lambda: r.secretLookupByUUIDString(u).undefine())
t(lambda: r.secretDefineXML(x).UUIDString())
t(lambda: s.undefine())
t(lambda: s.undefine())
t(lambda: s.value())
print('\n'.join(out))
`;

test('secrets: python3-libvirt and virsh get from sparsevirtd what they get from libvirtd', async (t) => {
  if (!(await requirePython(t)) || !(await requireLibvirt(t))) return;
  const d = await startTestDaemon();
  try {
    const uuid = `e5e5e5e5-0000-4000-8000-${randomBytes(6).toString('hex')}`;
    const py = async (uri: string): Promise<string[]> => {
      const r = await run(PYTHON, ['-c', SCRIPT], { timeoutMs: 60_000, env: { ...process.env, URI: uri, UUID: uuid } });
      assert.equal(r.code, 0, r.stderr);
      return r.stdout.trim().split('\n');
    };
    const theirs = await py('qemu:///system');
    const ours = await py(d.virshUri);
    assert.equal(ours.length, theirs.length);
    for (let i = 0; i < ours.length; i++) assert.equal(ours[i], theirs[i], `call ${i + 1}`);

    // virsh: the same texts from both
    const xml = path.join(d.dir, 'secret.xml');
    await fsp.writeFile(xml, `<secret ephemeral='no' private='yes'><uuid>${uuid}</uuid><usage type='ceph'><name>virsh ${uuid}</name></usage></secret>`);
    const key = path.join(d.dir, 'key');
    await fsp.writeFile(key, 'AQAvPhZrZNsULhAA+az/MWVwAzsxuo+ZpbKfpA==');
    try {
      for (const args of [['secret-define', xml], ['secret-set-value', uuid, '--file', key], ['secret-dumpxml', uuid], ['secret-get-value', uuid], ['-r', 'secret-get-value', uuid]]) {
        const a = await virsh(args, { uri: d.virshUri });
        const b = await virsh(args);
        assert.deepEqual([a.code, a.stdout, a.stderr], [b.code, b.stdout, b.stderr], args.join(' '));
      }
      const line = (out: string) => out.split('\n').find((l) => l.includes(uuid));
      assert.equal(line(await virshOk(['secret-list'], { uri: d.virshUri })), line(await virshOk(['secret-list'])));
    } finally {
      await virsh(['secret-undefine', uuid]);
    }

    // the daemon's files: the value 0600, base64 as libvirt keeps it; kept across a restart
    const dir = path.join(d.stateDir, 'secrets');
    assert.equal((await fsp.stat(path.join(dir, `${uuid}.base64`))).mode & 0o777, 0o600);
    assert.equal((await fsp.stat(path.join(dir, `${uuid}.xml`))).mode & 0o777, 0o600);
    assert.equal(await fsp.readFile(path.join(dir, `${uuid}.base64`), 'latin1'), 'AQAvPhZrZNsULhAA+az/MWVwAzsxuo+ZpbKfpA==');
    const eph = `e6e6e6e6-0000-4000-8000-${randomBytes(6).toString('hex')}`;
    await fsp.writeFile(xml, `<secret ephemeral='yes' private='no'><uuid>${eph}</uuid></secret>`);
    await virshOk(['secret-define', xml], { uri: d.virshUri });
    await virshOk(['secret-set-value', eph, '--file', key], { uri: d.virshUri });
    assert.deepEqual((await fsp.readdir(dir)).filter((f) => f.startsWith(eph)), []);
  } finally {
    await d.stop();
  }
});

test('secrets persist across a daemon restart; ephemeral ones do not', async () => {
  const dir = await scratchDir();
  try {
    const uuid = 'f7f7f7f7-0000-4000-8000-000000000001';
    const eph = 'f7f7f7f7-0000-4000-8000-000000000002';
    let d = await startTestDaemon({ dir });
    const uri = d.virshUri;
    await fsp.writeFile(path.join(dir, 'a.xml'), `<secret ephemeral='no' private='no'><uuid>${uuid}</uuid><usage type='ceph'><name>kept</name></usage></secret>`);
    await fsp.writeFile(path.join(dir, 'b.xml'), `<secret ephemeral='yes' private='no'><uuid>${eph}</uuid><usage type='ceph'><name>gone</name></usage></secret>`);
    await fsp.writeFile(path.join(dir, 'k'), 'c2VjcmV0');
    for (const [id, f] of [[uuid, 'a.xml'], [eph, 'b.xml']] as const) {
      await virshOk(['secret-define', path.join(dir, f)], { uri });
      await virshOk(['secret-set-value', id, '--file', path.join(dir, 'k')], { uri });
    }
    await d.stop();
    d = await startTestDaemon({ dir });
    try {
      const list = await virshOk(['secret-list'], { uri });
      assert.match(list, new RegExp(`${uuid}\\s+ceph kept`));
      assert.doesNotMatch(list, new RegExp(eph));
      assert.equal((await virshOk(['secret-get-value', uuid], { uri })).trim(), 'c2VjcmV0');
    } finally {
      await d.stop();
    }
  } finally {
    await fsp.rm(dir, { recursive: true, force: true });
  }
});
