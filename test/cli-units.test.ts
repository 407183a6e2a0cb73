/**
 * Unit tests of the CLI's pieces, no server needed: number and size parsing, virsh's option
 * grammar and command strings, global options, help text, output formats, the progress bar,
 * -d and -l, shell completion.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import { findCommand } from '../src/cli/commands.js';
import { complete } from '../src/cli/complete.js';
import { INTERRUPTS, signalStatus, statusSignal } from '../src/cli/exit.js';
import { clock, humanBytes, humanDuration, labelLine, prettyCapacity, renderTable, strerror, tableCell } from '../src/cli/format.js';
import { parseGlobals } from '../src/cli/globals.js';
import { parseSize, parseULongLong, parseUuid, scaleInteger, strtoull } from '../src/cli/numbers.js';
import { buildPoolXml, splitCommaList, asciiCaseCompare } from '../src/cli/cmd-pool.js';
import { ProgressBar, renderProgress, summaryLine } from '../src/cli/progress.js';
import { run } from '../src/cli/run.js';
import { argvTokens, commandHelp, parseCommands, stringTokens, type ParsedCmd } from '../src/cli/vsh.js';
import { parseUri } from '../src/transport/uri.js';

const U64 = (1n << 64n) - 1n;

test('strtoull and virStrToLong_ull(p): blanks, signs, wrap, overflow, trailing junk', () => {
  assert.deepEqual(strtoull('  42xyz'), { value: 42n, end: 4, overflow: false });
  assert.equal(strtoull('abc').end, 0);
  assert.equal(strtoull('-').end, 0);
  assert.equal(parseULongLong('0', false), 0n);
  assert.equal(parseULongLong('18446744073709551615', false), U64);
  assert.equal(parseULongLong('18446744073709551616', true), null, 'ERANGE');
  assert.equal(parseULongLong('-1', true), U64, 'wraps like strtoull');
  assert.equal(parseULongLong('-18446744073709551615', true), 1n);
  assert.equal(parseULongLong('-1', false), null, 'the p variant refuses a minus');
  assert.equal(parseULongLong('-0', false), null);
  assert.equal(parseULongLong(' 7', false), 7n);
  assert.equal(parseULongLong('+7', false), 7n);
  assert.equal(parseULongLong('7 ', false), null, 'trailing blank');
  assert.equal(parseULongLong('0x10', false), null, 'base 10 only');
  assert.equal(parseULongLong('', false), null);
  assert.equal(parseULongLong('1.5', true), null);
});

test('sizes: virsh suffixes (b, k/KiB = 1024, KB = 1000, … E), bytes by default, errors as libvirt', () => {
  const ok = (s: string, v: bigint) => assert.deepEqual(parseSize(s), { ok: true, value: v }, s);
  ok('0', 0n);
  ok('1', 1n);
  ok('123456789', 123456789n);
  ok('1b', 1n);
  ok('1B', 1n);
  ok('1k', 1024n);
  ok('1K', 1024n);
  ok('1KiB', 1024n);
  ok('1kib', 1024n);
  ok('1KB', 1000n);
  ok('1kb', 1000n);
  ok('1M', 1048576n);
  ok('1MiB', 1048576n);
  ok('1MB', 1000000n);
  ok('4M', 4194304n);
  ok('1G', 1n << 30n);
  ok('2GiB', 2n << 30n);
  ok('1GB', 1000000000n);
  ok('1T', 1n << 40n);
  ok('1TB', 10n ** 12n);
  ok('1P', 1n << 50n);
  ok('1E', 1n << 60n);
  ok('15E', 15n << 60n);
  ok(' 5', 5n);
  ok('+5kb', 5000n);
  ok('1bB', 1n);
  assert.deepEqual(parseSize('16E'), { ok: false, detail: 'numerical overflow: value too large: 16E' });
  assert.deepEqual(parseSize('99999999999T'), { ok: false, detail: 'numerical overflow: value too large: 99999999999T' });
  assert.deepEqual(parseSize('1Q'), { ok: false, detail: "invalid argument: unknown suffix 'Q'" });
  assert.deepEqual(parseSize('1.5G'), { ok: false, detail: "invalid argument: unknown suffix '.5G'" });
  assert.deepEqual(parseSize('1Ki'), { ok: false, detail: "invalid argument: unknown suffix 'Ki'" });
  assert.deepEqual(parseSize('1 M'), { ok: false, detail: "invalid argument: unknown suffix ' M'" });
  assert.deepEqual(parseSize('-1'), { ok: false, detail: null }, 'virsh: only "Malformed size -1"');
  assert.deepEqual(parseSize('x'), { ok: false, detail: null });
  assert.deepEqual(parseSize(''), { ok: false, detail: null });
  assert.deepEqual(parseSize('18446744073709551616'), { ok: false, detail: null });
  assert.deepEqual(scaleInteger(0n, 'E', 1n, U64), { ok: true, value: 0n }, 'zero never overflows');
});

test('UUIDs as libvirt parses them', () => {
  const want = Buffer.from('d2de9206875646 1a98dc caa15a98dc54'.replace(/ /g, ''), 'hex');
  assert.deepEqual(parseUuid('d2de9206-8756-461a-98dc-caa15a98dc54'), want);
  assert.deepEqual(parseUuid('  d2de92068756461a98dccaa15a98dc54  '), want);
  assert.deepEqual(parseUuid('d2de9206 8756 461a 98dc caa15a98dc54'), want);
  assert.equal(parseUuid('d2de9206-8756-461a-98dc-caa15a98dc5'), null);
  assert.equal(parseUuid('d2de9206-8756-461a-98dc-caa15a98dc54x'), null);
  assert.equal(parseUuid('g2de9206-8756-461a-98dc-caa15a98dc54'), null);
  assert.equal(parseUuid('d-2de9206-8756-461a-98dc-caa15a98dc54'), null, 'a dash inside a pair');
});

test('pretty capacities: two decimals, binary units, glibc rounding (ties to even)', () => {
  assert.equal(prettyCapacity(0), '0.00 B');
  assert.equal(prettyCapacity(1), '1.00 B');
  assert.equal(prettyCapacity(1023), '1023.00 B');
  assert.equal(prettyCapacity(1024), '1.00 KiB');
  assert.equal(prettyCapacity(438272), '428.00 KiB');
  assert.equal(prettyCapacity(1048576), '1.00 MiB');
  assert.equal(prettyCapacity(3000000), '2.86 MiB');
  assert.equal(prettyCapacity(4194304), '4.00 MiB');
  assert.equal(prettyCapacity(1179648), '1.12 MiB', '1.125 rounds to even');
  assert.equal(prettyCapacity(1441792), '1.38 MiB', '1.375 rounds to even');
  assert.equal(prettyCapacity(1029), '1.00 KiB', '1.0048828125');
  assert.equal(prettyCapacity(1034), '1.01 KiB', '1.009765625');
  assert.equal(prettyCapacity(270553174016), '251.97 GiB');
  assert.equal(prettyCapacity(32479731712), '30.25 GiB');
  assert.equal(prettyCapacity(238073442304), '221.72 GiB');
  assert.equal(prettyCapacity(25276514304), '23.54 GiB');
  assert.equal(prettyCapacity(8n << 40n), '8.00 TiB');
  assert.equal(prettyCapacity(1n << 50n), '1.00 PiB');
  assert.equal(prettyCapacity(1n << 60n), '1.00 EiB');
  assert.equal(prettyCapacity(1048575), '1024.00 KiB', 'just under a MiB');
  assert.equal(labelLine('Capacity:', '1.00 MiB'), 'Capacity:       1.00 MiB\n');
});

test('vsh tables: padding, dashes, no header with -q, escapes', () => {
  // the pool-list capture
  assert.equal(renderTable(['Name', 'State', 'Autostart'], [['anchor', 'active', 'no']]),
    ' Name     State    Autostart\n------------------------------\n anchor   active   no\n');
  assert.equal(renderTable(['Name', 'State', 'Autostart'], [['anchor', 'active', 'no']], false), ' anchor   active   no\n');
  assert.equal(renderTable(['Name', 'Path'], []), ' Name   Path\n--------------\n');
  // the vol-list --details capture
  assert.equal(renderTable(['Name', 'Path', 'Type', 'Capacity', 'Allocation'],
    [['proto-a.img', '/var/lib/sv-capture/pooldir/proto-a.img', 'file', '1.00 MiB', '1.00 MiB']]),
  ' Name          Path                                      Type   Capacity   Allocation\n' +
  '---------------------------------------------------------------------------------------\n' +
  ' proto-a.img   /var/lib/sv-capture/pooldir/proto-a.img   file   1.00 MiB   1.00 MiB\n');
  assert.deepEqual(tableCell('a\tb'), { text: 'a\\x09b', width: 6 });
  assert.deepEqual(tableCell('a\\xb'), { text: 'a\\x5cxb', width: 7 });
  assert.deepEqual(tableCell('日本'), { text: '日本', width: 4 });
  assert.deepEqual(tableCell('é'), { text: 'é', width: 1 });
});

const parse = (argv: string[]) => {
  const errors: string[] = [];
  try {
    return { cmds: parseCommands(argvTokens(argv), findCommand, (m) => errors.push(m)), errors };
  } catch {
    return { cmds: null, errors };
  }
};
const parseString = (s: string) => {
  const errors: string[] = [];
  const onError = (m: string) => errors.push(m);
  try {
    return { cmds: parseCommands(stringTokens(s, onError), findCommand, onError), errors };
  } catch {
    return { cmds: null, errors };
  }
};
const opts = (c: ParsedCmd) => Object.fromEntries(c.opts);

test('option grammar: names, =values, positions (also of --pool, --offset…), --', () => {
  let r = parse(['vol-upload', '--pool', 'P', 'VOL', 'FILE']);
  assert.deepEqual(opts(r.cmds![0]!), { pool: 'P', vol: 'VOL', file: 'FILE' });
  r = parse(['vol-upload', '--vol', 'VOL', '--file', 'FILE', '--sparse', '--offset', '5']);
  assert.deepEqual(opts(r.cmds![0]!), { vol: 'VOL', file: 'FILE', sparse: true, offset: '5' });
  r = parse(['vol-upload', '--vol=VOL', '--file=FILE', '--pool=P', '--length=7', '--offset=']);
  assert.deepEqual(opts(r.cmds![0]!), { vol: 'VOL', file: 'FILE', pool: 'P', length: '7', offset: '' });
  r = parse(['vol-download', 'VOL', 'FILE', 'P', '10', '20']);
  assert.deepEqual(opts(r.cmds![0]!), { vol: 'VOL', file: 'FILE', pool: 'P', offset: '10', length: '20' }, 'virsh 9.0 fills string and int options by position too');
  r = parse(['vol-info', 'x.img', 'P', '--bytes']);
  assert.deepEqual(opts(r.cmds![0]!), { vol: 'x.img', pool: 'P', bytes: true });
  r = parse(['vol-info', '--pool', 'P', '--', '--bytes']);
  assert.deepEqual(opts(r.cmds![0]!), { pool: 'P', vol: '--bytes' });
  r = parse(['vol-resize', '--pool', 'P', 'v', '--', '-1M', '--shrink']);
  assert.equal(r.cmds, null);
  assert.deepEqual(r.errors, ["unexpected data '--shrink'"]);
  r = parse(['pool-dumpxml', 'P', 'expr']);
  assert.deepEqual(r.errors, ["unexpected data 'expr'"], '--xpath is never positional');
  r = parse(['vol-info', '-bytes', 'P']);
  assert.deepEqual(opts(r.cmds![0]!), { vol: '-bytes', pool: 'P' }, 'a single dash is data');
  r = parse(['vol-list', 'P', '--json']);
  assert.deepEqual(opts(r.cmds![0]!), { pool: 'P', json: true });
});

test('option grammar: virsh error messages', () => {
  const errs = (argv: string[]) => parse(argv).errors;
  assert.deepEqual(errs(['nosuch']), ["unknown command: 'nosuch'"]);
  assert.deepEqual(errs(['pool-info']), ["command 'pool-info' requires <pool> option"]);
  assert.deepEqual(errs(['vol-create-as', 'p']), ["command 'vol-create-as' requires <name> option", "command 'vol-create-as' requires <capacity> option"]);
  assert.deepEqual(errs(['pool-info', 'a', 'b']), ["unexpected data 'b'"]);
  assert.deepEqual(errs(['pool-info', '--bogus', 'x']), ["command 'pool-info' doesn't support option --bogus"]);
  assert.deepEqual(errs(['vol-wipe', 'v', '--json']), ["command 'vol-wipe' doesn't support option --json"]);
  assert.deepEqual(errs(['pool-info', '--bytes=1', 'x']), ["invalid '=' after option --bytes"]);
  assert.deepEqual(errs(['vol-info', '--vol', 'a', '--vol', 'b']), ['option --vol already seen']);
  assert.deepEqual(errs(['vol-info', 'a', '--vol', 'b']), ['option --vol already seen']);
  assert.deepEqual(errs(['vol-info', '--pool']), ['expected syntax: --pool <string>']);
  assert.deepEqual(errs(['vol-upload', 'v', 'f', '--offset']), ['expected syntax: --offset <number>']);
  assert.deepEqual(errs(['pool-info', '--help=x']), ["invalid '=' after option --help"]);
});

test('--help turns a command into help CMD; help ignores what it does not know', () => {
  let r = parse(['pool-info', '--help']);
  assert.equal(r.cmds![0]!.def.name, 'help');
  assert.deepEqual(opts(r.cmds![0]!), { command: 'pool-info' });
  r = parse(['vol-create-as', '--help']);
  assert.deepEqual(opts(r.cmds![0]!), { command: 'vol-create-as' }, 'required options are not checked');
  r = parse(['pool-info', '--help', '--bogus']);
  assert.equal(r.cmds, null);
  r = parse(['help', 'pool-info', 'extra', '--whatever']);
  assert.deepEqual(opts(r.cmds![0]!), { command: 'pool-info' });
});

test('command strings: quotes, escapes, ; and newlines, # comments', () => {
  let r = parseString('uri; pool-info \'my pool\' --bytes');
  assert.deepEqual(r.cmds!.map((c) => [c.def.name, opts(c)]), [['uri', {}], ['pool-info', { pool: 'my pool', bytes: true }]]);
  r = parseString('pool-info "a\\"b"x\\ y');
  assert.deepEqual(opts(r.cmds![0]!), { pool: 'a"bx y' });
  r = parseString("pool-info 'a\\b'");
  assert.deepEqual(opts(r.cmds![0]!), { pool: 'a\\b' }, 'no escapes in single quotes');
  r = parseString('uri # hostname\nhostname');
  assert.deepEqual(r.cmds!.map((c) => c.def.name), ['uri', 'hostname']);
  r = parseString('# all comment');
  assert.deepEqual(r.cmds, []);
  r = parseString('  ');
  assert.deepEqual(r.cmds, []);
  r = parseString("pool-info 'unterminated");
  assert.deepEqual(opts(r.cmds![0]!), { pool: 'unterminated' }, 'virsh accepts an open single quote');
  assert.deepEqual(parseString('pool-info sv\\').errors, ['dangling \\']);
  assert.deepEqual(parseString('pool-info "sv').errors, ['missing "']);
  r = parseString('uri;;hostname');
  assert.deepEqual(r.cmds!.map((c) => c.def.name), ['uri', 'hostname']);
});

test('global options as getopt_long("+:c:d:e:hk:K:l:qrtvV")', () => {
  const run = (argv: string[]) => parseGlobals(argv);
  let g = run(['-c', 'qemu:///system', 'uri']);
  assert.deepEqual(g, { kind: 'run', opts: { readonly: false, quiet: false, timing: false, connect: 'qemu:///system' }, rest: ['uri'], warnings: '' });
  g = run(['-qrc', 'U', 'pool-list', '-q']);
  assert.equal(g.kind, 'run');
  if (g.kind === 'run') {
    assert.deepEqual([g.opts.quiet, g.opts.readonly, g.opts.connect], [true, true, 'U']);
    assert.deepEqual(g.rest, ['pool-list', '-q'], 'stops at the command');
  }
  g = run(['-cU', '--conn=V', '--read', '-t', '-k', '7', '-K3', 'x']);
  assert.ok(g.kind === 'run' && g.opts.connect === 'V' && g.opts.readonly && g.opts.timing && g.opts.keepaliveInterval === 7 && g.opts.keepaliveCount === 3);
  assert.deepEqual(run(['--', '-c']), { kind: 'run', opts: { readonly: false, quiet: false, timing: false }, rest: ['-c'], warnings: '' });
  assert.deepEqual(run(['-z']), { kind: 'exit', code: 1, err: "error: unsupported option '-z'. See --help.\n" });
  assert.deepEqual(run(['--bogus=1']), { kind: 'exit', code: 1, err: "error: unsupported option '--bogus=1'. See --help.\n" });
  assert.deepEqual(run(['--help=1']), { kind: 'exit', code: 1, err: "error: unsupported option '-h'. See --help.\n" });
  assert.deepEqual(run(['-c']), { kind: 'exit', code: 1, err: "error: option '-c'/'--connect' requires an argument\n" });
  assert.deepEqual(run(['--connect']), { kind: 'exit', code: 1, err: "error: option '-c'/'--connect' requires an argument\n" });
  assert.deepEqual(run(['-k', 'x']), { kind: 'exit', code: 1, err: 'error: Invalid value for option -k\n' });
  assert.deepEqual(run(['-K', '-2']), { kind: 'exit', code: 1, err: 'error: option -K requires a positive integer argument\n' });
  assert.deepEqual(run(['-d', 'x']), { kind: 'exit', code: 1, err: 'error: option -d takes a numeric argument\n' });
  const d = run(['-d', '9', 'uri']);
  assert.ok(d.kind === 'run' && d.warnings === 'error: ignoring debug level 9 out of range [0-4]\n' && d.opts.debug === undefined);
  const d2 = run(['-d2', '-l', '/tmp/x.log', '-e', '^', 'uri']);
  assert.ok(d2.kind === 'run' && d2.opts.debug === 2 && d2.opts.logFile === '/tmp/x.log' && d2.warnings === '', '-d and -l are kept; -e is accepted');
  const d3 = run(['--debug=0', '--log=/l']);
  assert.ok(d3.kind === 'run' && d3.opts.debug === 0 && d3.opts.logFile === '/l');
  assert.deepEqual(run(['-v', '--bogus']), { kind: 'exit', code: 0, out: '9.0.0\n' }, 'acts at once, as getopt');
  assert.deepEqual(run(['--version']), { kind: 'exit', code: 0, out: '9.0.0\n' });
  assert.deepEqual(run(['--version=short']), { kind: 'exit', code: 0, out: '9.0.0\n' });
  const long = run(['--version=long']);
  assert.ok(long.kind === 'exit' && long.code === 0 && /^sparsevirt \d+\.\d+\.\d+/.test(long.out!));
  const h = run(['-h', '--bogus']);
  assert.ok(h.kind === 'exit' && h.code === 0 && h.out!.includes('-c | --connect=URI'));
  assert.ok(h.kind === 'exit' && h.out!.includes(' Storage Volume (help keyword \'volume\')\n    vol-create-as'));
});

test('help text in virsh 9.0 format', () => {
  assert.equal(commandHelp(findCommand('pool-build')!),
    '  NAME\n    pool-build - build a pool\n\n  SYNOPSIS\n    pool-build <pool> [--no-overwrite] [--overwrite]\n\n' +
    '  DESCRIPTION\n    Build a given pool.\n\n  OPTIONS\n    [--pool] <string>  pool name or uuid\n' +
    '    --no-overwrite   do not overwrite any existing data\n    --overwrite      overwrite any existing data\n\n');
  assert.equal(commandHelp(findCommand('quit')!), '  NAME\n    quit - quit this interactive terminal\n\n  SYNOPSIS\n    quit\n\n');
  assert.equal(commandHelp(findCommand('uri')!),
    '  NAME\n    uri - print the hypervisor canonical URI\n\n  SYNOPSIS\n    uri [--json]\n\n  OPTIONS\n    --json           print JSON (sparsevirt extension)\n\n');
  const upload = commandHelp(findCommand('vol-upload')!);
  assert.ok(upload.includes('    vol-upload <vol> <file> [--pool <string>] [--offset <number>] [--length <number>] [--sparse] [--sparse-fallback] [--verbose] [--json]\n'));
  assert.ok(upload.includes('    --offset <number>  volume offset to upload to\n'));
  assert.ok(upload.includes('    [--file] <string>  file\n'));
  assert.ok(upload.includes('(sparsevirt extension)'));
});

test('pool XML as virsh builds it; comma lists; name order', () => {
  assert.equal(buildPoolXml({ name: 'protopool', type: 'dir', target: '/var/lib/sv-capture/pooldir' }),
    "<pool type='dir'>\n  <name>protopool</name>\n  <target>\n    <path>/var/lib/sv-capture/pooldir</path>\n  </target>\n</pool>\n");
  assert.equal(buildPoolXml({ name: 'n', type: 'netfs', 'source-host': 'h', 'source-path': '/x', 'source-format': 'nfs' }),
    "<pool type='netfs'>\n  <name>n</name>\n  <source>\n    <host name='h'/>\n    <dir path='/x'/>\n    <format type='nfs'/>\n  </source>\n</pool>\n");
  assert.deepEqual(splitCommaList('dir,fs'), ['dir', 'fs']);
  assert.deepEqual(splitCommaList('a,,b,c'), ['a,b', 'c']);
  assert.deepEqual(['b', 'A', 'a', 'C', '_'].sort(asciiCaseCompare), ['_', 'A', 'a', 'b', 'C']);
});

test('progress line: bytes of total, holes, rate, ETA; fits the terminal', () => {
  const c = { dataBytes: 512 * 1024 * 1024, holeBytes: 3 * 1024 ** 3 };
  assert.equal(renderProgress(c, 16 * 1024 ** 3, 2, 120, 'upload'),
    'upload  21% [' + '#'.repeat(9) + '.'.repeat(31) + '] 3.50 GiB / 16.0 GiB  holes 3.00 GiB  256 MiB/s  ETA 0:07');
  // narrower: the holes go first, then the bar, the byte counts, the verb; rate and ETA stay
  assert.equal(renderProgress(c, 16 * 1024 ** 3, 2, 80, 'download'), 'download  21% [####.............] 3.50 GiB / 16.0 GiB  256 MiB/s  ETA 0:07');
  assert.equal(renderProgress(c, 16 * 1024 ** 3, 2, 60, 'download'), 'download  21% [####..............] 256 MiB/s  ETA 0:07');
  assert.equal(renderProgress(c, 16 * 1024 ** 3, 2, 40, 'download'), 'download  21%  256 MiB/s  ETA 0:07');
  assert.equal(renderProgress(c, 16 * 1024 ** 3, 2, 30, 'download'), '256 MiB/s  ETA 0:07');
  for (let cols = 1; cols <= 130; cols++) {
    for (const [d, h, total, t] of [[0, 0, 1000, 0], [1023 * 2 ** 20, 1023 * 2 ** 30, 2 ** 41, 3725], [5, 0, 0, 1], [2 ** 40, 0, 2 ** 40, 40000]]) {
      const line = renderProgress({ dataBytes: d!, holeBytes: h! }, total!, t!, cols, 'download');
      assert.ok(line.length <= Math.max(1, cols - 1), `${cols} columns: ${JSON.stringify(line)}`);
      if (cols >= 40 && total! > 0) assert.match(line, /\/s {2}ETA /, `${cols} columns: rate and ETA in ${JSON.stringify(line)}`);
    }
  }
  // the layout and the bar's length hold while the numbers change
  const at80 = [0, 1, 1000, 2 ** 30, 2 ** 34].map((n) => renderProgress({ dataBytes: n, holeBytes: 0 }, 2 ** 34, 3, 80, 'upload'));
  assert.equal(new Set(at80.map((l) => /\[[#.]+\]/.exec(l)![0].length)).size, 1, at80.join('\n'));
  assert.match(renderProgress({ dataBytes: 0, holeBytes: 0 }, 1000, 0, 100, 'download'), /^download {3}0% \[\.{10,}\] 0 B \/ 1000 B {2}holes 0 B {2}0 B\/s {2}ETA --:--$/);
  assert.equal(renderProgress({ dataBytes: 10, holeBytes: 0 }, 0, 1, 100, 'upload'), 'upload 10 B  holes 0 B  10 B/s', 'unknown total: no bar');
  assert.match(renderProgress({ dataBytes: 1000, holeBytes: 0 }, 1000, 1, 100, 'upload'), /^upload 100% \[#+\] .* ETA 0:00$/);
  assert.equal(summaryLine('upload', { dataBytes: 1.08 * 1024 ** 3, holeBytes: 14.9 * 1024 ** 3 }, 0.52),
    'uploaded 1.08 GiB data + 14.9 GiB holes in 0.52 s (2.08 GiB/s)\n');
  assert.equal(summaryLine('download', { dataBytes: 0, holeBytes: 0 }, 0), 'downloaded 0 B data + 0 B holes in 0.00 s (0 B/s)\n');
  assert.deepEqual([humanBytes(0), humanBytes(1023), humanBytes(1024), humanBytes(1536), humanBytes(10 * 1024 * 1024), humanBytes(1023.9 * 1024)],
    ['0 B', '1023 B', '1.00 KiB', '1.50 KiB', '10.0 MiB', '1.00 MiB']);
  assert.deepEqual([humanDuration(0.523), humanDuration(12.34), humanDuration(65), clock(3725)], ['0.52 s', '12.3 s', '1:05', '1:02:05']);
});

test('progress bar: at most one redraw per interval, erased at the end, on a fake TTY', () => {
  let now = 0;
  const writes: string[] = [];
  const bar = new ProgressBar({ columns: 80, write: (s) => void writes.push(s) }, { verb: 'upload', total: 1000, now: () => now, interval: 100 });
  bar.update({ dataBytes: 100, holeBytes: 0 });
  now = 50;
  bar.update({ dataBytes: 200, holeBytes: 0 });
  now = 99;
  bar.update({ dataBytes: 300, holeBytes: 0 });
  now = 100;
  bar.update({ dataBytes: 400, holeBytes: 100 });
  now = 1000;
  bar.update({ dataBytes: 1000, holeBytes: 0 });
  assert.equal(writes.length, 3, 'draws at t=0, 100 and 1000 only');
  assert.ok(writes.every((w) => w.startsWith('\r') && w.endsWith('\x1b[K') && !w.includes('\n')));
  assert.match(writes[1]!, /^\rupload {2}50% \[/);
  assert.match(writes[2]!, /^\rupload 100% \[/);
  bar.clear();
  assert.equal(writes.at(-1), '\r\x1b[K');
  bar.clear();
  assert.equal(writes.length, 4, 'clearing twice writes once');
});

test('progress bar: an update that came too soon is drawn once the interval is over', async () => {
  let now = 0;
  const writes: string[] = [];
  const bar = new ProgressBar({ columns: 80, write: (s) => void writes.push(s) }, { verb: 'download', total: 1000, now: () => now, interval: 30 });
  bar.update({ dataBytes: 100, holeBytes: 0 });
  now = 10;
  bar.update({ dataBytes: 700, holeBytes: 0 });
  assert.equal(writes.length, 1);
  await new Promise((r) => setTimeout(r, 80));
  assert.equal(writes.length, 2, 'the last counts are drawn although no update followed');
  assert.match(writes[1]!, /^\rdownload {2}70% /);
  bar.update({ dataBytes: 800, holeBytes: 0 });
  bar.clear();
  await new Promise((r) => setTimeout(r, 80));
  assert.equal(writes.at(-1), '\r\x1b[K', 'nothing is drawn after the line was erased');
});

test('errno texts as glibc strerror', () => {
  assert.equal(strerror(Object.assign(new Error('x'), { code: 'ENOSPC' })), 'No space left on device');
  assert.equal(strerror(new Error('wrapped', { cause: Object.assign(new Error('y'), { code: 'EISDIR' }) })), 'Is a directory');
  assert.equal(strerror(new Error('plain')), 'plain');
});

/** In-process runs that need no server. */
async function runLocal(argv: string[]) {
  let out = '';
  let err = '';
  const code = await run(argv, { out: (s) => void (out += s), err: (s) => void (err += s) });
  return { code, out, err };
}

test('run(): exit status, stdout and stderr without a server', async () => {
  assert.deepEqual(await runLocal(['-v']), { code: 0, out: '9.0.0\n', err: '' });
  assert.deepEqual(await runLocal(['pool-info']), { code: 1, out: '', err: "error: command 'pool-info' requires <pool> option\n" });
  assert.deepEqual(await runLocal(['']), { code: 1, out: '', err: '' });
  assert.deepEqual(await runLocal([' ']), { code: 0, out: '', err: '' });
  const help = await runLocal(['help', 'vol-wipe']);
  assert.equal(help.code, 0);
  assert.ok(help.out.startsWith('  NAME\n    vol-wipe - wipe a vol\n'));
  assert.ok(help.out.endsWith('perform selected wiping algorithm\n\n\n'), 'help, then the blank line after each command');
  const quiet = await runLocal(['-q', 'help', 'vol-wipe']);
  assert.ok(quiet.out.endsWith('algorithm\n\n'), '-q: no blank line');
  const all = await runLocal(['help']);
  assert.ok(all.out.startsWith('Grouped commands:\n\n Host and Hypervisor (help keyword \'host\'):\n'));
  assert.deepEqual(await runLocal(['help', 'nosuch']), { code: 1, out: '\n', err: "error: command or command group 'nosuch' doesn't exist\n" });
  const extra = await runLocal(['help', 'volume', ';', 'x']);
  assert.equal(extra.code, 0, 'argv mode has no separators, and help ignores extra data');
  assert.ok(extra.out.startsWith(" Storage Volume (help keyword 'volume'):\n"));
  const g = await runLocal(['help pool; quit; nosuch-not-parsed']);
  assert.equal(g.code, 1, 'the whole string is parsed first');
  const q = await runLocal(['help pool; quit; help uri']);
  assert.equal(q.code, 0);
  assert.ok(!q.out.includes('uri - '), 'quit ends the run');
  const none = await runLocal([]);
  assert.equal(none.code, 1);
  // -l: a log file that cannot be opened ends the run, as virsh
  assert.deepEqual(await runLocal(['-l', '/nonexistent-dir/x.log', 'help', 'uri']), { code: 1, out: '', err: 'error: failed to open the log file. check the log file path\n' });
});

test('-d and -l: the parse lines at INFO, errors logged; VIRSH_DEBUG and VIRSH_LOG_FILE', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'sv-log-'));
  try {
    const log = path.join(dir, 'a.log');
    const r = await runLocal(['-d', '1', '-l', log, 'help --command vol-wipe; help nosuch']);
    assert.equal(r.code, 1);
    assert.match(r.out, /^commands: "help --command vol-wipe; help nosuch"\nhelp: command\(optdata\): vol-wipe\nhelp: command\(optdata\): nosuch\n/, 'on stdout, as virsh');
    assert.equal(r.err, "error: command or command group 'nosuch' doesn't exist\n");
    const lines = (await fs.readFile(log, 'utf8')).split('\n');
    const stamp = String.raw`^\[\d{4}\.\d\d\.\d\d \d\d:\d\d:\d\d sparsevirt ${process.pid}\] `;
    assert.match(lines[0]!, new RegExp(`${stamp}INFO commands: "help --command vol-wipe; help nosuch"$`));
    assert.match(lines[1]!, new RegExp(`${stamp}INFO help: command\\(optdata\\): vol-wipe$`));
    assert.match(lines[3]!, new RegExp(`${stamp}ERROR command or command group 'nosuch' doesn't exist$`));
    assert.equal(lines.length, 5);
    // the default level (errors): nothing on stderr but the error; the log gets it appended
    const quiet = await runLocal(['-l', log, 'help', 'nosuch']);
    assert.equal(quiet.err, "error: command or command group 'nosuch' doesn't exist\n");
    assert.equal((await fs.readFile(log, 'utf8')).split('\n').length, 6);
    // the environment, when no option says otherwise
    process.env.VIRSH_DEBUG = '0';
    process.env.VIRSH_LOG_FILE = path.join(dir, 'env.log');
    try {
      const e = await runLocal(['help', 'uri']);
      assert.match(e.out, /^help: command\(optdata\): uri\n {2}NAME\n/);
      assert.match(await fs.readFile(path.join(dir, 'env.log'), 'utf8'), /\] INFO help: command\(optdata\): uri\n$/);
      process.env.VIRSH_DEBUG = 'x';
      assert.equal((await runLocal(['-l', log, 'help', 'uri'])).err, 'error: VIRSH_DEBUG not set with a valid numeric value\n'.repeat(2));
      assert.equal((await runLocal(['-d', '4', 'help', 'uri'])).err, '', '-d wins');
    } finally {
      delete process.env.VIRSH_DEBUG;
      delete process.env.VIRSH_LOG_FILE;
    }
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

test('exit statuses of signals; the URI socket= with no path', () => {
  assert.deepEqual(INTERRUPTS.map(signalStatus), [130, 143, 129]);
  assert.deepEqual([130, 143, 129, 1, 0, 137].map(statusSignal), ['SIGINT', 'SIGTERM', 'SIGHUP', null, null, null]);
  assert.equal(parseUri('qemu+unix:///system?socket=').socket, '', 'the empty path, not the default socket');
  assert.equal(parseUri('qemu:///system?socket=').socket, '');
  assert.equal(parseUri('qemu:///system').socket, '/var/run/libvirt/libvirt-sock');
  assert.equal(parseUri('qemu+unix:///system?socket=/x').socket, '/x');
});

test('shell completion: commands, options not given yet, help topics, pool and volume names', async () => {
  const none = null;
  assert.deepEqual(await complete('vol-d', none), [['vol-delete', 'vol-download', 'vol-dumpxml'], 'vol-d']);
  assert.deepEqual(await complete('pool-li', none), [['pool-list '], 'pool-li'], 'one candidate: completed with a blank');
  assert.deepEqual(await complete('uri; vol-up', none), [['vol-upload '], 'vol-up'], 'a new command after ;');
  assert.deepEqual(await complete('vol-download --sp', none), [['--sparse', '--sparse-fallback'], '--sp']);
  assert.deepEqual(await complete('vol-info --pool p --', none), [['--bytes', '--json', '--physical', '--vol'], '--']);
  assert.deepEqual(await complete('help vol-i', none), [['vol-info '], 'vol-i']);
  assert.deepEqual(await complete('nosuch --', none), [[], '--']);
  const source = { poolNames: async () => ['default', 'dev', 'pty'], volNames: async (p: string) => (p === 'dev' ? ['a.img', 'b.img'] : []) };
  assert.deepEqual(await complete('vol-upload --pool d', source), [['default', 'dev'], 'd']);
  assert.deepEqual(await complete('vol-list p', source), [['pty '], 'p'], 'a pool by position');
  assert.deepEqual(await complete('vol-download --pool dev ', source), [['a.img', 'b.img', '--file', '--json', '--length', '--offset', '--sparse', '--sparse-fallback', '--verbose', '--vol'], '']);
  assert.deepEqual(await complete('vol-info --pool dev b', source), [['b.img '], 'b']);
  const failing = { poolNames: async () => { throw new Error('down'); }, volNames: async () => [] };
  assert.deepEqual(await complete('vol-list ', failing), [['--details', '--json', '--pool'], ''], 'the server failing: options only');
});

test('XML: parse, dump like libxml2, XPath subset', async () => {
  const { evalXPath, parseXml, renderNodes, serialize } = await import('../src/cli/xml.js');
  const xml = "<pool type='dir'>\n  <name>anchor</name>\n  <capacity unit='bytes'>270553174016</capacity>\n  <source>\n  </source>\n" +
    "  <target>\n    <path>/srv/vpools</path>\n    <permissions>\n      <mode>0755</mode>\n    </permissions>\n  </target>\n</pool>\n";
  const root = parseXml(xml);
  assert.equal(serialize(root),
    '<pool type="dir">\n  <name>anchor</name>\n  <capacity unit="bytes">270553174016</capacity>\n  <source>\n  </source>\n' +
    '  <target>\n    <path>/srv/vpools</path>\n    <permissions>\n      <mode>0755</mode>\n    </permissions>\n  </target>\n</pool>');
  const nodes = (x: string) => {
    const r = evalXPath(xml, x);
    assert.ok(r.ok, x);
    return r.ok ? r.nodes : [];
  };
  assert.equal(renderNodes(nodes('//target'), false), '<target>\n  <path>/srv/vpools</path>\n  <permissions>\n    <mode>0755</mode>\n  </permissions>\n</target>\n');
  assert.equal(renderNodes(nodes('//@unit'), false), ' unit="bytes"\n');
  assert.equal(renderNodes(nodes('//@unit'), true), '<nodes unit="bytes"/>\n');
  assert.equal(renderNodes(nodes('/pool/name/text()'), false), 'anchor\n');
  assert.equal(renderNodes(nodes('//name | //path'), true), '<nodes>\n  <name>anchor</name>\n  <path>/srv/vpools</path>\n</nodes>\n');
  assert.equal(renderNodes(nodes('//nothing'), true), '<nodes/>\n');
  assert.equal(renderNodes(nodes('target/*[2]/mode'), false), '<mode>0755</mode>\n', 'relative to the root element');
  assert.equal(renderNodes(nodes('//capacity[. > 1000]/@unit/..'), false), '<capacity unit="bytes">270553174016</capacity>\n');
  assert.deepEqual(evalXPath(xml, 'count(//*)'), { ok: false, kind: 'not-node-set' });
  assert.deepEqual(evalXPath(xml, '///'), { ok: false, kind: 'syntax' });
  assert.deepEqual(evalXPath(xml, '//a | "x"'), { ok: false, kind: 'type' });
  assert.equal(serialize(parseXml('<a x="1&amp;&lt;"><b>t&gt;&amp;</b></a>')), '<a x="1&amp;&lt;">\n  <b>t&gt;&amp;</b>\n</a>');
});
