/**
 * Completion: `sparsevirt complete` (what the last word of a partial command line wants, pool
 * and volume names from the connection, opened only for them), and the generated bash function
 * run as bash runs it (COMP_WORDS, COMP_CWORD, and COMP_LINE where bash splits a URI or
 * `--pool=x` at `:` and `=`), against a daemon with two pools; the zsh script parses.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { tmpdir } from 'node:os';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { GROUPS } from '../src/cli/commands.js';
import { analyse, candidates, joinEquals, splitLine, type NameSource } from '../src/cli/cmd-complete.js';
import { bashCompletion, globalOptions, zshCompletion } from '../src/cli/completion-scripts.js';
import { connect } from '../src/client/index.js';
import { startTestDaemon, type TestDaemon } from './helpers/daemon.js';
import { scratchDir } from './helpers/images.js';
import { run } from './helpers/run.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const CLI = path.join(ROOT, 'dist/bin/sparsevirt.cjs');
const BASH_SCRIPT = path.join(ROOT, 'dist/completion/sparsevirt.bash');
const ZSH_SCRIPT = path.join(ROOT, 'dist/completion/_sparsevirt');

const fixedNames: NameSource = {
  pools: async () => ['default', 'devpool', 'other'],
  vols: async (pool) => (pool === 'devpool' ? ['a.img', 'b.qcow2'] : []),
};

async function complete(...words: string[]): Promise<string[]> {
  return candidates(analyse(words), fixedNames);
}

test('what the last word wants: commands, options not given yet, positional and named values, --opt=value, files', async () => {
  assert.deepEqual(await complete('vol-d'), ['vol-delete', 'vol-download', 'vol-dumpxml']);
  assert.deepEqual(await complete(''), GROUPS.flatMap((g) => g.commands.map((c) => c.name)), 'every command');
  assert.deepEqual(await complete('vol-download', '--pool', 'de'), ['default', 'devpool']);
  assert.deepEqual(await complete('vol-download', '--pool=de'), ['--pool=default', '--pool=devpool']);
  assert.deepEqual(await complete('vol-download', '--pool', '=', 'dev'), ['--pool=devpool']);
  assert.deepEqual(await complete('vol-info', '--pool', 'devpool', ''), ['a.img', 'b.qcow2']);
  assert.deepEqual(await complete('vol-info', '--pool', 'default', ''), []);
  assert.deepEqual(await complete('vol-info', ''), [], 'a volume without its pool: nothing to offer');
  assert.deepEqual(await complete('vol-list', ''), ['default', 'devpool', 'other'], 'the positional <pool>');
  assert.deepEqual(await complete('vol-list', 'default', ''), ['--details', '--json'], 'nothing positional left: the options');
  assert.deepEqual(await complete('vol-list', '--details', '--'), ['--pool', '--json']);
  assert.deepEqual(await complete('vol-upload', '--pool', 'default', 'v.img', ''), [], 'a file: the shell completes it');
  assert.deepEqual(await complete('vol-create-as', 'default', 'v', '1G', '--format', 'qc'), ['qcow', 'qcow2']);
  assert.deepEqual(await complete('pool-define-as', 'p', 'd'), ['dir', 'disk']);
  assert.deepEqual(await complete('vol-wipe', 'v', '--algorithm', 'p'), ['pfitzner7', 'pfitzner33']);
  assert.deepEqual(await complete('help', 'po'), ['pool-autostart', 'pool-build', 'pool-define-as', 'pool-destroy', 'pool-dumpxml', 'pool-info', 'pool-list', 'pool-refresh', 'pool-start', 'pool-undefine', 'pool']);
  assert.deepEqual(await complete('pool-list', '--details', '--'), ['--inactive', '--all', '--transient', '--persistent', '--autostart', '--no-autostart', '--type', '--uuid', '--name', '--json']);
  assert.deepEqual(await complete('no-such-command', ''), []);
  assert.deepEqual(await complete('vol-list', '--', '--'), [], 'after --, words are data');
  assert.deepEqual(joinEquals(['--pool', '=', 'x', 'y', '=']), ['--pool=x', 'y', '=']);
  assert.deepEqual(splitLine('vol-list  --pool de'), ['vol-list', '--pool', 'de']);
  assert.deepEqual(splitLine('vol-list '), ['vol-list', '']);
});

let d: TestDaemon;
let bin: string;

before(async () => {
  d = await startTestDaemon();
  const conn = await connect(d.uri);
  for (const name of ['default', 'devpool']) {
    const p = await conn.storagePoolDefineDir(name, path.join(d.dir, name));
    await p.build();
    await p.create();
  }
  const dev = await conn.storagePoolLookupByName('devpool');
  for (const v of ['disk-a.img', 'disk-b.img', 'other.img']) await dev.createVol({ name: v, capacity: 1 << 20 });
  await conn.close();
  bin = await scratchDir(tmpdir(), 'sv-complete-bin-');
  fs.symlinkSync(CLI, path.join(bin, 'sparsevirt'));
});

after(async () => {
  await d.stop();
  await fsp.rm(bin, { recursive: true, force: true });
});

/**
 * `_sparsevirt` for these words (the last one being completed), as bash calls it; COMP_LINE when
 * given. Asynchronous: the daemon runs in this process.
 */
async function bashComplete(words: string[], line?: string): Promise<string[]> {
  const script = [
    `source ${JSON.stringify(BASH_SCRIPT)}`,
    'COMP_WORDS=("$@")',
    'COMP_CWORD=$(($# - 1))',
    ...(line !== undefined ? ['COMP_LINE=$SV_LINE', 'COMP_POINT=${#COMP_LINE}'] : []),
    '_sparsevirt sparsevirt',
    'printf "%s\\n" "${COMPREPLY[@]}"',
  ].join('; ');
  const r = await run('bash', ['--norc', '--noprofile', '-c', script, 'bash', ...words], {
    env: { ...process.env, PATH: `${bin}:${process.env.PATH}`, SV_LINE: line ?? '' }, timeoutMs: 30_000,
  });
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stderr, '');
  return r.stdout.split('\n').filter(Boolean);
}

test('the bash function: commands, global and command options from its tables; pools and volumes from the daemon', async () => {
  const uri = d.uri;
  assert.deepEqual(await bashComplete(['sparsevirt', 'vol-d']), ['vol-delete', 'vol-download', 'vol-dumpxml']);
  assert.deepEqual(await bashComplete(['sparsevirt', '--co']), ['--connect']);
  assert.deepEqual(await bashComplete(['sparsevirt', '-c', uri, 'pool-l']), ['pool-list']);
  assert.deepEqual(await bashComplete(['sparsevirt', '-c', uri, 'vol-download', '--pool', 'de']), ['default', 'devpool']);
  assert.deepEqual(await bashComplete(['sparsevirt', '-c', uri, 'vol-info', '--pool', 'devpool', 'disk']), ['disk-a.img', 'disk-b.img']);
  assert.deepEqual(await bashComplete(['sparsevirt', '-q', '-c', uri, '-r', 'vol-list', '']), ['default', 'devpool']);
  assert.deepEqual(await bashComplete(['sparsevirt', '-c', uri, 'vol-list', 'devpool', '--d']), ['--details']);
  assert.deepEqual(await bashComplete(['sparsevirt', '-c', uri, 'vol-info', '--bytes', '--']), ['--vol', '--pool', '--physical', '--json']);
  assert.deepEqual(await bashComplete(['sparsevirt', '-c', uri, 'vol-create-as', 'devpool', 'n', '1G', '--format', 'q']), ['qcow', 'qcow2', 'qed']);
  assert.deepEqual(await bashComplete(['sparsevirt', '-c', uri, 'vol-upload', '--pool', 'devpool', 'disk-a.img', '']), [], 'a file name: bash completes it (-o default)');
});

test('the bash function as bash splits words at : and = (COMP_WORDBREAKS): the URI and --pool=x are whole again', async () => {
  const sock = d.socket;
  const line = `sparsevirt -c sparsevirt+unix:///system?socket=${sock} vol-info --pool=devpool disk-`;
  const words = ['sparsevirt', '-c', 'sparsevirt+unix', ':', '///system?socket', '=', sock, 'vol-info', '--pool', '=', 'devpool', 'disk-'];
  assert.deepEqual(await bashComplete(words, line), ['disk-a.img', 'disk-b.img']);
  const line2 = `sparsevirt -c sparsevirt+unix:///system?socket=${sock} vol-info --pool=dev`;
  const words2 = ['sparsevirt', '-c', 'sparsevirt+unix', ':', '///system?socket', '=', sock, 'vol-info', '--pool', '=', 'dev'];
  assert.deepEqual(await bashComplete(words2, line2), ['devpool'], 'bash replaces its own piece, after the =');
});

test('sparsevirt complete: connects only for names; a connection that fails is reported on stderr with status 1', async () => {
  const env = { ...process.env, LIBVIRT_DEFAULT_URI: 'sparsevirt+unix:///system?socket=/nonexistent/sv.sock' };
  const cmds = await run(CLI, ['complete', '--', 'pool-'], { env });
  assert.equal(cmds.code, 0, cmds.stderr);
  assert.ok(cmds.stdout.split('\n').includes('pool-list'));
  const names = await run(CLI, ['complete', '--', 'vol-list', ''], { env });
  assert.equal(names.code, 1);
  assert.equal(names.stdout, '');
  assert.equal(names.stderr, "error: failed to connect to the hypervisor\nerror: Failed to connect socket to '/nonexistent/sv.sock': No such file or directory\n");
  const live = await run(CLI, ['-c', d.uri, 'complete', '--', 'vol-list', '--pool', 'd']);
  assert.deepEqual([live.code, live.stdout], [0, 'default\ndevpool\n']);
  // one argument with blanks is a whole line (a trailing blank: a new, empty word)
  const asLine = await run(CLI, ['-c', d.uri, 'complete', 'vol-info --pool devpool ']);
  assert.deepEqual([asLine.code, asLine.stdout], [0, 'disk-a.img\ndisk-b.img\nother.img\n']);
});

test('the scripts in dist are the generator\'s; the zsh script parses (when zsh is here)', (t) => {
  assert.equal(fs.readFileSync(BASH_SCRIPT, 'utf8'), bashCompletion());
  assert.equal(fs.readFileSync(ZSH_SCRIPT, 'utf8'), zshCompletion());
  assert.deepEqual(globalOptions().map((o) => o.long ?? o.short), ['--connect', '--debug', '--escape', '--help', '--keepalive-interval', '--keepalive-count', '--log', '--quiet', '--readonly', '--timing', '-v', '-V', '--version']);
  assert.equal(globalOptions().find((o) => o.long === '--keepalive-interval')!.help, 'keepalive interval in seconds, 0 for disable');
  const n = spawnSync('bash', ['-n', BASH_SCRIPT], { encoding: 'utf8' });
  assert.equal(n.status, 0, n.stderr);
  if (spawnSync('sh', ['-c', 'command -v zsh']).status !== 0) return t.skip('no zsh');
  const z = spawnSync('zsh', ['-n', ZSH_SCRIPT], { encoding: 'utf8' });
  assert.equal(z.status, 0, z.stderr);
});
