import * as tf from '@tensorflow/tfjs-core';
import { createRequire } from 'node:module';
import path from 'node:path';
import type { RegisterResult } from './torch/register.js';

/** The TF.js backends this library can run on, in the order they are tried. */
export const BACKENDS = ['torch', 'tensorflow', 'wasm', 'cpu'] as const;
export type BackendName = (typeof BACKENDS)[number];

export interface BackendInfo {
  backend: BackendName;
  device: string;
  threads: number;
  /** torch on CPU: which matrix-product engine runs float32 products (`dnnl` or `aten`). */
  gemm?: string;
}

let current: BackendInfo | null = null;
let pending: Promise<BackendInfo> | null = null;

async function tryTorch(): Promise<BackendInfo | string> {
  try {
    const mod = (await import('./torch/register.js')) as { registerTorchBackend: () => RegisterResult };
    const r = mod.registerTorchBackend();
    if (!r.ok) return r.reason;
    await tf.setBackend('torch');
    return { backend: 'torch', device: r.device, threads: r.threads, gemm: r.gemm };
  } catch (e) {
    return `torch backend unavailable: ${(e as Error).message}`;
  }
}

async function tryTensorflow(): Promise<BackendInfo | string> {
  for (const pkg of ['@tensorflow/tfjs-node-gpu', '@tensorflow/tfjs-node']) {
    try {
      await import(pkg);
      await tf.setBackend('tensorflow');
      return { backend: 'tensorflow', device: pkg.endsWith('gpu') ? 'gpu' : 'cpu', threads: 0 };
    } catch {
      // not installed; try the next
    }
  }
  return 'tensorflow backend unavailable: neither @tensorflow/tfjs-node-gpu nor @tensorflow/tfjs-node is installed';
}

async function tryWasm(): Promise<BackendInfo | string> {
  try {
    const wasm = await import('@tensorflow/tfjs-backend-wasm');
    const require = createRequire(import.meta.url);
    const dir = path.dirname(require.resolve('@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm.wasm'));
    wasm.setWasmPaths(dir + path.sep);
    if (!(await tf.setBackend('wasm'))) return 'wasm backend failed to initialise';
    return { backend: 'wasm', device: 'cpu', threads: 1 };
  } catch (e) {
    return `wasm backend unavailable: ${(e as Error).message}`;
  }
}

async function tryCpu(): Promise<BackendInfo | string> {
  await import('@tensorflow/tfjs-backend-cpu');
  if (!(await tf.setBackend('cpu'))) return 'cpu backend failed to initialise';
  // its first write prints advice to install tfjs-node; the startup line says which backend runs
  const cpu = tf.findBackend('cpu') as { firstUse?: boolean } | null;
  if (cpu && 'firstUse' in cpu) cpu.firstUse = false;
  return { backend: 'cpu', device: 'cpu', threads: 1 };
}

const LOADERS: Record<BackendName, () => Promise<BackendInfo | string>> = {
  torch: tryTorch,
  tensorflow: tryTensorflow,
  wasm: tryWasm,
  cpu: tryCpu,
};

/**
 * Selects the tensor backend once: `name`, else `XT_BACKEND`, else the first of torch, tensorflow,
 * wasm, cpu that loads. A named backend that fails to load is an error (no silent fallback).
 * Logs the choice once through `log` (default: stderr).
 */
export function initBackend(
  name: string | undefined = process.env.XT_BACKEND,
  log: (msg: string) => void = (m) => process.stderr.write(m + '\n'),
): Promise<BackendInfo> {
  if (current && (!name || name === current.backend)) return Promise.resolve(current);
  if (pending && !name) return pending;
  const attempt = (async () => {
    const wanted = name ? name.trim().toLowerCase() : '';
    if (wanted && !(BACKENDS as readonly string[]).includes(wanted)) {
      throw new Error(`XT_BACKEND: expected one of ${BACKENDS.join(', ')}, got "${name}"`);
    }
    const order: BackendName[] = wanted ? [wanted as BackendName] : [...BACKENDS];
    const reasons: string[] = [];
    for (const b of order) {
      const r = await LOADERS[b]();
      if (typeof r !== 'string') {
        current = r;
        log(
          `x-transformers: backend=${r.backend} device=${r.device} threads=${r.threads}` +
            (r.gemm ? ` gemm=${r.gemm}` : ''),
        );
        return r;
      }
      reasons.push(r);
    }
    throw new Error(`no tensor backend could be loaded: ${reasons.join('; ')}`);
  })();
  pending = attempt;
  attempt.catch(() => {
    if (pending === attempt) pending = null;
  });
  return attempt;
}

/**
 * Whether the active backend computes on a GPU, where reading a result back waits for every queued
 * kernel: checks that would read inputs back (token ids in range) are left to the device there.
 */
export function onGpu(): boolean {
  return current !== null && current.device !== 'cpu' && tf.getBackend() === current.backend;
}

/** The backend chosen by `initBackend`, or null before it ran. */
export function backendInfo(): BackendInfo | null {
  return current;
}

/**
 * Runs `fn` (a decoding step: many ops on a few rows each) with the torch backend's elementwise,
 * norm and softmax ops on one thread: waking other threads for them costs more than they do. Matrix
 * products with weights large enough to pay for threads still use them. Other backends run `fn`
 * as it is.
 */
export function smallOps<T>(fn: () => T): T {
  return withBackendSetting('setSmallOps', true, fn);
}

/**
 * Runs `fn` with matrix products of up to `rows` rows computed so that each row's result does not
 * depend on the other rows (batched decoding: a row's numbers equal those it has alone). The torch
 * backend computes products of up to 4 rows row by row on its in-place kernels (where oneDNN's
 * sgemm runs the others, the default wherever LibTorch links libdnnl); this raises that bound to
 * `rows` for the call. The cpu backend's products are row-independent already.
 */
export function rowStableProducts<T>(rows: number, fn: () => T): T {
  return withBackendSetting('setRowStableRows', rows, fn);
}

/**
 * Runs `fn` with a setting of the active backend changed through its method `setter` (which
 * returns the previous value), and restores it after; runs `fn` as it is on a backend without it.
 */
function withBackendSetting<V, T>(setter: string, value: V, fn: () => T): T {
  const backend = tf.backend() as unknown as Record<string, ((v: V) => V) | undefined>;
  const set = backend[setter];
  if (typeof set !== 'function') return fn();
  const prev = set.call(backend, value);
  try {
    return fn();
  } finally {
    set.call(backend, prev);
  }
}

/** The backend's own ids for tensors held outside TF.js (see BackendKv in src/attention/types.ts). */
interface BackendIds {
  freeIds(ids: number[]): void;
  adoptId(id: number, shape: number[], dtype: tf.DataType): tf.TensorInfo;
  sliceIds(ids: number[], begins: number[][], sizes: number[][]): number[];
}

function backendIds(): BackendIds {
  const b = tf.backend() as unknown as Partial<BackendIds>;
  if (typeof b.freeIds !== 'function' || typeof b.adoptId !== 'function' || typeof b.sliceIds !== 'function')
    throw new Error(`backend ${tf.getBackend()}: holds no tensors under its own ids`);
  return b as BackendIds;
}

/** Frees tensors the backend holds under its own ids. */
export function freeBackendIds(ids: number[]): void {
  backendIds().freeIds(ids);
}

/**
 * Views of tensors the backend holds under its own ids (the same memory), under new ids the caller
 * owns: `begins[i]` and `sizes[i]` of `ids[i]`, as `tf.slice` takes them.
 */
export function sliceBackendIds(ids: number[], begins: number[][], sizes: number[][]): number[] {
  return backendIds().sliceIds(ids, begins, sizes);
}

/** A tensor that takes over the backend's id `id` (which the caller no longer frees). */
export function tensorFromBackendId(id: number, shape: number[], dtype: tf.DataType): tf.Tensor {
  return tf.engine().makeTensorFromTensorInfo(backendIds().adoptId(id, shape, dtype));
}
