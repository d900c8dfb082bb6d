/**
 * Typed view of the LibTorch addon (build/Release/xt_torch.node). Tensors live in the addon's
 * registry; JS holds their integer ids. Every op returning one id writes the result's dtype and shape
 * into the shared `meta` Int32Array ([dtypeCode, rank, ...dims]).
 */
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

type Ids = number[];
type Ints = number[] | Int32Array;

export interface TorchAddon {
  /** device: cpu, cuda, or auto (cuda when this LibTorch has CUDA and sees a device) */
  init(
    meta: Int32Array,
    threads: number,
    device: string,
    gemm?: string,
  ): { threads: number; device: string; cuda: boolean; version: number; gemm: string };
  fromData(values: ArrayBufferView, shape: Ints, dtype: number): number;
  toData(id: number): Float32Array | Int32Array | Uint8Array;
  free(id: number): void;
  /** frees several ids at once (those already free are ignored) */
  freeList(ids: Ints): void;
  count(): number;
  /** freed CPU blocks kept for reuse, and the bound on them (XT_CPU_CACHE_MB) */
  cpuCache(): { cachedBytes: number; limitBytes: number };
  /**
   * The helper threads that share the work of a batched decoding step's products and attention
   * (XT_HELPER_THREADS; 0 where there are none): jobs shared so far, their chunks, the chunks
   * helpers computed, and those taken back from a helper that had not finished in time.
   */
  helpers(): { threads: number; jobs: number; chunks: number; helperChunks: number; takenBack: number };
  /** test support: while on, the helpers compute every shared chunk; returns the previous setting */
  setHelpersOnly(on: boolean): boolean;
  /** most rows a float32 product computes row by row (at least 4); returns the previous bound */
  setSmallGemvRows(rows: number): number;
  /** the top-k sampling filter: each row's k largest logits kept (as topk picks them), others -inf */
  topKFilter(logits: number, k: number): number;
  /** the top-p (nucleus) filter, with the numbers of the composite (sort, softmax, running sum) */
  topPFilter(logits: number, thres: number): number;
  /** small-op mode (ATen on one thread, for decoding steps); returns the previous mode */
  setSmallOps(on: boolean): boolean;
  bytes(): number;
  storageUseCount(id: number): number;
  storages(): Array<[number, string]>;
  unary(op: number, x: number, alpha?: number): number;
  binary(op: number, a: number, b: number): number;
  cast(x: number, dtype: number): number;
  where(c: number, a: number, b: number): number;
  clip(x: number, lo: number, hi: number): number;
  addN(ids: Ids): number;
  reshape(x: number, shape: Ints): number;
  layerNorm(x: number, gamma: number, eps: number, gammaOffset: number): number;
  layerNormGrad(dy: number, x: number, gamma: number, eps: number, gammaOffset: number): Ids;
  geluGrad(dy: number, x: number): number;
  rotary(x: number, cos: number, sin: number, transpose: boolean): number;
  transpose(x: number, perm: Ints): number;
  broadcastTo(x: number, shape: Ints): number;
  contiguous(x: number): number;
  concat(ids: Ids, axis: number): number;
  stack(ids: Ids, axis: number): number;
  unstack(x: number, axis: number): Ids;
  split(x: number, sizes: Ints, axis: number): Ids;
  slice(x: number, begin: Ints, size: Ints): number;
  stridedSlice(x: number, begin: Ints, strides: Ints, outShape: Ints): number;
  pad(x: number, paddings: Ints, value: number): number;
  mirrorPad(x: number, paddings: Ints, symmetric: boolean): number;
  tile(x: number, reps: Ints): number;
  reverse(x: number, dims: Ints): number;
  gather(x: number, indices: number, axis: number): number;
  gatherNd(x: number, indices: number): number;
  scatterNd(indices: number, updates: number, shape: Ints): number;
  segmentSum(x: number, segmentIds: number, numSegments: number): number;
  oneHot(indices: number, depth: number, on: number, off: number, dtype: number): number;
  topk(x: number, k: number, sorted: boolean): Ids;
  cumulative(x: number, axis: number, exclusive: boolean, reverse: boolean, prod: boolean): number;
  fill(shape: Ints, value: number, dtype: number): number;
  fillLike(x: number, value: number): number;
  multinomial(logits: number, numSamples: number, seed: number, normalized: boolean): number;
  reduce(op: number, x: number, axes: Ints, keepDims: boolean): number;
  argReduce(op: number, x: number, axis: number): number;
  matmul(
    a: number,
    b: number,
    transposeA: boolean,
    transposeB: boolean,
    bias?: number,
    activation?: number,
    alpha?: number,
  ): number;
  softmax(x: number, dim: number, log: boolean): number;
  einsum(equation: string, ids: Ids): number;
  conv2d(x: number, filter: number, strides: Ints, pads: Ints, dilations: Ints): number;
  attention(q: number, k: number, v: number, mask: number, scale: number, causal: boolean): number;
  attentionGrad(
    dy: number,
    q: number,
    k: number,
    v: number,
    mask: number,
    scale: number,
    causal: boolean,
  ): Ids;
  hasSdpa(): boolean;
  /** logits [N, C], target [N] int32 -> [losses [N], logp [N, C]] */
  crossEntropy(logits: number, target: number, ignoreIndex: number): Ids;
  crossEntropyGrad(dy: number, logp: number, target: number, ignoreIndex: number): number;
  /** one AdamW step over many parameters -> [p', m', v'] per parameter (-1: updated in place) */
  adamW(
    params: Ids,
    grads: Ids,
    m: Ids,
    v: Ids,
    decay: Ints,
    exclusive: Ints,
    beta1: number,
    beta2: number,
    eps: number,
    stepSize: number,
    sqrtBc2: number,
    decayFactor: number,
  ): Ids;
  /** kind 0 uniform [a, b), 1 normal (mean a, std b); state [s0..s3, hasSpare, spare], advanced */
  randomFill(kind: number, shape: Ints, a: number, b: number, state: Float64Array): number;
  /**
   * plain self-attention over new positions that start (kCache, vCache -1) or continue a cache,
   * causal or not, with the flash path's attention or the composite's -> [out, k, v, the new v]
   */
  cachedAttention(
    x: number,
    wq: number,
    wk: number,
    wv: number,
    wo: number,
    kCache: number,
    vCache: number,
    cos: number,
    sin: number,
    cosQ: number,
    sinQ: number,
    scale: number,
    heads: number,
    causal: boolean,
    flash: boolean,
  ): Ids;
  /**
   * one decoding step of plain self-attention for rows that each continue their own cache
   * (kCaches[r], vCaches[r] of one row; rotary tables cos[r], sin[r] or -1) -> [out, k0, v0, k1, v1, ...]
   */
  cachedAttentionRows(
    x: number,
    wq: number,
    wk: number,
    wv: number,
    wo: number,
    kCaches: Ints,
    vCaches: Ints,
    cos: Ints,
    sin: Ints,
    scale: number,
    heads: number,
  ): Ids;
  /**
   * one categorical draw per row of probs [b, v], walking the mass in double -> int32 [b]; on a GPU
   * (or with tensorWalk) the walk runs as tensor ops where probs live
   */
  sampleRows(probs: number, draws: Float64Array, tensorWalk?: boolean): number;
  /** 'fp32' | 'bf16' for matrix products and attention -> the previous setting */
  setPrecision(precision: string): string;
  /** the CUDA device in use (null on the CPU); memoryUsedBytes counts every process on it */
  deviceInfo(): { index: number; name?: string; memoryUsedBytes?: number; memoryTotalBytes?: number } | null;
}

/** Where the addon is built: build/Release/xt_torch.node at the package root. */
export function addonPath(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    if (existsSync(path.join(dir, 'package.json'))) break;
    dir = path.dirname(dir);
  }
  return path.join(dir, 'build', 'Release', 'xt_torch.node');
}

let addon: TorchAddon | null = null;

/** Loads the addon (once); throws with the reason when it is not built or cannot load. */
export function loadAddon(): TorchAddon {
  if (addon) return addon;
  const p = addonPath();
  if (!existsSync(p)) throw new Error(`native addon not built (${p} missing)`);
  // OpenMP's idle threads spin by default: beside any other busy process (a service's API, Redis,
  // another worker) they take the cores its work needs, and decoding, a stream of small parallel
  // sections, slowed twenty-fold on two cores. Passive threads sleep instead. OpenMP reads this once,
  // when LibTorch loads, so it is set before (unless the environment sets it).
  process.env.OMP_WAIT_POLICY ??= 'PASSIVE';
  addon = createRequire(import.meta.url)(p) as TorchAddon;
  return addon;
}
