/**
 * The man pages the build makes (dist/man): groff renders them without a warning, man(1) shows
 * them, and they cover every command, option and configuration key --help and the loader know.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { test, type TestContext } from 'node:test';
import { fileURLToPath } from 'node:url';
import { GROUPS } from '../src/cli/commands.js';
import { globalOptions } from '../src/cli/completion-scripts.js';
import { CONFIG_KEYS } from '../src/daemon/config.js';
import { DAEMON_OPTIONS, helpText } from '../src/daemon/options.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const PAGES = ['man1/sparsevirt.1', 'man8/sparsevirtd.8', 'man5/sparsevirtd.conf.5'].map((p) => path.join(ROOT, 'dist/man', p));

function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

function need(t: TestContext, cmd: string): boolean {
  if (have(cmd)) return true;
  if (process.env.CI) assert.fail(`missing ${cmd} (scripts/setup-libvirt.sh installs groff-base)`);
  t.skip(`no ${cmd}`);
  return false;
}

/** The page as text (groff), with its warnings. */
function render(page: string): { text: string; warnings: string; status: number | null } {
  const r = spawnSync('groff', ['-man', '-Tutf8', '-ww', '-rLL=100n', page], { encoding: 'utf8', env: { ...process.env, GROFF_NO_SGR: '1' } });
  return { text: r.stdout.replace(/.\x08/g, ''), warnings: r.stderr, status: r.status };
}

test('groff renders each page without a warning; man -l shows it', (t) => {
  if (!need(t, 'groff')) return;
  for (const page of PAGES) {
    const r = render(page);
    assert.equal(r.status, 0, page);
    assert.equal(r.warnings, '', `${path.basename(page)}: ${r.warnings}`);
    assert.match(r.text, /^NAME\n/m);
    assert.doesNotMatch(r.text, /\*\*|__|\\f/, 'no markup left over');
  }
  if (!have('man')) return t.diagnostic('no man(1): groff alone checked');
  for (const page of PAGES) {
    const m = spawnSync('man', ['--warnings', '-l', page], { encoding: 'utf8', env: { ...process.env, MANWIDTH: '100', MAN_KEEP_FORMATTING: '0', PAGER: 'cat' } });
    assert.equal(m.status, 0, m.stderr);
    assert.equal(m.stderr, '', m.stderr);
    assert.match(m.stdout.replace(/.\x08/g, ''), /^NAME$/m);
  }
});

test('the pages cover every command, option and key; --help lists every daemon option', (t) => {
  if (!need(t, 'groff')) return;
  const [cli, daemon, conf] = PAGES.map((p) => render(p).text.replace(/\u2010|\u2011/g, '-').replace(/-\n\s+/g, '-'));
  for (const g of GROUPS) for (const c of g.commands) assert.match(cli!, new RegExp(`^ {7}${c.name}\\b`, 'm'), c.name);
  for (const o of globalOptions()) assert.ok(cli!.includes((o.long ?? o.short)!), o.long ?? o.short);
  for (const o of DAEMON_OPTIONS) {
    assert.ok(daemon!.includes(o.usage.split(' ')[0]!), o.usage);
    assert.ok(helpText().includes(o.usage), `--help: ${o.usage}`);
  }
  for (const k of CONFIG_KEYS) {
    assert.match(conf!, new RegExp(`^ {7}${k.name} \\(`, 'm'), k.name);
    assert.ok(daemon!.includes('SIGHUP'));
  }
  assert.match(conf!, /FILE:LINE: reason/);
  assert.match(daemon!, /sparsevirtd-ro\.socket/);
});
