/**
 * Registers the LibTorch-backed TF.js backend when the native addon is built.
 * (The kernels live in the addon and in this folder.)
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export type RegisterResult = { ok: true; device: string; threads: number } | { ok: false; reason: string };

/** Where the addon is built: build/Release/xt_torch.node at the package root. */
export function addonPath(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    if (existsSync(path.join(dir, 'package.json'))) break;
    dir = path.dirname(dir);
  }
  return path.join(dir, 'build', 'Release', 'xt_torch.node');
}

export function registerTorchBackend(): RegisterResult {
  const p = addonPath();
  if (!existsSync(p))
    return { ok: false, reason: `torch backend unavailable: native addon not built (${p} missing)` };
  try {
    createRequire(import.meta.url)(p);
  } catch (e) {
    return { ok: false, reason: `torch backend unavailable: ${(e as Error).message}` };
  }
  return { ok: false, reason: 'torch backend unavailable: kernels not registered' };
}
