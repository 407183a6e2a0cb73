/** Backing chains: bounded, loops and pool escapes reported, nothing followed twice. */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import { MAX_CHAIN_DEPTH, assertChain, followChain } from '../src/daemon/formats/index.js';
import { code } from './helpers/asserts.js';
import { qcow2Header, qemuImg, requireQemuImg } from './formats-support.js';

describe('followChain', () => {
  let dir = '';
  let outside = '';
  const f = (name: string): string => path.join(dir, name);
  const qcow2 = async (name: string, backing?: string, backingFormat?: string): Promise<string> => {
    await fsp.writeFile(f(name), qcow2Header({
      ...(backing !== undefined ? { backing } : {}),
      ...(backingFormat !== undefined ? { backingFormat } : {}),
    }));
    return f(name);
  };
  before(async () => {
    dir = await fsp.mkdtemp(path.join('/dev/shm', 'svchain-'));
    outside = await fsp.mkdtemp(path.join('/dev/shm', 'svchain-out-'));
    await fsp.writeFile(f('base.raw'), Buffer.alloc(4096));
  });
  after(async () => {
    await fsp.rm(dir, { recursive: true, force: true });
    await fsp.rm(outside, { recursive: true, force: true });
  });

  it('a chain of 3 (qcow2 → qcow2 → raw) is complete', async () => {
    await qcow2('mid.qcow2', 'base.raw', 'raw');
    const top = await qcow2('top.qcow2', 'mid.qcow2', 'qcow2');
    const r = await followChain(top, { poolDir: dir });
    assert.deepEqual(r.problems, []);
    assert.equal(r.complete, true);
    assert.deepEqual(r.links.map((l) => [path.basename(l.path), l.format, l.formatProbed]),
      [['top.qcow2', 'qcow2', true], ['mid.qcow2', 'qcow2', false], ['base.raw', 'raw', false]]);
  });

  it('loops: two images backing each other, an image backing itself, the same file under another name', async () => {
    await qcow2('la.qcow2', 'lb.qcow2', 'qcow2');
    await qcow2('lb.qcow2', 'la.qcow2', 'qcow2');
    const r = await followChain(f('la.qcow2'));
    assert.deepEqual(r.problems.map((p) => [p.code, path.basename(p.path), p.at]), [['LOOP', 'la.qcow2', 1]]);
    assert.equal(r.links.length, 2);
    const self = await followChain(await qcow2('self.qcow2', 'self.qcow2', 'qcow2'));
    assert.deepEqual(self.problems.map((p) => p.code), ['LOOP']);
    // via "./", via "sub/..", via a symlink
    await fsp.mkdir(f('sub'), { recursive: true });
    await qcow2('dot.qcow2', './sub/../dot.qcow2', 'qcow2');
    assert.deepEqual((await followChain(f('dot.qcow2'))).problems.map((p) => p.code), ['LOOP']);
    await fsp.symlink('sa.qcow2', f('link.qcow2'));
    await qcow2('sa.qcow2', 'link.qcow2', 'qcow2');
    assert.deepEqual((await followChain(f('sa.qcow2'))).problems.map((p) => p.code), ['LOOP']);
    assert.throws(() => assertChain(r), code('ERR_IMAGE_CHAIN'));
  });

  it('depth: at most 200 images by default (libvirt and qemu), or maxDepth', async () => {
    const n = MAX_CHAIN_DEPTH + 5;
    await fsp.mkdir(f('deep'));
    await fsp.writeFile(f(`deep/d${n}.raw`), Buffer.alloc(512));
    for (let i = n - 1; i >= 0; i--) {
      const next = i === n - 1 ? `d${n}.raw` : `d${i + 1}.qcow2`;
      await fsp.writeFile(f(`deep/d${i}.qcow2`), qcow2Header({ backing: next, backingFormat: i === n - 1 ? 'raw' : 'qcow2' }));
    }
    const r = await followChain(f('deep/d0.qcow2'));
    assert.equal(r.links.length, MAX_CHAIN_DEPTH);
    assert.deepEqual(r.problems.map((p) => p.code), ['TOO_DEEP']);
    const three = await followChain(f('deep/d0.qcow2'), { maxDepth: 3 });
    assert.equal(three.links.length, 3);
    assert.equal(three.problems[0]?.code, 'TOO_DEEP');
    const exact = await followChain(f(`deep/d${n - 2}.qcow2`), { maxDepth: 3 });
    assert.equal(exact.complete, true);
    await assert.rejects(followChain(f('deep/d0.qcow2'), { maxDepth: 0 }), code('ERR_INVALID_ARG'));
  });

  it('a backing file outside the pool: flagged and not read, unless followOutsidePool', async () => {
    await fsp.writeFile(path.join(outside, 'o.raw'), Buffer.alloc(512));
    const abs = await qcow2('outabs.qcow2', path.join(outside, 'o.raw'), 'raw');
    const rel = await qcow2('outrel.qcow2', `../${path.basename(outside)}/o.raw`, 'raw');
    for (const top of [abs, rel]) {
      const r = await followChain(top, { poolDir: dir });
      assert.deepEqual(r.problems.map((p) => [p.code, p.at]), [['OUTSIDE_POOL', 0]]);
      assert.equal(r.links.length, 1);
      const followed = await followChain(top, { poolDir: dir, followOutsidePool: true });
      assert.equal(followed.links.length, 2);
      assert.deepEqual(followed.problems.map((p) => p.code), ['OUTSIDE_POOL']);
    }
    // a symlink inside the pool to a file outside is outside
    await fsp.symlink(path.join(outside, 'o.raw'), f('escape.raw'));
    const viaLink = await qcow2('vialink.qcow2', 'escape.raw', 'raw');
    assert.deepEqual((await followChain(viaLink, { poolDir: dir })).problems.map((p) => p.code), ['OUTSIDE_POOL']);
    // without poolDir nothing is outside
    assert.equal((await followChain(abs)).complete, true);
  });

  it('missing, network and unresolvable backing files end the walk with their code', async () => {
    const cases: [string, string, string][] = [
      ['nonexist.raw', 'raw', 'MISSING'],
      ['nbd://localhost/x', 'raw', 'NETWORK'],
      ['json:{"file":{"driver":"file","filename":"rel.raw"}}', 'raw', 'UNRESOLVABLE'],
    ];
    for (const [name, fmt, expected] of cases) {
      const top = await qcow2(`m-${expected}.qcow2`, name, fmt);
      const r = await followChain(top);
      assert.deepEqual(r.problems.map((p) => p.code), [expected], name);
      assert.equal(r.links.length, 1);
    }
  });

  it('an unrecorded backing format is probed, but a probed image may not lead further (libvirt\'s rule)', async () => {
    await qcow2('pmid.qcow2', 'base.raw', 'raw');
    const top = await qcow2('ptop.qcow2', 'pmid.qcow2');
    const r = await followChain(top);
    assert.deepEqual(r.problems.map((p) => [p.code, p.at]), [['UNSPECIFIED_FORMAT', 0]]);
    assert.equal(r.links[1]?.formatProbed, true);
    const allowed = await followChain(top, { allowProbedBacking: true });
    assert.equal(allowed.complete, true);
    assert.equal(allowed.links.length, 3);
    // a probed image without a backing file of its own is fine
    assert.equal((await followChain(await qcow2('pleaf.qcow2', 'base.raw'))).complete, true);
  });

  it('a recorded format wins over the header: raw over a qcow2 header is data; qcow2 over raw is FORMAT_MISMATCH', async () => {
    await qcow2('evil.qcow2', '/etc/passwd', 'raw');
    const r = await followChain(await qcow2('asraw.qcow2', 'evil.qcow2', 'raw'));
    assert.equal(r.complete, true);
    assert.deepEqual(r.links.map((l) => l.format), ['qcow2', 'raw']);
    const m = await followChain(await qcow2('asq.qcow2', 'base.raw', 'qcow2'));
    assert.deepEqual(m.problems.map((p) => p.code), ['FORMAT_MISMATCH']);
  });

  it('a FIFO or a directory as backing file: UNREADABLE at once, nothing blocks', async () => {
    execFileSync('mkfifo', [f('pipe')]);
    const r = await followChain(await qcow2('tofifo.qcow2', 'pipe', 'raw'));
    assert.deepEqual(r.problems.map((p) => p.code), ['UNREADABLE']);
    const d = await followChain(await qcow2('todir.qcow2', 'sub', 'raw'));
    // a directory probes as 'dir', which is not the recorded raw
    assert.equal(d.links.length, 2);
  });

  it('a truncated qcow2 v3 in the chain is CORRUPT', async () => {
    await fsp.writeFile(f('trunc.qcow2'), qcow2Header().subarray(0, 50));
    const r = await followChain(await qcow2('totrunc.qcow2', 'trunc.qcow2', 'qcow2'));
    assert.deepEqual(r.problems.map((p) => [p.code, p.at]), [['CORRUPT', 1]]);
  });

  it('the top image must exist: ERR_NOT_FOUND', async () => {
    await assert.rejects(followChain(f('none.qcow2')), code('ERR_NOT_FOUND'));
  });

  it('chains made by qemu-img agree with qemu-img info --backing-chain', async (t) => {
    if (!requireQemuImg(t)) return;
    const q = (name: string): string => path.join(dir, 'qi', name);
    await fsp.mkdir(path.join(dir, 'qi'));
    qemuImg('create', '-q', '-f', 'raw', q('b.raw'), '1M');
    qemuImg('create', '-q', '-f', 'qcow2', '-b', 'b.raw', '-F', 'raw', q('m.qcow2'));
    qemuImg('create', '-q', '-f', 'qcow2', '-b', q('m.qcow2'), '-F', 'qcow2', q('t.qcow2'));
    const info = JSON.parse(qemuImg('info', '--output=json', '--backing-chain', q('t.qcow2'))) as { filename: string; format: string }[];
    const r = await followChain(q('t.qcow2'), { poolDir: path.join(dir, 'qi') });
    assert.equal(r.complete, true);
    assert.deepEqual(r.links.map((l) => [l.realPath, l.format]), info.map((i) => [path.resolve(path.join(dir, 'qi'), i.filename), i.format]));
  });
});
