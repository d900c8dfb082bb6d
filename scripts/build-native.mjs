#!/usr/bin/env node
/* global process, console */
// Builds the LibTorch addon (build/Release/xt_torch.node) with node-gyp, against the LibTorch that
// scripts/libtorch.mjs finds: LIBTORCH (an official LibTorch folder, CPU or CUDA), else a Python
// torch's LibTorch (PYTHON, default python3), else the system's libtorch-dev. It logs which one.
// Without LibTorch (or when the build fails) it prints one line and exits 0, so that `npm install`
// succeeds and the runtime falls back to another backend.
// `--print include|libs|defines|cflags` is used by binding.gyp.
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, findLibTorch } from './libtorch.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
// the build below hands its choice to binding.gyp's --print calls, so that they need not ask
// Python again and cannot choose differently
const FOUND = 'XT_LIBTORCH_FOUND';

const arg = process.argv.indexOf('--print');
if (arg >= 0) {
  const what = process.argv[arg + 1];
  const t = process.env[FOUND] ? JSON.parse(process.env[FOUND]) : findLibTorch();
  if (!t.lib) process.exit(0);
  if (what === 'include') console.log(t.inc.join(' '));
  else if (what === 'libs') {
    const libs = ['-ltorch', '-ltorch_cpu', '-lc10', '-ldl'];
    if (t.cuda) {
      libs.push('-ltorch_cuda');
      if (existsSync(path.join(t.lib, 'libc10_cuda.so'))) libs.push('-lc10_cuda');
    }
    console.log(
      [`-L${t.lib}`, `-Wl,-rpath,${t.lib}`, '-Wl,--no-as-needed', ...libs, '-Wl,--as-needed'].join(' '),
    );
  } else if (what === 'defines') {
    const d = [];
    if (t.abi0) d.push('_GLIBCXX_USE_CXX11_ABI=0');
    if (t.cuda) d.push('XT_HAS_CUDA=1');
    console.log(d.join(' '));
  } else if (what === 'cflags') {
    console.log(`-std=c++${t.std}`);
  } else {
    console.error(`build-native: --print expects include, libs, defines or cflags, got ${what}`);
    process.exit(1);
  }
  process.exit(0);
}

function skip(why) {
  console.log(`xt_torch: native LibTorch addon skipped: ${why}; the runtime falls back to another backend`);
  process.exit(0);
}

if (process.env.XT_SKIP_NATIVE) skip('XT_SKIP_NATIVE is set');
const t = findLibTorch();
for (const why of t.skipped) console.log(`xt_torch: ${why}`);
if (!t.lib) skip(t.reason);

const local = path.join(root, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
const gyp = existsSync(local) ? local : process.env.npm_config_node_gyp;
if (!gyp || !existsSync(gyp)) skip('node-gyp not found');
const nodedir =
  process.env.npm_config_nodedir ||
  (existsSync(path.join(path.dirname(process.execPath), '..', 'include', 'node', 'node_api.h'))
    ? path.resolve(path.dirname(process.execPath), '..')
    : '');
const args = [gyp, 'rebuild', `--jobs=${process.env.JOBS || 'max'}`];
if (nodedir) args.push(`--nodedir=${nodedir}`);
const verbose = process.argv.includes('--verbose');
console.log(`xt_torch: building the LibTorch addon against ${describe(t)}; this takes a few minutes`);
const r = spawnSync(process.execPath, args, {
  cwd: root,
  stdio: verbose ? 'inherit' : 'pipe',
  encoding: 'utf8',
  env: { ...process.env, [FOUND]: JSON.stringify(t) },
});
if (r.status !== 0) {
  const log = path.join(root, 'build', 'xt_torch-build.log');
  mkdirSync(path.dirname(log), { recursive: true });
  writeFileSync(log, `${r.stdout ?? ''}\n${r.stderr ?? ''}`);
  skip(`build failed (log: ${path.relative(root, log)})`);
}
console.log('xt_torch: built build/Release/xt_torch.node');
