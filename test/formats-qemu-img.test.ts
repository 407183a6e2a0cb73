/**
 * The qemu-img wrapper: libvirtd 9.0's arguments, results checked with qemu-img check/info,
 * argument validation, bounded run time, and a clear error without qemu-img.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import {
  buildOptions, checkImage, convertImage, createImage, findQemuImg, infoImage, probeImage, qemuImgVersion,
  resizeImage, runQemuImg, type QemuImgError,
} from '../src/daemon/formats/index.js';
import { code } from './helpers/asserts.js';
import { qcow2Header, requireQemuImg } from './formats-support.js';

describe('qemu-img options as libvirtd 9.0 builds them (no qemu-img needed)', () => {
  it('qcow2 defaults to compat=0.10; lazy refcounts bring 1.1; the order is libvirt\'s', () => {
    assert.equal(buildOptions('qcow2', {}), 'compat=0.10');
    assert.equal(buildOptions('qcow2', { lazyRefcounts: true }), 'compat=1.1,lazy_refcounts');
    assert.equal(buildOptions('qcow2', { compat: '1.1', lazyRefcounts: true }), 'compat=1.1,lazy_refcounts');
    assert.equal(buildOptions('qcow2', { preallocation: 'metadata' }), 'preallocation=metadata,compat=0.10');
    assert.equal(buildOptions('qcow2', { preallocation: 'falloc' }), 'preallocation=falloc,compat=0.10');
    assert.equal(buildOptions('qcow2', { backingFormat: 'qcow2' }), 'backing_fmt=qcow2,compat=0.10');
    assert.equal(buildOptions('qcow2', { clusterSize: 65536 }), 'compat=0.10,cluster_size=65536');
    assert.equal(buildOptions('qed', {}), '');
    assert.equal(buildOptions('vmdk', {}), '');
    assert.equal(buildOptions('raw', {}), '');
  });

  it('refuses what libvirtd refuses and what qemu-img cannot do', () => {
    assert.throws(() => buildOptions('qcow2', { compat: '0.10', lazyRefcounts: true }), code('ERR_INVALID_ARG'));
    assert.throws(() => buildOptions('raw', { preallocation: 'metadata' }), code('ERR_INVALID_ARG'));
    assert.throws(() => buildOptions('raw', { compat: '1.1' }), code('ERR_INVALID_ARG'));
    assert.throws(() => buildOptions('qcow2', { clusterSize: 1000 }), code('ERR_INVALID_ARG'));
    assert.throws(() => buildOptions('qcow2', { compat: '2.0' as '1.1' }), code('ERR_INVALID_ARG'));
  });

  it('findQemuImg: a clear error naming the Debian package when it is not on PATH', async () => {
    await assert.rejects(findQemuImg({ env: { PATH: '/nonexistent' } }), (err: Error & { code?: string }) => {
      assert.equal(err.code, 'ERR_QEMU_IMG_NOT_FOUND');
      assert.match(err.message, /qemu-utils/);
      return true;
    });
    await assert.rejects(findQemuImg({ env: { PATH: '', SPARSEVIRT_QEMU_IMG: 'qemu-img' } }), code('ERR_INVALID_ARG'));
    await assert.rejects(findQemuImg({ env: { SPARSEVIRT_QEMU_IMG: '/nonexistent/qemu-img' } }), code('ERR_QEMU_IMG_NOT_FOUND'));
  });
});

describe('qemu-img wrapper', () => {
  let dir = '';
  const f = (name: string): string => path.join(dir, name);
  before(async () => {
    dir = await fsp.mkdtemp(path.join('/dev/shm', 'svqimg-'));
  });
  after(() => fsp.rm(dir, { recursive: true, force: true }));

  it('createImage: libvirtd\'s argv (compat=0.10, size in KiB rounded up); qemu-img check and info agree', async (t) => {
    if (!requireQemuImg(t)) return;
    const { argv } = await createImage({ path: f('a.qcow2'), format: 'qcow2', capacity: 10 * 1024 * 1024 });
    assert.deepEqual(argv.slice(1), ['create', '-f', 'qcow2', '-o', 'compat=0.10', '--', f('a.qcow2'), '10240K']);
    const info = await infoImage(f('a.qcow2'), { format: 'qcow2' });
    assert.equal(info['virtual-size'], 10 * 1024 * 1024);
    assert.equal(info['format-specific']?.data.compat, '0.10');
    const check = await checkImage(f('a.qcow2'), 'qcow2');
    assert.deepEqual([check.supported, check.exitCode, check.report?.['check-errors']], [true, 0, 0]);
    assert.equal((await probeImage(f('a.qcow2'))).version, 2);
    // 1000 bytes become 1K, as libvirtd passes them
    await createImage({ path: f('small.qcow2'), format: 'qcow2', capacity: 1000 });
    assert.equal((await infoImage(f('small.qcow2')))['virtual-size'], 1024);
  });

  it('createImage: lazy refcounts (compat 1.1), metadata preallocation, a backing file relative and absolute', async (t) => {
    if (!requireQemuImg(t)) return;
    await createImage({ path: f('lazy.qcow2'), format: 'qcow2', capacity: 1 << 20, lazyRefcounts: true });
    const lz = await infoImage(f('lazy.qcow2'), { format: 'qcow2' });
    assert.deepEqual([lz['format-specific']?.data.compat, lz['format-specific']?.data['lazy-refcounts']], ['1.1', true]);
    assert.deepEqual((await probeImage(f('lazy.qcow2'))).features, { lazyRefcounts: true, extendedL2: false });

    const { argv } = await createImage({ path: f('pre.qcow2'), format: 'qcow2', capacity: 1 << 20, preallocation: 'metadata' });
    assert.ok(argv.includes('preallocation=metadata,compat=0.10'));
    assert.equal((await checkImage(f('pre.qcow2'), 'qcow2')).exitCode, 0);

    await createImage({ path: f('base.raw'), format: 'raw', capacity: 1 << 20 });
    const rel = await createImage({ path: f('rel.qcow2'), format: 'qcow2', backing: { path: 'base.raw', format: 'raw' } });
    assert.deepEqual(rel.argv.slice(1), ['create', '-f', 'qcow2', '-b', 'base.raw', '-o', 'backing_fmt=raw,compat=0.10', '--', f('rel.qcow2')]);
    const p = await probeImage(f('rel.qcow2'));
    assert.deepEqual([p.backing?.path, p.backing?.format, p.capacity], [f('base.raw'), 'raw', 1n << 20n]);
    await createImage({ path: f('abs.qcow2'), format: 'qcow2', capacity: 2 << 20, backing: { path: f('rel.qcow2'), format: 'qcow2' } });
    const chain = await infoImage(f('abs.qcow2'), { format: 'qcow2', backingChain: true });
    assert.deepEqual(chain.map((i) => i.format), ['qcow2', 'qcow2', 'raw']);
    // a relative backing name that looks like an option or a protocol gets "./"
    await createImage({ path: f('-dash.raw'), format: 'raw', capacity: 4096 });
    const dash = await createImage({ path: f('dash.qcow2'), format: 'qcow2', backing: { path: '-dash.raw', format: 'raw' } });
    assert.ok(dash.argv.includes('./-dash.raw'));
    assert.equal((await probeImage(f('dash.qcow2'))).backing?.path, `${dir}/./-dash.raw`);
  });

  it('createImage: other formats without -o; refuses relative paths and existing files', async (t) => {
    if (!requireQemuImg(t)) return;
    for (const fmt of ['qed', 'vmdk', 'vdi', 'vpc', 'qcow'] as const) {
      const { argv } = await createImage({ path: f(`o.${fmt}`), format: fmt, capacity: 8 << 20 });
      assert.ok(!argv.includes('-o'), fmt);
      assert.equal((await probeImage(f(`o.${fmt}`))).format, fmt);
    }
    await assert.rejects(createImage({ path: 'rel.qcow2', format: 'qcow2', capacity: 1 }), code('ERR_INVALID_ARG'));
    await assert.rejects(createImage({ path: '-o', format: 'qcow2', capacity: 1 }), code('ERR_INVALID_ARG'));
    await assert.rejects(createImage({ path: f('x'), format: 'bochs' as 'raw', capacity: 1 }), code('ERR_INVALID_ARG'));
    await assert.rejects(createImage({ path: f('x'), format: 'qcow2', capacity: -1 }), code('ERR_INVALID_ARG'));
    await assert.rejects(createImage({ path: f('x'), format: 'qcow2', capacity: 1.5 }), code('ERR_INVALID_ARG'));
    await assert.rejects(createImage({ path: f('x'), format: 'qcow2' }), code('ERR_INVALID_ARG'));
    await assert.rejects(createImage({ path: f('a.qcow2'), format: 'qcow2', capacity: 1 }), code('ERR_EXISTS'));
    await createImage({ path: f('a.qcow2'), format: 'qcow2', capacity: 2048, overwrite: true });
  });

  it('resizeImage: grow; shrink only with shrink: true (qemu-img\'s stderr in the error)', async (t) => {
    if (!requireQemuImg(t)) return;
    await createImage({ path: f('r.qcow2'), format: 'qcow2', capacity: 10 << 20 });
    const { argv } = await resizeImage(f('r.qcow2'), 'qcow2', 20n << 20n);
    assert.deepEqual(argv.slice(1), ['resize', '-f', 'qcow2', '--', f('r.qcow2'), String(20 << 20)]);
    assert.equal((await probeImage(f('r.qcow2'))).capacity, 20n << 20n);
    await assert.rejects(resizeImage(f('r.qcow2'), 'qcow2', 15 << 20), (err: QemuImgError) => {
      assert.equal(err.code, 'ERR_QEMU_IMG');
      assert.match(err.stderr, /shrink/);
      assert.match(err.message, /shrink/);
      assert.equal(err.exitCode, 1);
      return true;
    });
    await resizeImage(f('r.qcow2'), 'qcow2', 15 << 20, { shrink: true });
    assert.equal((await probeImage(f('r.qcow2'))).capacity, 15n << 20n);
    assert.equal((await checkImage(f('r.qcow2'), 'qcow2')).exitCode, 0);
    await assert.rejects(resizeImage(f('r.qcow2'), 'qcow2', -1), code('ERR_INVALID_ARG'));
  });

  it('convertImage: raw → qcow2 → raw keeps the bytes and the holes', async (t) => {
    if (!requireQemuImg(t)) return;
    const src = f('data.raw');
    const size = 4 << 20;
    const chunk = randomBytes(64 * 1024);
    const fh = await fsp.open(src, 'w');
    await fh.truncate(size);
    await fh.write(chunk, 0, chunk.length, 1 << 20);
    await fh.close();
    const { argv } = await convertImage(src, 'raw', f('data.qcow2'), 'qcow2');
    assert.deepEqual(argv.slice(1), ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'compat=0.10', '--', src, f('data.qcow2')]);
    assert.equal((await checkImage(f('data.qcow2'), 'qcow2')).exitCode, 0);
    const info = await infoImage(f('data.qcow2'), { format: 'qcow2' });
    assert.equal(info['virtual-size'], size);
    assert.ok((info['actual-size'] ?? 0) < 1 << 20, 'the qcow2 holds only the data');
    const back = await convertImage(f('data.qcow2'), 'qcow2', f('back.raw'), 'raw');
    assert.deepEqual(back.argv.slice(1), ['convert', '-f', 'qcow2', '-O', 'raw', '--', f('data.qcow2'), f('back.raw')]);
    assert.deepEqual(await fsp.readFile(f('back.raw')), await fsp.readFile(src));
    const st = await fsp.stat(f('back.raw'));
    assert.ok(st.blocks * 512 < 1 << 20, 'sparse: the holes stayed holes');
    // sparse: false writes the zeros
    const dense = await convertImage(src, 'raw', f('dense.raw'), 'raw', { sparse: false });
    assert.ok(dense.argv.includes('-S'));
    assert.equal((await fsp.stat(f('dense.raw'))).blocks * 512 >= size, true);
    await assert.rejects(convertImage(src, 'raw', f('back.raw'), 'raw'), code('ERR_EXISTS'));
    await assert.rejects(convertImage(src, 'raw', src, 'raw', { overwrite: true }), code('ERR_INVALID_ARG'));
    // a flattened copy of a chain
    await createImage({ path: f('ov.qcow2'), format: 'qcow2', backing: { path: 'data.qcow2', format: 'qcow2' } });
    await convertImage(f('ov.qcow2'), 'qcow2', f('flat.raw'), 'raw');
    assert.deepEqual(await fsp.readFile(f('flat.raw')), await fsp.readFile(src));
  });

  it('checkImage: raw is not checkable; a broken header is ERR_QEMU_IMG with stderr', async (t) => {
    if (!requireQemuImg(t)) return;
    assert.deepEqual(await checkImage(f('data.raw'), 'raw'), { supported: false, exitCode: 63, report: null });
    await fsp.writeFile(f('trunc.qcow2'), qcow2Header().subarray(0, 50));
    await assert.rejects(checkImage(f('trunc.qcow2'), 'qcow2'), (err: QemuImgError) => {
      assert.equal(err.code, 'ERR_QEMU_IMG');
      assert.match(err.stderr, /header too short/);
      return true;
    });
    assert.match(await qemuImgVersion(), /^\d+\.\d+/);
  });

  it('bounded run time: a qemu-img that hangs is killed (ERR_TIMEOUT); an abort is ERR_ABORTED', async () => {
    const fake = f('fake-qemu-img');
    await fsp.writeFile(fake, '#!/bin/sh\necho starting >&2\nexec sleep 30\n', { mode: 0o755 });
    const t0 = Date.now();
    await assert.rejects(runQemuImg(['info', '/x'], { qemuImg: fake, timeoutMs: 300 }), (err: QemuImgError) => {
      assert.equal(err.code, 'ERR_TIMEOUT');
      assert.match(err.message, /starting/);
      return true;
    });
    assert.ok(Date.now() - t0 < 5000);
    const ac = new AbortController();
    const p = runQemuImg(['info', '/x'], { qemuImg: fake, signal: ac.signal });
    setTimeout(() => ac.abort(), 100);
    await assert.rejects(p, code('ERR_ABORTED'));
    await assert.rejects(runQemuImg(['info'], { qemuImg: f('nonexistent') }), code('ERR_QEMU_IMG_NOT_FOUND'));
  });
});
