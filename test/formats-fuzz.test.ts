/**
 * Property tests: random mutations of real headers never make the probe throw, hang or report
 * something impossible; random backing graphs never make the chain walk loop or exceed its bound.
 */
import assert from 'node:assert/strict';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, it } from 'node:test';
import fc from 'fast-check';
import {
  IMAGE_FORMATS, MAX_HEADER, followChain, formatTargetXml, probeBuffer, probeFormatFromBuffer,
} from '../src/daemon/formats/index.js';
import {
  cowHeader, isoImage, luksHeader, qcow2Header, qedHeader, qemuImg, qemuImgOnPath, vdiHeader, vmdkHeader, vpcFooter,
} from './formats-support.js';

const U64 = 1n << 64n;

/** Headers to mutate: crafted ones always, qemu-img's own when it is installed. */
async function baseHeaders(dir: string): Promise<Buffer[]> {
  const bases: Buffer[] = [
    qcow2Header({ backing: 'base.raw', backingFormat: 'raw' }),
    qcow2Header({ version: 2, backing: 'mid.qcow2', backingFormat: 'qcow2' }),
    qcow2Header({ compatible: 1n, incompatible: 16n, crypt: 2 }),
    qedHeader({ backing: 'base.raw', noProbe: true }),
    vmdkHeader({ descriptor: 'parentFileNameHint="k.vmdk"\n' }),
    vpcFooter(8390656n), vdiHeader(8n << 20n), luksHeader(4040, 8192), cowHeader({ backing: 'b' }),
    isoImage().subarray(0, 33000),
  ];
  if (qemuImgOnPath()) {
    const mk = async (name: string, ...args: string[]): Promise<void> => {
      qemuImg('create', '-q', ...args.slice(0, -1), path.join(dir, name), args[args.length - 1]!);
      const fh = await fsp.open(path.join(dir, name), 'r');
      const b = Buffer.alloc(MAX_HEADER);
      const { bytesRead } = await fh.read(b, 0, MAX_HEADER, 0);
      await fh.close();
      bases.push(b.subarray(0, bytesRead));
    };
    await mk('base.raw', '-f', 'raw', '1M');
    await mk('a.qcow2', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', '1M');
    await mk('b.qcow2', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'a.qcow2', '-F', 'qcow2', '1M');
    await mk('c.qed', '-f', 'qed', '-b', 'base.raw', '-F', 'raw', '1M');
    await mk('d0.vmdk', '-f', 'vmdk', '1M');
    await mk('d.vmdk', '-f', 'vmdk', '-b', 'd0.vmdk', '-F', 'vmdk', '1M');
  }
  return bases;
}

type Mutation =
  | { kind: 'byte'; at: number; value: number }
  | { kind: 'u32'; at: number; value: number }
  | { kind: 'u64'; at: number; value: bigint }
  | { kind: 'truncate'; length: number };

const extremes32 = fc.constantFrom(0, 1, 2, 3, 0x3f, 0x40, 1023, 1024, 0x7fffffff, 0x80000000, 0xffffffff, 0xe2792aca);
const extremes64 = fc.constantFrom(0n, 1n, 72n, 104n, 4095n, 33279n, 33280n, 1n << 31n, 1n << 63n, U64 - 1n);

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('byte' as const), at: fc.oneof(fc.nat(127), fc.nat(MAX_HEADER - 1)), value: fc.nat(255) }),
  fc.record({ kind: fc.constant('u32' as const), at: fc.oneof(fc.nat(31).map((i) => i * 4), fc.nat(MAX_HEADER - 4)), value: fc.oneof(extremes32, fc.nat(0xffffffff)) }),
  fc.record({ kind: fc.constant('u64' as const), at: fc.oneof(fc.nat(15).map((i) => i * 8), fc.nat(MAX_HEADER - 8)), value: fc.oneof(extremes64, fc.bigInt({ min: 0n, max: U64 - 1n })) }),
  fc.record({ kind: fc.constant('truncate' as const), length: fc.oneof(fc.nat(128), fc.nat(MAX_HEADER)) }),
);

function mutate(base: Buffer, muts: Mutation[], le: boolean): Buffer {
  let b = Buffer.from(base);
  for (const m of muts) {
    if (m.kind === 'truncate') b = b.subarray(0, Math.min(m.length, b.length));
    else if (m.kind === 'byte' && m.at < b.length) b[m.at] = m.value;
    else if (m.kind === 'u32' && m.at + 4 <= b.length) le ? b.writeUInt32LE(m.value, m.at) : b.writeUInt32BE(m.value, m.at);
    else if (m.kind === 'u64' && m.at + 8 <= b.length) le ? b.writeBigUInt64LE(m.value, m.at) : b.writeBigUInt64BE(m.value, m.at);
  }
  return b;
}

describe('probe fuzz', () => {
  let dir = '';
  let bases: Buffer[] = [];
  before(async () => {
    dir = await fsp.mkdtemp(path.join('/dev/shm', 'svfuzz-'));
    bases = await baseHeaders(dir);
  });
  after(() => fsp.rm(dir, { recursive: true, force: true }));

  it('mutated real headers: no exception, bounded time, only possible results', () => {
    const stat = { mode: 0o644, uid: 0, gid: 0, atimeNs: 0n, mtimeNs: 0n, ctimeNs: 0n };
    let slowest = 0;
    fc.assert(
      fc.property(fc.nat(), fc.array(mutationArb, { minLength: 1, maxLength: 8 }), fc.boolean(), fc.bigInt({ min: 0n, max: U64 - 1n }),
        (pick, muts, le, fileSize) => {
          const header = mutate(bases[pick % bases.length]!, muts, le);
          const t0 = performance.now();
          const r = probeBuffer(header, { fileSize, path: '/pool/img' });
          slowest = Math.max(slowest, performance.now() - t0);
          assert.ok((IMAGE_FORMATS as readonly string[]).includes(r.format));
          assert.equal(r.format, probeFormatFromBuffer(header));
          assert.ok(r.capacity >= 0n && r.capacity < U64);
          assert.ok(r.headerLength <= MAX_HEADER && r.headerLength === Math.min(header.length, MAX_HEADER));
          if (r.clusterSize !== null) assert.equal(r.clusterSize & (r.clusterSize - 1n), 0n);
          if (r.features !== null) assert.equal(r.compat, '1.1');
          if (r.compat !== null) assert.equal(r.format, 'qcow2');
          if (r.backing) {
            assert.ok(!r.backing.name.includes('\0'));
            if (r.format === 'qcow2' || r.format === 'qcow') assert.ok(Buffer.byteLength(r.backing.name, 'latin1') <= 1023 * 4);
            if (r.backing.type === 'network') assert.equal(r.backing.format, 'raw');
          }
          if (r.issues.some((i) => i.code === 'QCOW2_V3_TRUNCATED')) assert.equal(r.features, null);
          const xml = formatTargetXml({ path: '/pool/img', probe: r, stat });
          assert.ok(!/[\x00-\x08\x0b\x0c\x0e-\x1f]/.test(xml));
        }),
      { numRuns: 3000 },
    );
    assert.ok(slowest < 250, `slowest probe ${slowest.toFixed(1)} ms`);
  });

  it('random bytes of any length are probed', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 40000 }), (b) => {
        const r = probeBuffer(b, { fileSize: BigInt(b.length) });
        assert.ok(r.capacity >= 0n);
      }),
      { numRuns: 300 },
    );
  });
});

describe('chain fuzz', () => {
  let root = '';
  before(async () => {
    root = await fsp.mkdtemp(path.join('/dev/shm', 'svchainfuzz-'));
  });
  after(() => fsp.rm(root, { recursive: true, force: true }));

  it('random backing graphs: the walk ends, within maxDepth, never reading a file twice', async () => {
    let run = 0;
    const node = fc.record({
      raw: fc.boolean(),
      target: fc.oneof(fc.nat(7), fc.constantFrom('missing', 'self', 'dot', 'outside', 'net', 'none')),
      fmt: fc.constantFrom(undefined, 'raw', 'qcow2', 'foo', 'none'),
      link: fc.boolean(),
    });
    await fc.assert(
      fc.asyncProperty(fc.array(node, { minLength: 1, maxLength: 8 }), fc.integer({ min: 1, max: 12 }), fc.boolean(), async (nodes, maxDepth, withPool) => {
        const dir = path.join(root, `r${run++}`);
        await fsp.mkdir(dir);
        const name = (i: number): string => `n${i % nodes.length}.img`;
        for (const [i, n] of nodes.entries()) {
          if (n.raw) {
            await fsp.writeFile(path.join(dir, name(i)), Buffer.alloc(512));
            continue;
          }
          const t = n.target;
          const backing = typeof t === 'number' ? (n.link ? `l${t % nodes.length}` : name(t))
            : t === 'missing' ? 'missing.img' : t === 'self' ? name(i) : t === 'dot' ? '.' : t === 'outside' ? '../..' : t === 'net' ? 'nbd:x:1' : undefined;
          await fsp.writeFile(path.join(dir, name(i)), qcow2Header({
            ...(backing !== undefined ? { backing } : {}),
            ...(n.fmt !== undefined ? { backingFormat: n.fmt } : {}),
          }));
          if (typeof t === 'number' && n.link) await fsp.symlink(name(t), path.join(dir, `l${t % nodes.length}`)).catch(() => undefined);
        }
        const r = await followChain(path.join(dir, name(0)), { maxDepth, ...(withPool ? { poolDir: dir } : {}), allowProbedBacking: true });
        assert.ok(r.links.length >= 1 && r.links.length <= maxDepth);
        const real = r.links.map((l) => l.realPath);
        assert.equal(new Set(real).size, real.length, 'no file twice');
        assert.equal(r.complete, r.problems.length === 0);
        await fsp.rm(dir, { recursive: true, force: true });
      }),
      { numRuns: 150 },
    );
  });
});
