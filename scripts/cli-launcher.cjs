#!/usr/bin/env -S -u NODE_EXTRA_CA_CERTS node
'use strict';
// `sparsevirt` (copied to dist/bin/sparsevirt.cjs by scripts/bundle.mjs). It runs the bundled CLI,
// sparsevirt-main.cjs, from the V8 code cache the build made for it by a training run, so that a
// start does not parse and compile the bundle again: 8-11 ms of a ~55 ms all-hole download. A cache
// that does not fit this Node (another version, other flags) is rejected by V8, and the bundle
// is then compiled as usual.
const fs = require('node:fs');
const path = require('node:path');
const vm = require('node:vm');
const { wrap } = require('node:module');

const file = path.join(__dirname, 'sparsevirt-main.cjs');
// build time only: where to write the cache this run makes (scripts/bundle.mjs)
const out = process.env.SPARSEVIRT_CODE_CACHE_OUT;
let cachedData;
if (!out) {
  try {
    cachedData = fs.readFileSync(`${file}.cache`);
  } catch {
    // no cache: compile
  }
}
const script = new vm.Script(wrap(fs.readFileSync(file, 'utf8')), { filename: file, cachedData });
if (out) process.once('exit', () => fs.writeFileSync(out, script.createCachedData()));
const mod = { exports: {} };
script.runInThisContext()(mod.exports, require, mod, file, __dirname);
