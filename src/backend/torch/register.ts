/**
 * Registers the LibTorch-backed TF.js backend (`torch`) when the native addon is built.
 * XT_NUM_THREADS (default: all cores) sets LibTorch's intra-op threads; XT_DEVICE=cpu|cuda|auto picks
 * the device (cuda only when LibTorch has it; auto: cuda when LibTorch has CUDA and sees a device,
 * else cpu; default cpu). XT_GEMM=auto|dnnl|aten picks what runs CPU float32
 * matrix products: oneDNN's sgemm when the process has libdnnl (auto, the default; dnnl requires
 * it), or ATen's matmul over LibTorch's own BLAS. XT_CPU_CACHE_MB (default a 32nd of the memory,
 * 64 to 1024) bounds the freed CPU blocks the addon keeps for reuse.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import os from 'node:os';
import { TorchBackend } from './backend.js';
import { registerTorchKernels } from './kernels.js';
import { registerAttentionGradient } from './attention.js';
import { loadAddon } from './native.js';

export { addonPath } from './native.js';

export type RegisterResult =
  { ok: true; device: string; threads: number; gemm: string } | { ok: false; reason: string };

let result: RegisterResult | null = null;

function threadsFromEnv(): number {
  const raw = process.env.XT_NUM_THREADS;
  if (raw === undefined || raw.trim() === '') return os.availableParallelism?.() ?? os.cpus().length;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1)
    throw new Error(`XT_NUM_THREADS: expected a positive integer, got "${raw}"`);
  return n;
}

export function registerTorchBackend(): RegisterResult {
  if (result) return result;
  let addon;
  try {
    addon = loadAddon();
  } catch (e) {
    return { ok: false, reason: `torch backend unavailable: ${(e as Error).message}` };
  }
  const device = (process.env.XT_DEVICE ?? 'cpu').trim().toLowerCase() || 'cpu';
  if (device !== 'cpu' && device !== 'cuda' && device !== 'auto')
    return { ok: false, reason: `XT_DEVICE: expected cpu, cuda or auto, got "${process.env.XT_DEVICE}"` };
  const threads = threadsFromEnv();
  const gemm = (process.env.XT_GEMM ?? 'auto').trim().toLowerCase() || 'auto';
  if (!['auto', 'dnnl', 'aten'].includes(gemm))
    return { ok: false, reason: `XT_GEMM: expected auto, dnnl or aten, got "${process.env.XT_GEMM}"` };
  const backend = new TorchBackend(addon);
  let info;
  try {
    info = addon.init(backend.meta, threads, device, gemm);
  } catch (e) {
    return { ok: false, reason: `torch backend unavailable: ${(e as Error).message}` };
  }
  tf.registerBackend('torch', () => backend, 2);
  registerTorchKernels();
  registerAttentionGradient();
  result = { ok: true, device: info.device, threads: info.threads, gemm: info.gemm };
  return result;
}
