/**
 * The real virsh 9.0 against sparsevirtd (`virsh -c 'qemu+unix:///system?socket=SOCK' …`): every
 * storage command virsh has, exit codes, output, bytes and extent maps; then the same script
 * against the real libvirtd on an equivalent scratch pool, outputs compared after normalising
 * names, paths, UUIDs and filesystem sizes.
 *
 * virsh is required in CI (where .ci/run installs it); locally without virsh the tests skip.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test, type TestContext } from 'node:test';
import { startTestDaemon, type TestDaemon } from './helpers/daemon.js';
import { CAPTURE_LAYOUT, layoutOf, makeFilledFile, makeImage, scratchDir, sha256File, type Layout } from './helpers/images.js';
import { run } from './helpers/run.js';
import { requireLibvirt, withScratchPool } from './helpers/libvirt.js';

const MiB = 1 << 20;

let virshChecked: Promise<boolean> | undefined;
async function requireVirsh(t: TestContext): Promise<boolean> {
  virshChecked ??= run('virsh', ['--version']).then((r) => r.code === 0);
  if (await virshChecked) return true;
  if (process.env.CI) throw new Error('virsh is required in CI');
  t.skip('virsh is not installed');
  return false;
}

interface Out {
  code: number;
  stdout: string;
  stderr: string;
}

function virshAt(uri: string, args: string[], opts: { readonly?: boolean } = {}): Promise<Out> {
  return run('virsh', [...(opts.readonly ? ['-r'] : []), '-c', uri, ...args], { timeoutMs: 60_000 });
}

async function ok(uri: string, args: string[]): Promise<string> {
  const r = await virshAt(uri, args);
  assert.equal(r.code, 0, `virsh ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

describe('virsh against sparsevirtd', () => {
  let d: TestDaemon;
  let dir: string;
  let poolDir: string;
  let uri: string;

  before(async () => {
    d = await startTestDaemon();
    dir = d.dir;
    poolDir = path.join(dir, 'vpool');
    uri = d.virshUri;
  });
  after(async () => {
    await d?.stop();
  });

  test('connection commands: uri, version, hostname', async (t) => {
    if (!(await requireVirsh(t))) return;
    assert.equal((await ok(uri, ['uri'])).trim(), uri);
    const v = await ok(uri, ['version', '--daemon']);
    assert.match(v, /Using API: sparsevirt 9\.0\.0/);
    assert.match(v, /Running hypervisor: sparsevirt 0\.1\.0/);
    assert.match(v, /Running against daemon: 9\.0\.0/);
    assert.ok((await ok(uri, ['hostname'])).trim().length > 0);
    // any driver name in the URI is accepted
    assert.equal((await virshAt(`sparsevirt+unix:///system?socket=${d.socket}`, ['pool-list', '--all'])).code, 0);
  });

  test('pool and volume commands: messages, listings, info, XML', async (t) => {
    if (!(await requireVirsh(t))) return;
    assert.equal((await ok(uri, ['pool-define-as', 'vp', 'dir', '--target', poolDir])).trim(), 'Pool vp defined');
    assert.equal((await ok(uri, ['pool-build', 'vp'])).trim(), 'Pool vp built');
    assert.equal((await ok(uri, ['pool-start', 'vp'])).trim(), 'Pool vp started');
    assert.equal((await ok(uri, ['pool-autostart', 'vp'])).trim(), 'Pool vp marked as autostarted');
    assert.equal((await ok(uri, ['pool-refresh', 'vp'])).trim(), 'Pool vp refreshed');
    assert.match(await ok(uri, ['pool-list', '--all']), /^ vp\s+active\s+yes$/m);
    assert.match(await ok(uri, ['pool-info', 'vp']), /^Name:\s+vp\nUUID:\s+[0-9a-f-]{36}\nState:\s+running\nPersistent:\s+yes\nAutostart:\s+yes\nCapacity:\s+.+\nAllocation:\s+.+\nAvailable:\s+.+\n/);
    assert.match(await ok(uri, ['pool-dumpxml', 'vp']), new RegExp(`<path>${poolDir}</path>`));
    assert.equal((await ok(uri, ['vol-create-as', 'vp', 'a.img', '4M', '--allocation', '0', '--format', 'raw'])).trim(), 'Vol a.img created');
    assert.equal((await ok(uri, ['vol-create-as', 'vp', 'b.img', '1M'])).trim(), 'Vol b.img created');
    const list = await ok(uri, ['vol-list', 'vp', '--details']);
    assert.match(list, new RegExp(`^ a\\.img\\s+${poolDir}/a\\.img\\s+file\\s+4\\.00 MiB\\s+0\\.00 B$`, 'm'));
    assert.match(list, /^ b\.img\s+\S+\s+file\s+1\.00 MiB\s+0\.00 B$/m);
    assert.equal(await ok(uri, ['vol-info', '--pool', 'vp', 'a.img']), 'Name:           a.img\nType:           file\nCapacity:       4.00 MiB\nAllocation:     0.00 B\n\n');
    assert.equal(await ok(uri, ['vol-info', '--pool', 'vp', 'a.img', '--bytes', '--physical']), 'Name:           a.img\nType:           file\nCapacity:       4194304 bytes\nPhysical:       4194304 bytes\n\n');
    assert.match(await ok(uri, ['vol-info', `${poolDir}/a.img`]), /^Name:\s+a\.img/);
    assert.match(await ok(uri, ['vol-dumpxml', '--pool', 'vp', 'a.img']), /^<volume type='file'>\n {2}<name>a\.img<\/name>\n/);
    assert.equal((await ok(uri, ['vol-path', '--pool', 'vp', 'a.img'])).trim(), `${poolDir}/a.img`);
    assert.equal((await ok(uri, ['vol-key', '--pool', 'vp', 'a.img'])).trim(), `${poolDir}/a.img`);
    assert.equal((await ok(uri, ['vol-resize', '--pool', 'vp', 'b.img', '2M'])).trim(), "Size of volume 'b.img' successfully changed to 2M");
    assert.equal((await ok(uri, ['vol-resize', '--pool', 'vp', 'b.img', '1M', '--shrink'])).trim(), "Size of volume 'b.img' successfully changed to 1M");
    assert.equal((await ok(uri, ['vol-resize', '--pool', 'vp', 'b.img', '1M', '--delta'])).trim(), "Size of volume 'b.img' successfully changed by 1M");
    assert.match((await ok(uri, ['vol-resize', '--pool', 'vp', 'b.img', '--shrink', '--', '-512K'])).trim(), /^Size of volume 'b\.img' successfully changed by -?512K$/);
    assert.equal(fs.statSync(path.join(poolDir, 'b.img')).size, 1536 * 1024);
    await makeFilledFile(path.join(poolDir, 'b.img'), 1536 * 1024);
    assert.equal((await ok(uri, ['vol-wipe', '--pool', 'vp', 'b.img'])).trim(), 'Vol b.img wiped');
    assert.ok((await fsp.readFile(path.join(poolDir, 'b.img'))).every((x) => x === 0));
    let r = await virshAt(uri, ['vol-wipe', '--pool', 'vp', 'b.img', '--algorithm', 'dod']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /argument unsupported: 'dod' algorithm not supported/);
    r = await virshAt(uri, ['vol-info', '--pool', 'vp', 'nope.img']);
    assert.equal(r.code, 1);
    assert.equal(r.stderr.trimEnd(), "error: failed to get vol 'nope.img'\nerror: Storage volume not found: no storage vol with matching path 'nope.img'");
    r = await virshAt(uri, ['pool-info', 'nopool']);
    assert.equal(r.stderr.trimEnd(), "error: failed to get pool 'nopool'\nerror: Storage pool not found: no storage pool with matching name 'nopool'");
    r = await virshAt(uri, ['vol-create-as', 'vp', '../evil.img', '1M']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /volume name '\.\.\/evil\.img' cannot contain '\/'/);
    assert.ok(!fs.existsSync(path.join(dir, 'evil.img')));
    assert.equal((await ok(uri, ['vol-delete', '--pool', 'vp', 'b.img'])).trim(), 'Vol b.img deleted');
  });

  test('vol-upload / vol-download, sparse and plain, with offset and length', async (t) => {
    if (!(await requireVirsh(t))) return;
    const src = path.join(dir, 'src.img');
    await makeImage(src, CAPTURE_LAYOUT, 11);
    const vol = path.join(poolDir, 'a.img');
    let r = await virshAt(uri, ['vol-upload', '--pool', 'vp', 'a.img', src, '--sparse']);
    assert.deepEqual([r.code, r.stdout.trim(), r.stderr], [0, '', '']);
    assert.equal(await sha256File(vol), await sha256File(src));
    assert.deepEqual(await layoutOf(vol), CAPTURE_LAYOUT);

    const out = path.join(dir, 'out.img');
    await ok(uri, ['vol-download', '--pool', 'vp', 'a.img', out, '--sparse']);
    assert.equal(await sha256File(out), await sha256File(src));
    assert.deepEqual(await layoutOf(out), CAPTURE_LAYOUT);
    await fsp.rm(out);
    await ok(uri, ['vol-download', '--pool', 'vp', 'a.img', out]);
    assert.equal(await sha256File(out), await sha256File(src));
    await fsp.rm(out);
    await ok(uri, ['vol-download', '--pool', 'vp', 'a.img', out, '--length', '-1']);
    assert.equal(await sha256File(out), await sha256File(src));

    const whole = await fsp.readFile(src);
    for (const [offset, length, sparse] of [[61440, 1200000, true], [983040, 1000000, false], [3400000, 2000000, true], [5000000, 0, true], [5000000, 0, false]] as const) {
      await fsp.rm(out, { force: true });
      const args = ['vol-download', '--pool', 'vp', 'a.img', out, '--offset', String(offset), ...(length ? ['--length', String(length)] : []), ...(sparse ? ['--sparse'] : [])];
      await ok(uri, args);
      const want = whole.subarray(Math.min(offset, whole.length), length ? Math.min(whole.length, offset + length) : whole.length);
      assert.ok((await fsp.readFile(out)).equals(want), args.join(' '));
    }

    // plain upload over the sparse volume, then a sparse upload over random bytes
    await ok(uri, ['vol-upload', '--pool', 'vp', 'a.img', src]);
    assert.equal(await sha256File(vol), await sha256File(src));
    await makeFilledFile(vol, 4 * MiB);
    await ok(uri, ['vol-upload', '--pool', 'vp', 'a.img', src, '--sparse']);
    assert.equal(await sha256File(vol), await sha256File(src));
    assert.deepEqual(await layoutOf(vol), CAPTURE_LAYOUT);

    // upload at an offset: the rest untouched, the size unchanged (libvirt would truncate: libvirt-quirks upload-holes-truncate)
    const hf = path.join(dir, 'holefirst.img');
    const hfLayout: Layout = [{ kind: 'hole', length: 65536 }, { kind: 'data', length: 65536 }];
    await makeImage(hf, hfLayout, 12);
    await makeFilledFile(vol, 4 * MiB);
    const before = await fsp.readFile(vol);
    await ok(uri, ['vol-upload', '--pool', 'vp', 'a.img', hf, '--sparse', '--offset', String(MiB)]);
    const afterUp = await fsp.readFile(vol);
    assert.equal(afterUp.length, 4 * MiB);
    assert.ok(afterUp.subarray(0, MiB).equals(before.subarray(0, MiB)));
    assert.ok(afterUp.subarray(MiB, MiB + 131072).equals(await fsp.readFile(hf)));
    assert.ok(afterUp.subarray(MiB + 131072).equals(before.subarray(MiB + 131072)));

    // more than --length: libvirt's error, virsh's message
    const c64 = path.join(dir, 'c64.bin');
    await makeFilledFile(c64, 65536);
    r = await virshAt(uri, ['vol-upload', '--pool', 'vp', 'a.img', c64, '--length', '8192']);
    assert.equal(r.code, 1);
    assert.equal(r.stderr.trimEnd(), 'error: cannot close volume a.img\nerror: cannot write to stream: No space left on device');
    r = await virshAt(uri, ['vol-upload', '--pool', 'vp', 'a.img', src, '--sparse', '--length', '100000']);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /cannot write to stream: No space left on device/);
    assert.equal(fs.statSync(vol).size, 4 * MiB);
    // the client aborts (source is a directory): nothing written, daemon fine
    r = await virshAt(uri, ['vol-upload', '--pool', 'vp', 'a.img', dir]);
    assert.equal(r.code, 1);
    assert.equal((await virshAt(uri, ['vol-info', '--pool', 'vp', 'a.img'])).code, 0);
  });

  test('virsh -r: listing works, changes are refused', async (t) => {
    if (!(await requireVirsh(t))) return;
    const ro = { readonly: true };
    assert.equal((await virshAt(uri, ['vol-list', 'vp'], ro)).code, 0);
    assert.equal((await virshAt(uri, ['vol-info', '--pool', 'vp', 'a.img'], ro)).code, 0);
    for (const args of [['vol-delete', '--pool', 'vp', 'a.img'], ['vol-create-as', 'vp', 'x.img', '1M'], ['vol-wipe', '--pool', 'vp', 'a.img'], ['vol-resize', '--pool', 'vp', 'a.img', '8M']]) {
      const r = await virshAt(uri, args, ro);
      assert.equal(r.code, 1, args.join(' '));
      assert.match(r.stderr, /operation forbidden: read only access prevents/);
    }
    assert.ok(fs.existsSync(path.join(poolDir, 'a.img')));
  });

  test('pool teardown messages', async (t) => {
    if (!(await requireVirsh(t))) return;
    assert.equal((await ok(uri, ['vol-delete', '--pool', 'vp', 'a.img'])).trim(), 'Vol a.img deleted');
    assert.equal((await ok(uri, ['pool-destroy', 'vp'])).trim(), 'Pool vp destroyed');
    assert.match(await ok(uri, ['pool-list', '--all']), /^ vp\s+inactive\s+yes$/m);
    assert.equal((await ok(uri, ['pool-undefine', 'vp'])).trim(), 'Pool vp has been undefined');
    const r = await virshAt(uri, ['pool-info', 'vp']);
    assert.equal(r.code, 1);
  });
});

/** The same script against libvirtd and sparsevirtd; outputs normalised and compared. */
describe('virsh output: sparsevirtd vs libvirtd', () => {
  test('identical output for pool and volume commands on equivalent pools', async (t) => {
    if (!(await requireVirsh(t))) return;
    if (!(await requireLibvirt(t))) return;
    const d = await startTestDaemon();
    const src = path.join(d.dir, 'src.img');
    await makeImage(src, CAPTURE_LAYOUT, 13);
    const c64 = path.join(d.dir, 'c64.bin');
    await makeFilledFile(c64, 65536);
    try {
      const script = (pool: string): string[][] => [
        ['pool-info', pool],
        ['pool-dumpxml', pool],
        ['vol-create-as', pool, 'cmp.img', '4M', '--allocation', '0', '--format', 'raw'],
        ['vol-create-as', pool, 'cmp.img', '4M', '--allocation', '0', '--format', 'raw'],
        ['vol-info', '--pool', pool, 'cmp.img'],
        ['vol-upload', '--pool', pool, 'cmp.img', src, '--sparse'],
        ['vol-info', '--pool', pool, 'cmp.img'],
        ['vol-info', '--pool', pool, 'cmp.img', '--bytes', '--physical'],
        ['vol-list', pool, '--details'],
        ['vol-dumpxml', '--pool', pool, 'cmp.img'],
        ['vol-path', '--pool', pool, 'cmp.img'],
        ['vol-key', '--pool', pool, 'cmp.img'],
        ['vol-info', 'missing.img'],
        ['vol-info', '--pool', pool, 'missing.img'],
        ['vol-resize', '--pool', pool, 'cmp.img', '8M'],
        ['vol-resize', '--pool', pool, 'cmp.img', '4M'],
        ['vol-resize', '--pool', pool, 'cmp.img', '4M', '--shrink'],
        ['vol-info', '--pool', pool, 'cmp.img', '--bytes'],
        ['vol-upload', '--pool', pool, 'cmp.img', c64, '--length', '8192'],
        ['vol-create-as', pool, 'a/b.img', '1M'],
        ['vol-wipe', '--pool', pool, 'cmp.img', '--algorithm', 'trim'],
        ['vol-delete', '--pool', pool, 'cmp.img'],
        ['vol-list', pool],
        ['pool-refresh', pool],
        ['pool-info', 'no-such-pool'],
      ];
      const norm = (s: string, pool: string, pdir: string, poolCmd: boolean): string => {
        let t = s.replaceAll(pdir, 'DIR').replaceAll(pool, 'POOL')
          .replace(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/g, 'UUID')
          .replace(/<([amc]time)>[\d.]+</g, '<$1>T<')
          // libvirtd sometimes drops the connection after a failed upload; virsh then says so
          .replace(/^error: Disconnected from .* due to I\/O error\n/m, '');
        if (poolCmd) {
          // the filesystem's sizes and the target directory's mode differ between the two
          t = t.replace(/^(Capacity|Allocation|Available):.*$/gm, '$1: SIZE')
            .replace(/<(capacity|allocation|available) unit='bytes'>\d+</g, "<$1 unit='bytes'>N<")
            .replace(/<mode>\d+</g, '<mode>N<');
        }
        return t.replace(/[ -]+/g, ' ');
      };
      const transcript = async (u: string, pool: string, pdir: string): Promise<string[]> => {
        const out: string[] = [];
        for (const args of script(pool)) {
          const r = await virshAt(u, args);
          const poolCmd = args[0]!.startsWith('pool-');
          out.push(`$ ${norm(args.join(' '), pool, pdir, false)} → ${r.code}\n${norm(r.stdout, pool, pdir, poolCmd).trimEnd()}\n${norm(r.stderr, pool, pdir, poolCmd).trimEnd()}`);
        }
        return out;
      };
      // ours on /dev/shm too, so allocation granularity is the same filesystem's
      const oursDir = await scratchDir('/dev/shm', 'sparsevirt-test-ours-');
      const oursPool = `cmp-ours-${process.pid}`;
      let ours: string[];
      try {
        await ok(d.virshUri, ['pool-define-as', oursPool, 'dir', '--target', oursDir]);
        await ok(d.virshUri, ['pool-start', oursPool]);
        ours = await transcript(d.virshUri, oursPool, oursDir);
      } finally {
        await fsp.rm(oursDir, { recursive: true, force: true });
      }
      const theirs = await withScratchPool('cmp', (p) => transcript(p.uri, p.name, p.path));
      if (process.env.SPARSEVIRT_TEST_LOG) process.stderr.write(`${ours.join('\n')}\n`);
      for (let i = 0; i < theirs.length; i++) assert.equal(ours[i], theirs[i], `step ${i}`);
    } finally {
      await d.stop();
    }
  });
});
