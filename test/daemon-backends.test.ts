/**
 * The storage driver above its backends: the pool XML of any type (an rbd pool's as libvirtd 9.0
 * prints it: hosts, source name, auth, rbd:config_opts), and a backend that leaves out every
 * optional operation, answered by the driver with libvirt's VIR_ERR_NO_SUPPORT messages.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import { type Pool, registerBackend, type PoolBackend, type Volume } from '../src/daemon/backend.js';
import { CODE, storageError } from '../src/daemon/errors.js';
import { formatPoolXml, parsePoolXml } from '../src/daemon/xml.js';
import { VolType } from '../src/protocol/remote.js';
import { startTestDaemon } from './helpers/daemon.js';
import { run } from './helpers/run.js';
import { LIBVIRTD_URI, libvirtdAvailable } from './helpers/libvirt.js';

const RBD_XML = `<pool type='rbd' xmlns:rbd='http://libvirt.org/schemas/storagepool/rbd/1.0'>
  <name>NAME</name>
  <source>
    <host name='mon1.example' port='6789'/>
    <host name='mon2.example'/>
    <name>rbdpool</name>
    <auth type='ceph' username='admin'>
      <secret usage='ceph-admin'/>
    </auth>
  </source>
  <rbd:config_opts>
    <rbd:option name='client_mount_timeout' value='45'/>
    <rbd:option name='rados_osd_op_timeout' value='10'/>
  </rbd:config_opts>
</pool>
`;

/** libvirtd 9.0's pool-dumpxml of RBD_XML, defined and not started. */
const RBD_DUMP = `<pool type='rbd' xmlns:rbd='http://libvirt.org/schemas/storagepool/rbd/1.0'>
  <name>NAME</name>
  <uuid>UUID</uuid>
  <capacity unit='bytes'>0</capacity>
  <allocation unit='bytes'>0</allocation>
  <available unit='bytes'>0</available>
  <source>
    <host name='mon1.example' port='6789'/>
    <host name='mon2.example'/>
    <name>rbdpool</name>
    <auth type='ceph' username='admin'>
      <secret usage='ceph-admin'/>
    </auth>
  </source>
  <rbd:config_opts>
    <rbd:option name='client_mount_timeout' value='45'/>
    <rbd:option name='rados_osd_op_timeout' value='10'/>
  </rbd:config_opts>
</pool>
`;

const UUID = '9d00e0e1-14f6-469d-b866-5dcb2f1ef486';

describe('pool XML of any type', () => {
  test('an rbd pool: parsed, and printed as libvirtd prints it', async (t: TestContext) => {
    const def = parsePoolXml(RBD_XML.replace('NAME', 'r1'));
    assert.deepEqual(def.source, {
      hosts: [{ name: 'mon1.example', port: 6789 }, { name: 'mon2.example', port: null }],
      name: 'rbdpool',
      auth: { type: 'ceph', username: 'admin', secret: { usage: 'ceph-admin' } },
    });
    assert.deepEqual(def.configOpts, [{ name: 'client_mount_timeout', value: '45' }, { name: 'rados_osd_op_timeout', value: '10' }]);
    assert.equal(def.target, null);
    const mine = formatPoolXml({ def, uuid: UUID, capacity: 0, allocation: 0, available: 0, perms: null });
    assert.equal(mine, RBD_DUMP.replace('NAME', 'r1').replace('UUID', UUID));
    // a secret by uuid; no config options: no namespace
    const byUuid = parsePoolXml(`<pool type='rbd'><name>r2</name><source><name>p</name><auth username='u' type='ceph'><secret uuid='${UUID}'/></auth></source></pool>`);
    assert.deepEqual(byUuid.source.auth, { type: 'ceph', username: 'u', secret: { uuid: UUID } });
    assert.match(formatPoolXml({ def: byUuid, uuid: UUID, capacity: 0, allocation: 0, available: 0, perms: null }),
      new RegExp(`^<pool type='rbd'>\\n[\\s\\S]*    <auth type='ceph' username='u'>\\n      <secret uuid='${UUID}'/>\\n    </auth>\\n  </source>\\n</pool>\\n$`));
    if (!(await libvirtdAvailable())) return;
    const name = `sv-rbdxml-${process.pid}`;
    const file = path.join(fs.mkdtempSync('/tmp/sv-rbdxml-'), 'pool.xml');
    fs.writeFileSync(file, RBD_XML.replace('NAME', name));
    const defined = await run('virsh', ['-q', '-c', LIBVIRTD_URI, 'pool-define', file]);
    if (defined.code !== 0) {
      t.diagnostic(`libvirtd has no rbd pools here: ${defined.stderr.trim()}`);
      return;
    }
    try {
      const theirs = (await run('virsh', ['-q', '-c', LIBVIRTD_URI, 'pool-dumpxml', name])).stdout;
      const uuid = /<uuid>([^<]+)<\/uuid>/.exec(theirs)![1]!;
      assert.equal(`${theirs.trimEnd()}\n`, formatPoolXml({ def: parsePoolXml(RBD_XML.replace('NAME', name)), uuid, capacity: 0, allocation: 0, available: 0, perms: null }));
    } finally {
      await run('virsh', ['-q', '-c', LIBVIRTD_URI, 'pool-undefine', name]);
      fs.rmSync(path.dirname(file), { recursive: true, force: true });
    }
  });
});

/** A backend with none of the optional operations: one volume, 'v1', of 1 MiB. */
function bareBackend(): PoolBackend {
  const vol = (pool: Pool): Volume => ({ pool, name: 'v1', key: `${pool.def.source.name}/v1`, path: `${pool.def.source.name}/v1` });
  return {
    type: 'zfs',
    supports: new Set(),
    volFormats: null,
    checkDefinition(def) {
      if (!def.source.name) throw storageError(CODE.XML_ERROR, 'missing storage pool source name');
    },
    sameSource: (a, b) => a.source.name === b.source.name,
    async start(pool) {
      pool.stats = { capacity: 8n << 20n, allocation: 1n << 20n, available: 7n << 20n };
    },
    async stop() {},
    async refresh() {},
    async listVolumes() {
      return ['v1'];
    },
    async lookupVolume(pool, name) {
      if (name !== 'v1') throw storageError(CODE.NO_STORAGE_VOL, `no storage vol with matching name '${name}'`);
      return vol(pool);
    },
    async findVolume(pool, key) {
      return key === vol(pool).key ? vol(pool) : null;
    },
    async volumeInfo() {
      return { type: VolType.NETWORK, capacity: 1n << 20n, allocation: 1n << 20n, physical: 1n << 20n, format: 'raw' };
    },
    async volumeXml(v) {
      return `<volume type='network'>\n  <name>${v.name}</name>\n</volume>\n`;
    },
  };
}

describe('a backend without the optional operations', () => {
  test('the driver answers each with libvirt\'s NO_SUPPORT error; the rest works', { timeout: 60_000 }, async (t) => {
    if ((await run('virsh', ['--version'])).code !== 0) {
      if (process.env.CI) throw new Error('virsh is required in CI');
      t.skip('virsh is not installed');
      return;
    }
    registerBackend(bareBackend());
    const d = await startTestDaemon();
    const v = (args: string[]) => run('virsh', ['-q', '-c', d.virshUri, ...args], { timeoutMs: 30_000 });
    const file = path.join(d.dir, 'in.bin');
    fs.writeFileSync(file, Buffer.alloc(4096, 1));
    try {
      const xml = path.join(d.dir, 'z.xml');
      fs.writeFileSync(xml, "<pool type='zfs'><name>z</name><source><name>tank</name></source><target><path>/dev/zvol/tank</path></target></pool>");
      assert.equal((await v(['pool-define', xml])).code, 0);
      assert.equal((await v(['pool-build', 'z'])).code, 0, 'nothing to build: a no-op, as libvirt');
      assert.equal((await v(['pool-start', 'z'])).code, 0);
      assert.match((await v(['vol-list', 'z'])).stdout, /^ v1\s+tank\/v1$/m);
      assert.match((await v(['vol-info', '--pool', 'z', 'v1', '--bytes'])).stdout, /Type:\s+network\nCapacity:\s+1048576 bytes/);
      assert.equal((await v(['vol-key', '--pool', 'z', 'v1'])).stdout.trim(), 'tank/v1');
      assert.equal((await v(['vol-name', 'tank/v1'])).stdout.trim(), 'v1');
      const NS = 'error: this function is not supported by the connection driver: ';
      const refused: Array<[string[], string]> = [
        [['vol-create-as', 'z', 'n', '1M'], 'storage pool does not support volume creation'],
        [['vol-clone', '--pool', 'z', 'v1', 'n'], 'storage pool does not support volume creation from an existing volume'],
        [['vol-delete', '--pool', 'z', 'v1'], 'storage pool does not support vol deletion'],
        [['vol-resize', '--pool', 'z', 'v1', '2M'], 'storage pool does not support changing of volume capacity'],
        [['vol-wipe', '--pool', 'z', 'v1'], "storage pool doesn't support volume wiping"],
        [['vol-upload', '--pool', 'z', 'v1', file], "storage pool doesn't support volume upload"],
        [['vol-download', '--pool', 'z', 'v1', path.join(d.dir, 'out.bin')], "storage pool doesn't support volume download"],
      ];
      for (const [args, msg] of refused) {
        const r = await v(args);
        assert.notEqual(r.code, 0, args.join(' '));
        assert.ok(r.stderr.includes(`${NS}${msg}`), `${args.join(' ')}: ${r.stderr}`);
      }
      assert.equal((await v(['pool-destroy', 'z'])).code, 0);
      const del = await v(['pool-delete', 'z']);
      assert.ok(del.stderr.includes(`${NS}pool does not support pool deletion`), del.stderr);
      // a second pool on the same source is refused, as libvirt's duplicate source check
      const xml2 = path.join(d.dir, 'z2.xml');
      fs.writeFileSync(xml2, "<pool type='zfs'><name>z2</name><source><name>tank</name></source><target><path>/dev/zvol/tank</path></target></pool>");
      assert.match((await v(['pool-define', xml2])).stderr, /Storage source conflict with pool: 'z'/);
      assert.equal((await v(['pool-undefine', 'z'])).code, 0);
    } finally {
      await d.stop();
    }
  });
});
