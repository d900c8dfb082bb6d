/* global process */
// Finds the LibTorch that the addon builds against, in this order:
//   1. LIBTORCH: an official LibTorch folder (CPU or CUDA build), with include/ and lib/. When set,
//      it is the only candidate: a folder that is not a LibTorch is reported, never passed over.
//   2. A Python torch: the LibTorch inside a pip (or conda) torch install, as the interpreter named
//      by PYTHON (default python3) imports it; its folder holds include/ and lib/. An install
//      without headers (Debian's python3-torch links them from libtorch-dev, so they are missing
//      without it), or no python3, or no torch, passes on to the next candidate.
//   3. Debian/Ubuntu's libtorch-dev (headers in /usr/include, libraries in the multiarch folder).
// findLibTorch() returns either { label, inc, lib, version, cuda, abi0, std, skipped } or
// { reason, skipped }; `skipped` lists why earlier candidates were passed over.
import { existsSync, readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import path from 'node:path';

// prints what the build needs to know of the torch that this Python imports, as one JSON line
const PYTHON_PROBE = [
  'import json, os, torch',
  'print(json.dumps({"dir": os.path.dirname(torch.__file__), "cxx11abi": bool(torch.compiled_with_cxx11_abi())}))',
].join('\n');

/** `major.minor.patch` from a LibTorch include folder's torch/version.h, or null. */
export function headerVersion(inc) {
  const files = [
    path.join(inc, 'torch', 'csrc', 'api', 'include', 'torch', 'version.h'),
    path.join(inc, 'torch', 'headeronly', 'version.h'), // where later releases define it
  ];
  const text = files
    .filter((f) => existsSync(f))
    .map((f) => readFileSync(f, 'utf8'))
    .join('\n');
  const part = (name) => text.match(new RegExp(`#define TORCH_VERSION_${name} (\\d+)`))?.[1];
  const [major, minor, patch] = [part('MAJOR'), part('MINOR'), part('PATCH')];
  return major && minor ? `${major}.${minor}.${patch ?? 0}` : null;
}

// what LibTorch's CMake config says of the ABI and C++ standard its headers expect
function cmakeFacts(configs) {
  const file = configs.find((f) => existsSync(f));
  const text = file ? readFileSync(file, 'utf8') : '';
  return { abi0: /_GLIBCXX_USE_CXX11_ABI=0/.test(text), std: /CXX_STANDARD 20/.test(text) ? 20 : 17 };
}

// a folder laid out as LibTorch (include/, lib/): the facts, or what is missing; `label` names it
function fromFolder(dir, label) {
  const inc = path.join(dir, 'include');
  const lib = path.join(dir, 'lib');
  if (!existsSync(path.join(inc, 'ATen', 'ATen.h')))
    return { reason: `${label}: expected include/ATen/ATen.h, found none` };
  if (!existsSync(path.join(lib, 'libtorch_cpu.so')) && !existsSync(path.join(lib, 'libtorch.so')))
    return { reason: `${label}: expected lib/libtorch_cpu.so or lib/libtorch.so, found neither` };
  const facts = cmakeFacts([path.join(dir, 'share', 'cmake', 'Torch', 'TorchConfig.cmake')]);
  return {
    label,
    inc: [inc, path.join(inc, 'torch', 'csrc', 'api', 'include')],
    lib,
    version: headerVersion(inc),
    cuda: existsSync(path.join(lib, 'libtorch_cuda.so')),
    ...facts,
  };
}

function fromPython(python) {
  const r = spawnSync(python, ['-c', PYTHON_PROBE], { encoding: 'utf8', timeout: 120_000 });
  if (r.error)
    return { reason: `no Python torch: cannot run ${python} (${r.error.code ?? r.error.message})` };
  if (r.status !== 0) {
    const last = (r.stderr ?? '').trim().split('\n').pop() || `exit status ${r.status}`;
    return { reason: `no Python torch: ${python} cannot import torch (${last})` };
  }
  let probe;
  try {
    probe = JSON.parse((r.stdout ?? '').trim().split('\n').pop());
  } catch {
    probe = null;
  }
  if (typeof probe?.dir !== 'string')
    return {
      reason: `no Python torch: expected ${python} to print its torch's folder as JSON, got ${JSON.stringify(r.stdout)}`,
    };
  const t = fromFolder(probe.dir, `the Python torch of ${python} at ${probe.dir}`);
  return t.lib ? { ...t, abi0: probe.cxx11abi === false } : t;
}

function fromSystem() {
  if (!existsSync('/usr/include/ATen/ATen.h'))
    return { reason: 'no libtorch-dev: expected /usr/include/ATen/ATen.h, found none' };
  const dirs = [
    '/usr/lib/x86_64-linux-gnu',
    '/usr/lib/aarch64-linux-gnu',
    '/usr/lib64',
    '/usr/lib',
    '/usr/local/lib',
  ];
  const lib = dirs.find((d) => existsSync(path.join(d, 'libtorch_cpu.so')));
  if (!lib) return { reason: `libtorch-dev headers found, but no libtorch_cpu.so in ${dirs.join(', ')}` };
  return {
    label: `libtorch-dev (${lib})`,
    inc: ['/usr/include', '/usr/include/torch/csrc/api/include'],
    lib,
    version: headerVersion('/usr/include'),
    cuda: existsSync(path.join(lib, 'libtorch_cuda.so')),
    ...cmakeFacts([path.join(lib, 'cmake', 'Torch', 'TorchConfig.cmake')]),
  };
}

/** The LibTorch to build against (see the head of this file); `env` defaults to process.env. */
export function findLibTorch(env = process.env) {
  if (env.LIBTORCH)
    return { ...fromFolder(path.resolve(env.LIBTORCH), `LIBTORCH=${env.LIBTORCH}`), skipped: [] };
  const skipped = [];
  for (const find of [() => fromPython(env.PYTHON || 'python3'), fromSystem]) {
    const t = find();
    if (t.lib) return { ...t, skipped };
    skipped.push(t.reason);
  }
  return { reason: 'LibTorch not found (set LIBTORCH, install a Python torch or libtorch-dev)', skipped };
}

/** One line naming the chosen LibTorch: where it came from, its version and device support. */
export function describe(t) {
  return `LibTorch ${t.version ?? '(version unknown)'} from ${t.label} (${t.cuda ? 'CUDA' : 'CPU only'})`;
}
