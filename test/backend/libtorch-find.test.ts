import { chmodSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { describe as describeTorch, findLibTorch, headerVersion } from '../../scripts/libtorch.mjs';

// The addon's build chooses LibTorch by LIBTORCH, then a Python torch, then libtorch-dev. Fake
// LibTorch folders and a fake Python (a shell script printing what the probe would) stand in here.

const tmp = mkdtempSync(path.join(os.tmpdir(), 'xt-libtorch-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function fakeLibTorch(
  dir: string,
  opts: { major?: number; minor?: number; cuda?: boolean; abi0?: boolean } = {},
) {
  const api = path.join(dir, 'include', 'torch', 'csrc', 'api', 'include', 'torch');
  mkdirSync(path.join(dir, 'include', 'ATen'), { recursive: true });
  mkdirSync(api, { recursive: true });
  mkdirSync(path.join(dir, 'lib'), { recursive: true });
  writeFileSync(path.join(dir, 'include', 'ATen', 'ATen.h'), '');
  writeFileSync(
    path.join(api, 'version.h'),
    `#define TORCH_VERSION_MAJOR ${opts.major ?? 2}\n#define TORCH_VERSION_MINOR ${opts.minor ?? 6}\n#define TORCH_VERSION_PATCH 1\n`,
  );
  for (const lib of [
    'libtorch.so',
    'libtorch_cpu.so',
    'libc10.so',
    ...(opts.cuda ? ['libtorch_cuda.so'] : []),
  ])
    writeFileSync(path.join(dir, 'lib', lib), '');
  if (opts.abi0) {
    mkdirSync(path.join(dir, 'share', 'cmake', 'Torch'), { recursive: true });
    writeFileSync(
      path.join(dir, 'share', 'cmake', 'Torch', 'TorchConfig.cmake'),
      'set(TORCH_CXX_FLAGS "-D_GLIBCXX_USE_CXX11_ABI=0")\n',
    );
  }
  return dir;
}

// a Python whose torch lives in `dir` (or that cannot import torch when dir is null)
function fakePython(name: string, dir: string | null, cxx11abi = true) {
  const file = path.join(tmp, name);
  const body =
    dir === null
      ? 'echo "ModuleNotFoundError: No module named \'torch\'" >&2; exit 1'
      : `echo '{"dir": "${dir}", "version": "2.5.0+cu124", "cxx11abi": ${cxx11abi}, "cuda": "12.4"}'`;
  writeFileSync(file, `#!/bin/sh\n${body}\n`);
  chmodSync(file, 0o755);
  return file;
}

describe('finding LibTorch for the addon', () => {
  it('takes LIBTORCH first, with its version, CUDA libraries and ABI', () => {
    const dir = fakeLibTorch(path.join(tmp, 'official'), { cuda: true, abi0: true, minor: 5 });
    const t = findLibTorch({ LIBTORCH: dir, PYTHON: fakePython('py-unused', null) });
    expect(t.lib).toBe(path.join(dir, 'lib'));
    expect(t.inc).toEqual([
      path.join(dir, 'include'),
      path.join(dir, 'include', 'torch', 'csrc', 'api', 'include'),
    ]);
    expect(t.cuda).toBe(true);
    expect(t.abi0).toBe(true);
    expect(describeTorch(t)).toBe(`LibTorch 2.5.1 from LIBTORCH=${dir} (CUDA)`);
  });

  it('names what a LIBTORCH folder lacks, and does not pass it over', () => {
    const t = findLibTorch({ LIBTORCH: path.join(tmp, 'nowhere') });
    expect(t.lib).toBeUndefined();
    expect(t.reason).toBe(`LIBTORCH=${path.join(tmp, 'nowhere')}: expected include/ATen/ATen.h, found none`);
  });

  it('takes a Python torch’s LibTorch next, with the ABI the interpreter reports', () => {
    const dir = fakeLibTorch(path.join(tmp, 'site-packages', 'torch'));
    const python = fakePython('py-torch', dir, false);
    const t = findLibTorch({ PYTHON: python });
    expect(t.lib).toBe(path.join(dir, 'lib'));
    expect(t.abi0).toBe(true);
    expect(t.cuda).toBe(false);
    expect(t.skipped).toEqual([]);
    expect(describeTorch(t)).toBe(`LibTorch 2.6.1 from the Python torch of ${python} at ${dir} (CPU only)`);
  });

  it('passes over a Python torch without headers (links into a missing libtorch-dev) and says why', () => {
    const dir = path.join(tmp, 'dist-packages', 'torch');
    mkdirSync(path.join(dir, 'include'), { recursive: true });
    symlinkSync(path.join(tmp, 'missing-usr-include', 'ATen'), path.join(dir, 'include', 'ATen'));
    const t = findLibTorch({ PYTHON: fakePython('py-debian', dir) });
    expect(t.skipped[0]).toContain(`at ${dir}: expected include/ATen/ATen.h, found none`);
  });

  it('passes over a Python without torch, and one that does not run', () => {
    const none = findLibTorch({ PYTHON: fakePython('py-none', null) });
    expect(none.skipped[0]).toMatch(/cannot import torch \(ModuleNotFoundError: No module named 'torch'\)/);
    const missing = findLibTorch({ PYTHON: path.join(tmp, 'no-such-python') });
    expect(missing.skipped[0]).toMatch(/^no Python torch: cannot run .*no-such-python \(ENOENT\)$/);
  });

  it('reads the version from either of the headers that define it', () => {
    const dir = path.join(tmp, 'headeronly');
    mkdirSync(path.join(dir, 'torch', 'headeronly'), { recursive: true });
    writeFileSync(
      path.join(dir, 'torch', 'headeronly', 'version.h'),
      '#define TORCH_VERSION_MAJOR 2\n#define TORCH_VERSION_MINOR 13\n#define TORCH_VERSION_PATCH 0\n',
    );
    expect(headerVersion(dir)).toBe('2.13.0');
    expect(headerVersion(path.join(tmp, 'nowhere'))).toBeNull();
  });
});
