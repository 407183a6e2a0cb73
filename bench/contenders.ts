/**
 * The contenders: every way the bench moves an image, each a name plus a `prepare` that sets up
 * one run (untimed: volumes, servers) and returns the command to time. A contender whose tool or
 * server is missing is skipped with a reason; the rest of the table still runs.
 *
 * Directions: "download" = volume → local file, "upload" = local file → volume. Local floors and
 * anchors copy file → file in both directions (the same work; they bound what a transfer could
 * cost on this machine).
 */
import { rmSync, truncateSync, closeSync, openSync } from 'node:fs';
import { join } from 'node:path';
import type { BuiltImage } from './images.js';
import type { RunSpec } from './measure.js';
import { punchZeroBlocks } from './extents.js';
import { NbdkitFile, virshOk, type DirPool, type OurDaemon, type RbdBench } from './services.js';

export type Direction = 'download' | 'upload';

export interface Scenario {
  image: BuiltImage;
  direction: Direction;
  /** false: a plain transfer (no sparse flag: holes travel as zeros). */
  sparse: boolean;
  /** e.g. `a/download/sparse`. */
  key: string;
}

export interface BenchContext {
  repoRoot: string;
  /** Download outputs and local copies (deleted after verification). */
  outDir: string;
  /** Unix sockets of per-run servers. */
  runDir: string;
  /** libvirtd with the bench pool on the image directory, or why not. */
  libvirt: { uri: string; pool: DirPool; pid: number | null } | { skip: string };
  /** HOOK: sparsevirtd started by the bench with the same pool, or why not. */
  ours: { daemon: OurDaemon; pool: DirPool } | { skip: string };
  /** HOOK: path of dist/bin/sparsevirt.cjs, or why not. */
  cli: { mainJs: string } | { skip: string };
  /** HOOK: our local chunk copy (dist/bench/local-copy.js over dist/src/sparse), or why not. */
  localCopy: { script: string } | { skip: string };
  tools: { cp: boolean; qemuImg: boolean; nbdkit: boolean; nbdcopy: boolean; virsh: boolean };
  /** An RBD pool on a sparsevirtd of its own (scripts/setup-ceph.sh's cluster), or why not. */
  rbd?: RbdBench | { skip: string };
}

export interface PreparedRun {
  spec: RunSpec;
  /** Servers whose peak RSS is attributed to this run. */
  daemonPids: number[];
  /** The file to verify against the image. */
  output: string;
  /** After the timed command, before verification (e.g. stop nbdkit). */
  afterRun?: () => Promise<void>;
  /** After verification: delete the copy, volumes, servers. Must not throw. */
  cleanup: () => Promise<void>;
}

export interface Contender {
  id: string;
  label: string;
  kind: 'pair' | 'anchor' | 'floor';
  /** Shown under the table (e.g. tool defaults that matter). */
  note?: string;
  /**
   * Local file → file: the same work for "download" and "upload", so it runs once per image
   * (in the download scenario) and its numbers are shown in both tables.
   */
  directionFree?: boolean;
  /** null when usable, else why it is skipped. Evaluated once. */
  unavailable(ctx: BenchContext): string | null;
  supports(s: Scenario): boolean;
  prepare(ctx: BenchContext, s: Scenario): Promise<PreparedRun>;
}

/** The reference pair all ratios are taken against. */
export const REFERENCE_ID = 'virsh/libvirtd';
/** The reference of the RBD columns: Ceph's own `rbd import` / `rbd export`. */
export const RBD_REFERENCE_ID = 'rbd-cli';

const outPath = (ctx: BenchContext, c: { id: string }, s: Scenario): string =>
  join(ctx.outDir, `${c.id.replace(/[^A-Za-z0-9]+/g, '_')}-${s.image.spec.id}-${s.direction}.out`);

const skipOf = (x: object): string | null => ('skip' in x ? (x as { skip: string }).skip : null);

// ------------------------------------------------------------------------ libvirt-protocol pairs

type Client = 'virsh' | 'sparsevirt';
type Server = 'libvirtd' | 'sparsevirtd';

function pair(client: Client, server: Server): Contender {
  const id = `${client === 'virsh' ? 'virsh' : 'sv-cli'}/${server === 'libvirtd' ? 'libvirtd' : 'sv-d'}`;
  const label = `${client === 'virsh' ? 'virsh' : 'sparsevirt CLI'} ↔ ${server}`;
  const serverOf = (ctx: BenchContext): { uri: string; pool: DirPool; pid: number | null } => {
    if (server === 'libvirtd') {
      const l = ctx.libvirt as { uri: string; pool: DirPool; pid: number | null };
      return l;
    }
    const o = ctx.ours as { daemon: OurDaemon; pool: DirPool };
    return { uri: o.daemon.uri, pool: o.pool, pid: o.daemon.pid };
  };
  const command = (ctx: BenchContext, uri: string, args: string[]): RunSpec =>
    client === 'virsh'
      ? { cmd: 'virsh', args: ['-q', '-c', uri, ...args] }
      // run as installed (npm's bin link runs the file): its #! line is part of its start-up
      : { cmd: (ctx.cli as { mainJs: string }).mainJs, args: ['-c', uri, ...args] };

  return {
    id,
    label,
    kind: 'pair',
    unavailable(ctx) {
      if (client === 'virsh' && !ctx.tools.virsh) return 'virsh not installed (scripts/setup-libvirt.sh)';
      if (client === 'sparsevirt' && skipOf(ctx.cli)) return skipOf(ctx.cli);
      return skipOf(server === 'libvirtd' ? ctx.libvirt : ctx.ours);
    },
    supports: (s) => s.sparse || s.image.spec.plain,
    async prepare(ctx, s) {
      const { uri, pool, pid } = serverOf(ctx);
      const flag = s.sparse ? ['--sparse'] : [];
      const daemonPids = pid ? [pid] : [];
      if (s.direction === 'download') {
        const out = outPath(ctx, { id }, s);
        rmSync(out, { force: true });
        return {
          spec: command(ctx, uri, ['vol-download', '--pool', pool.name, s.image.spec.file, out, ...flag]),
          daemonPids,
          output: out,
          cleanup: async () => rmSync(out, { force: true }),
        };
      }
      const vol = `up-${id.replace(/[^A-Za-z0-9]+/g, '_')}-${s.image.spec.id}.raw`;
      const path = await pool.createEmpty(vol, s.image.spec.size);
      return {
        spec: command(ctx, uri, ['vol-upload', '--pool', pool.name, vol, s.image.path, ...flag]),
        daemonPids,
        output: path,
        cleanup: async () => {
          await pool.delete(vol).catch(() => undefined);
          rmSync(path, { force: true });
        },
      };
    },
  };
}

// ------------------------------------------------------------------------ Ceph RBD

/** The file's all-zero blocks become holes (verification of what rbd export wrote). */
async function digHoles(file: string): Promise<void> {
  punchZeroBlocks(file);
}

/**
 * Images the RBD columns move: the cluster keeps data in memory (memstore), so at most 2 GiB of
 * data (the dense image b); a run whose image does not fit in what the cluster has free fails
 * its setup with the figures.
 */
const rbdFits = (s: Scenario): boolean => s.sparse && s.image.dataBytes <= 2 * 1024 ** 3;

type RbdId = 'virsh/sv-d-rbd' | 'sv-cli/sv-d-rbd' | 'rbd-cli' | 'qemu-img-rbd';

const RBD_LABELS: Record<RbdId, string> = {
  'virsh/sv-d-rbd': 'virsh ↔ sparsevirtd (RBD pool)',
  'sv-cli/sv-d-rbd': 'sparsevirt CLI ↔ sparsevirtd (RBD pool)',
  'rbd-cli': 'rbd import / export (Ceph)',
  'qemu-img-rbd': 'qemu-img convert ↔ rbd: (qemu)',
};

const RBD_NOTES: Record<RbdId, string> = {
  'virsh/sv-d-rbd': 'sparsevirtd RBD pool, cephx through a secret; upload into a new image made by vol-create-as; '
    + 'uploads are verified through an untimed rbd export (zero blocks punched)',
  'sv-cli/sv-d-rbd': 'the same pool and images as virsh ↔ sparsevirtd (RBD pool), with our CLI (dist/bin/sparsevirt.cjs) as the client',
  'rbd-cli': 'rbd import / rbd export --no-progress as client.admin, defaults (sparse-size 4 KiB); import makes the image; '
    + "rbd export writes the zeros inside Ceph's extents (its output's zero 4 KiB blocks are punched untimed before verification)",
  'qemu-img-rbd': 'qemu-img convert -f raw -O raw with defaults (-S 4k, block status of the source) to or from '
    + 'rbd:POOL/IMAGE:id=admin:keyring=…:conf=… (qemu-block-extra); qemu-img makes the image on upload',
};

/**
 * An RBD image and a local file: `virsh/sv-d-rbd` (vol-upload/vol-download --sparse through
 * sparsevirtd's RBD pool), `rbd-cli` (`rbd import`/`rbd export`, Ceph's own tool) and
 * `qemu-img-rbd` (`qemu-img convert` through qemu's rbd driver), the last two talking to the
 * cluster directly. Download sources are imported once, untimed; an upload is verified by an
 * untimed `rbd export` of what arrived.
 */
function rbdContender(id: RbdId): Contender {
  const viaDaemon = id === 'virsh/sv-d-rbd' || id === 'sv-cli/sv-d-rbd';
  /** The client of a run through the daemon: virsh, or our CLI as installed. */
  const client = (ctx: BenchContext, args: string[]): RunSpec =>
    id === 'virsh/sv-d-rbd'
      ? { cmd: 'virsh', args: ['-q', '-c', (ctx.rbd as RbdBench).daemon.uri, ...args] }
      : { cmd: (ctx.cli as { mainJs: string }).mainJs, args: ['-c', (ctx.rbd as RbdBench).daemon.uri, ...args] };
  const c: Contender = {
    id,
    label: RBD_LABELS[id],
    kind: viaDaemon ? 'pair' : 'anchor',
    note: RBD_NOTES[id],
    unavailable: (ctx) => {
      if (!ctx.rbd) return 'not set up';
      if ('skip' in ctx.rbd) return ctx.rbd.skip;
      if (id === 'virsh/sv-d-rbd' && !ctx.tools.virsh) return 'virsh not installed';
      if (id === 'sv-cli/sv-d-rbd' && skipOf(ctx.cli)) return skipOf(ctx.cli);
      if (id === 'qemu-img-rbd') return ctx.rbd.qemuImgRbdMissing;
      return null;
    },
    supports: rbdFits,
    async prepare(ctx, s) {
      const rbd = ctx.rbd as RbdBench;
      const out = outPath(ctx, c, s);
      rmSync(out, { force: true });
      if (s.direction === 'download') {
        const src = await rbd.source(s.image.spec.id, s.image.path, s.image.dataBytes);
        const spec: RunSpec = viaDaemon
          ? client(ctx, ['vol-download', '--pool', rbd.pool, src, out, '--sparse'])
          : id === 'rbd-cli'
            ? { cmd: 'rbd', args: rbd.rbdArgs('export', '--no-progress', `${rbd.cephPool}/${src}`, out) }
            : { cmd: 'qemu-img', args: ['convert', '-f', 'raw', '-O', 'raw', rbd.qemuSpec(src), out] };
        return {
          spec,
          daemonPids: viaDaemon && rbd.daemon.pid ? [rbd.daemon.pid] : [],
          output: out,
          // rbd export writes the zeros inside the extents Ceph reports: punched afterwards, untimed
          afterRun: id === 'rbd-cli' ? () => digHoles(out) : undefined,
          cleanup: async () => rmSync(out, { force: true }),
        };
      }
      const name = `svbench-up-${id.replace(/[^A-Za-z0-9]+/g, '_')}-${s.image.spec.id}`;
      await rbd.remove(name);
      // the download source goes first: the cluster holds its data in memory
      await rbd.dropSource();
      await rbd.checkRoom(s.image.dataBytes);
      if (viaDaemon) await virshOk(rbd.daemon.uri, ['vol-create-as', rbd.pool, name, String(s.image.spec.size)]);
      const spec: RunSpec = viaDaemon
        ? client(ctx, ['vol-upload', '--pool', rbd.pool, name, s.image.path, '--sparse'])
        : id === 'rbd-cli'
          ? { cmd: 'rbd', args: rbd.rbdArgs('import', '--no-progress', s.image.path, `${rbd.cephPool}/${name}`) }
          : { cmd: 'qemu-img', args: ['convert', '-f', 'raw', '-O', 'raw', s.image.path, rbd.qemuSpec(name)] };
      return {
        spec,
        daemonPids: viaDaemon && rbd.daemon.pid ? [rbd.daemon.pid] : [],
        output: out,
        afterRun: async () => {
          await rbd.rbd('export', '--no-progress', `${rbd.cephPool}/${name}`, out);
          await digHoles(out);
        },
        cleanup: async () => {
          rmSync(out, { force: true });
          await rbd.remove(name);
        },
      };
    },
  };
  return c;
}

// ------------------------------------------------------------------------ anchors and floors

const nbdcopy: Contender = {
  id: 'nbdcopy/nbdkit',
  label: 'nbdcopy ↔ nbdkit file (unix)',
  kind: 'anchor',
  note: 'nbdcopy defaults (extents on, 4 connections, zero detection -S 4k); nbdkit started untimed per run',
  unavailable: (ctx) =>
    !ctx.tools.nbdkit ? 'nbdkit not installed (apt nbdkit)' : !ctx.tools.nbdcopy ? 'nbdcopy not installed (apt libnbd-bin)' : null,
  supports: (s) => s.sparse,
  async prepare(ctx, s) {
    const sock = join(ctx.runDir, `nbd-${s.image.spec.id}-${s.direction}.sock`);
    rmSync(sock, { force: true });
    if (s.direction === 'download') {
      const out = outPath(ctx, nbdcopy, s);
      rmSync(out, { force: true });
      const srv = new NbdkitFile(s.image.path, sock, true);
      await srv.start();
      return {
        spec: { cmd: 'nbdcopy', args: [srv.uri, out] },
        daemonPids: srv.pid ? [srv.pid] : [],
        output: out,
        afterRun: () => srv.stop(),
        cleanup: async () => {
          await srv.stop();
          rmSync(out, { force: true });
          rmSync(sock, { force: true });
        },
      };
    }
    // upload: an empty sparse target of the image's size served read-write
    const target = outPath(ctx, nbdcopy, s);
    closeSync(openSync(target, 'w'));
    truncateSync(target, s.image.spec.size);
    const srv = new NbdkitFile(target, sock, false);
    await srv.start();
    return {
      spec: { cmd: 'nbdcopy', args: [s.image.path, srv.uri] },
      daemonPids: srv.pid ? [srv.pid] : [],
      output: target,
      afterRun: () => srv.stop(),
      cleanup: async () => {
        await srv.stop();
        rmSync(target, { force: true });
        rmSync(sock, { force: true });
      },
    };
  },
};

function localFile(
  id: string,
  label: string,
  kind: 'anchor' | 'floor',
  note: string,
  unavailable: (ctx: BenchContext) => string | null,
  command: (ctx: BenchContext, src: string, dst: string) => RunSpec,
): Contender {
  const c: Contender = {
    id,
    label,
    kind,
    note,
    directionFree: true,
    unavailable,
    supports: (s) => s.sparse,
    async prepare(ctx, s) {
      const out = join(ctx.outDir, `${c.id.replace(/[^A-Za-z0-9]+/g, '_')}-${s.image.spec.id}.out`);
      rmSync(out, { force: true });
      return {
        spec: command(ctx, s.image.path, out),
        daemonPids: [],
        output: out,
        cleanup: async () => rmSync(out, { force: true }),
      };
    },
  };
  return c;
}

const cp = localFile(
  'cp',
  'cp --sparse=always (local)',
  'floor',
  'coreutils cp: SEEK_DATA/copy_file_range, holes kept',
  (ctx) => (ctx.tools.cp ? null : 'cp not found'),
  (_ctx, src, dst) => ({ cmd: 'cp', args: ['--sparse=always', src, dst] }),
);

const qemuImg = localFile(
  'qemu-img',
  'qemu-img convert raw→raw (local)',
  'anchor',
  'qemu-img convert -f raw -O raw with defaults: block status of the source, -S 4k zero detection, sparse output',
  (ctx) => (ctx.tools.qemuImg ? null : 'qemu-img not installed (apt qemu-utils)'),
  (_ctx, src, dst) => ({ cmd: 'qemu-img', args: ['convert', '-f', 'raw', '-O', 'raw', src, dst] }),
);

const ourLocal = localFile(
  'sv-local',
  'sparsevirt local chunk copy',
  'floor',
  'node dist/bench/local-copy.js: writeChunks(dst, fileChunks(src)) from dist/src/sparse',
  (ctx) => skipOf(ctx.localCopy),
  (ctx, src, dst) => ({ cmd: process.execPath, args: [(ctx.localCopy as { script: string }).script, src, dst] }),
);

/** In table order: ours first, then the reference pair, then anchors and floors. */
export function allContenders(): Contender[] {
  return [
    pair('sparsevirt', 'sparsevirtd'), // HOOK: needs dist/bin/sparsevirt.cjs + dist/bin/sparsevirtd.mjs
    pair('sparsevirt', 'libvirtd'), // HOOK: needs dist/bin/sparsevirt.cjs
    pair('virsh', 'sparsevirtd'), // HOOK: needs dist/bin/sparsevirtd.mjs
    pair('virsh', 'libvirtd'), // the reference
    nbdcopy,
    qemuImg,
    cp,
    ourLocal, // HOOK: needs dist/src/sparse/index.js (fileChunks, writeChunks)
    rbdContender('virsh/sv-d-rbd'), // needs scripts/setup-ceph.sh's cluster
    rbdContender('sv-cli/sv-d-rbd'),
    rbdContender('rbd-cli'),
    rbdContender('qemu-img-rbd'), // needs qemu-block-extra
  ];
}
