#!/usr/bin/env node
/* global process, console */
// Builds the LibTorch addon (build/Release/xt_torch.node) with node-gyp.
// LibTorch is found through LIBTORCH (an official LibTorch folder, CPU or CUDA) or the system's
// libtorch-dev. Without LibTorch (or when the build fails) it prints one line and exits 0, so that
// `npm install` succeeds and the runtime falls back to another backend.
// `--print include|libs|defines` is used by binding.gyp.
import { existsSync, readFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

function findTorch() {
  const env = process.env.LIBTORCH;
  if (env) {
    const inc = path.join(env, 'include');
    const lib = path.join(env, 'lib');
    if (!existsSync(path.join(inc, 'ATen', 'ATen.h')))
      return { reason: `LIBTORCH=${env} has no include/ATen/ATen.h` };
    if (!existsSync(path.join(lib, 'libtorch.so')) && !existsSync(path.join(lib, 'libtorch_cpu.so')))
      return { reason: `LIBTORCH=${env} has no lib/libtorch.so` };
    let abi0 = false;
    const cfg = path.join(env, 'share', 'cmake', 'Torch', 'TorchConfig.cmake');
    if (existsSync(cfg)) abi0 = /_GLIBCXX_USE_CXX11_ABI=0/.test(readFileSync(cfg, 'utf8'));
    return { inc: [inc, path.join(inc, 'torch', 'csrc', 'api', 'include')], lib, abi0 };
  }
  if (!existsSync('/usr/include/ATen/ATen.h'))
    return { reason: 'LibTorch not found (set LIBTORCH or install libtorch-dev)' };
  const dirs = [
    '/usr/lib/x86_64-linux-gnu',
    '/usr/lib/aarch64-linux-gnu',
    '/usr/lib64',
    '/usr/lib',
    '/usr/local/lib',
  ];
  const lib = dirs.find((d) => existsSync(path.join(d, 'libtorch_cpu.so')));
  if (!lib) return { reason: 'LibTorch headers found but no libtorch_cpu.so' };
  return { inc: ['/usr/include', '/usr/include/torch/csrc/api/include'], lib, abi0: false };
}

const arg = process.argv.indexOf('--print');
if (arg >= 0) {
  const what = process.argv[arg + 1];
  const t = findTorch();
  if (!t.lib) process.exit(0);
  const cuda = existsSync(path.join(t.lib, 'libtorch_cuda.so'));
  if (what === 'include') console.log(t.inc.join(' '));
  else if (what === 'libs') {
    const libs = ['-ltorch', '-ltorch_cpu', '-lc10', '-ldl'];
    if (cuda) libs.push('-ltorch_cuda', '-lc10_cuda');
    console.log(
      [`-L${t.lib}`, `-Wl,-rpath,${t.lib}`, '-Wl,--no-as-needed', ...libs, '-Wl,--as-needed'].join(' '),
    );
  } else if (what === 'defines') {
    const d = [];
    if (t.abi0) d.push('_GLIBCXX_USE_CXX11_ABI=0');
    if (cuda) d.push('XT_HAS_CUDA=1');
    console.log(d.join(' '));
  }
  process.exit(0);
}

function skip(why) {
  console.log(`xt_torch: native LibTorch addon skipped: ${why}; the runtime falls back to another backend`);
  process.exit(0);
}

if (process.env.XT_SKIP_NATIVE) skip('XT_SKIP_NATIVE is set');
const t = findTorch();
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
console.log(`xt_torch: building the LibTorch addon against ${t.lib} (takes a few minutes)`);
const r = spawnSync(process.execPath, args, {
  cwd: root,
  stdio: verbose ? 'inherit' : 'pipe',
  encoding: 'utf8',
});
if (r.status !== 0) {
  const log = path.join(root, 'build', 'xt_torch-build.log');
  mkdirSync(path.dirname(log), { recursive: true });
  writeFileSync(log, `${r.stdout ?? ''}\n${r.stderr ?? ''}`);
  skip(`build failed (log: ${path.relative(root, log)})`);
}
console.log('xt_torch: built build/Release/xt_torch.node');
