/**
 * Sampling filters for autoregressive decoding: each takes logits `[batch, vocab]` and returns a
 * tensor of the same shape where filtered-out entries are exactly `-Infinity` and kept entries are
 * the input logits unchanged. Plus contrastive decoding (expert against amateur logits).
 */
import * as tf from '@tensorflow/tfjs-core';
import { checkTensor } from '../utils/errors.js';
import { backendHasKernel } from '../nn/fused.js';

/** Options of `topK`: keep the `k` largest (default `ceil(fracNumTokens * vocab)`). */
export interface TopKOptions {
  fracNumTokens?: number;
  k?: number;
}

/** Options of `topP` (nucleus): keep the smallest set whose probability mass reaches `thres`. */
export interface TopPOptions {
  thres?: number;
}

/** Options of `topA`: drop tokens with probability below `max(p) ** minPPow * minPRatio`. */
export interface TopAOptions {
  minPPow?: number;
  minPRatio?: number;
}

/** Options of `minP`: drop tokens with probability below `minP * max(p)`. */
export interface MinPOptions {
  minP?: number;
}

/** Options of `contrastiveDecode`. */
export interface ContrastiveDecodeOptions {
  alpha?: number;
  beta?: number;
}

export const topKDefaults = { fracNumTokens: 0.1 } as const;
export const topPDefaults = { thres: 0.9 } as const;
export const topADefaults = { minPPow: 2.0, minPRatio: 0.02 } as const;
export const minPDefaults = { minP: 0.1 } as const;
export const contrastiveDecodeDefaults = { alpha: 0.1, beta: 0.5 } as const;

/** Keyword arguments of any built-in filter (a custom filter receives them as given). */
export type FilterKwargs = Record<string, number | undefined>;

/** A filter: logits `[batch, vocab]` in, filtered logits `[batch, vocab]` out (a new tensor). */
export type FilterFn = (logits: tf.Tensor, kwargs?: FilterKwargs) => tf.Tensor;

/** Built-in filter names, as the reference's `FILTER_LOGITS_FN` keys (camelCase accepted too). */
export type FilterName = 'top_k' | 'top_p' | 'top_a' | 'min_p' | 'topK' | 'topP' | 'topA' | 'minP';

function checkLogits(name: string, logits: tf.Tensor): void {
  checkTensor(name, logits, { rank: 2, dtype: 'float32', desc: '[batch, vocab]' });
}

function checkKeys(fn: string, kwargs: object, allowed: readonly string[]): void {
  for (const [k, v] of Object.entries(kwargs)) {
    if (v === undefined) continue;
    if (!allowed.includes(k)) {
      throw new Error(
        `filterKwargs.${k}: expected one of ${allowed.join(', ')} for ${fn}, got an unknown option`,
      );
    }
    if (typeof v !== 'number' || !Number.isFinite(v)) {
      throw new Error(`filterKwargs.${k}: expected a finite number, got ${String(v)}`);
    }
  }
}

/** Keeps, per row, the entries whose mask is 1: `mask: [b, v]` built from `indices: [b, k]`. */
function keepIndices(logits: tf.Tensor, indices: tf.Tensor): tf.Tensor {
  return tf.tidy(() => {
    const [b, v] = logits.shape as [number, number];
    const k = indices.shape[1]!;
    const rows = tf.tile(tf.reshape(tf.range(0, b, 1, 'int32'), [b, 1]), [1, k]);
    const coords = tf.stack([tf.reshape(rows, [-1]), tf.reshape(indices, [-1])], 1);
    const mask = tf.scatterND(coords, tf.ones([b * k], 'int32'), [b, v]);
    return tf.where(tf.greater(mask, 0), logits, tf.fill([b, v], -Infinity));
  });
}

/**
 * A kernel a backend may register for the top-k filter in one op:
 *   XtTopKFilter  inputs {logits: float32 [b, v]}, attrs {k} -> [b, v]: per row, the k entries that
 *                 `tf.topk` returns keep their logits, the others are -Infinity.
 */
export const XT_TOPK_FILTER = 'XtTopKFilter';

/**
 * A kernel a backend may register for the top-p filter in one op:
 *   XtTopPFilter  inputs {logits: float32 [b, v]}, attrs {thres} -> [b, v]: what `topP`'s composite
 *                 gives (a stable descending sort, its softmax and running sum, the first entry and
 *                 those whose predecessors' mass is not above thres kept, the others -Infinity).
 */
export const XT_TOPP_FILTER = 'XtTopPFilter';

/** Top-k filter. logits: [b, v] -> [b, v]. */
export function topK(logits: tf.Tensor, options: TopKOptions = {}): tf.Tensor {
  checkLogits('logits', logits);
  checkKeys('topK', options, ['fracNumTokens', 'k']);
  const v = logits.shape[1]!;
  const frac = options.fracNumTokens ?? topKDefaults.fracNumTokens;
  if (!(frac > 0 && frac <= 1)) throw new Error(`fracNumTokens: expected a number in (0, 1], got ${frac}`);
  let k = options.k ?? Math.ceil(frac * v);
  if (!Number.isInteger(k) || k < 1) throw new Error(`k: expected a positive integer, got ${k}`);
  k = Math.min(k, v);
  if (backendHasKernel(XT_TOPK_FILTER))
    return tf.engine().runKernel(XT_TOPK_FILTER, { logits }, { k }) as tf.Tensor;
  return tf.tidy(() => keepIndices(logits, tf.topk(logits, k, true).indices));
}

/** Nucleus (top-p) filter. logits: [b, v] -> [b, v]. */
export function topP(logits: tf.Tensor, options: TopPOptions = {}): tf.Tensor {
  checkLogits('logits', logits);
  checkKeys('topP', options, ['thres']);
  const thres = options.thres ?? topPDefaults.thres;
  if (!(thres > 0 && thres <= 1))
    throw new Error(`thres: expected a number in (0, 1] for topP, got ${thres}`);
  if (backendHasKernel(XT_TOPP_FILTER))
    return tf.engine().runKernel(XT_TOPP_FILTER, { logits }, { thres }) as tf.Tensor;
  return tf.tidy(() => {
    const [b, v] = logits.shape as [number, number];
    const { values: sorted, indices } = tf.topk(logits, v, true);
    const cum = tf.cumsum(tf.softmax(sorted, -1), 1);
    // remove where the mass before this token already exceeds thres (the first token always stays)
    const over = tf.greater(cum, thres);
    const shifted = tf.concat([tf.zeros([b, 1], 'bool'), tf.slice(over, [0, 0], [b, v - 1])], 1);
    const filtered = tf.where(shifted, tf.fill([b, v], -Infinity), sorted);
    const rows = tf.tile(tf.reshape(tf.range(0, b, 1, 'int32'), [b, 1]), [1, v]);
    const coords = tf.stack([tf.reshape(rows, [-1]), tf.reshape(indices, [-1])], 1);
    return tf.scatterND(coords, tf.reshape(filtered, [-1]), [b, v]);
  });
}

/** Top-a filter. logits: [b, v] -> [b, v]. */
export function topA(logits: tf.Tensor, options: TopAOptions = {}): tf.Tensor {
  checkLogits('logits', logits);
  checkKeys('topA', options, ['minPPow', 'minPRatio']);
  const pow = options.minPPow ?? topADefaults.minPPow;
  const ratio = options.minPRatio ?? topADefaults.minPRatio;
  return tf.tidy(() => {
    const probs = tf.softmax(logits, -1);
    const limit = tf.mul(tf.pow(tf.max(probs, -1, true), pow), ratio);
    return tf.where(tf.less(probs, limit), tf.fill(logits.shape, -Infinity), logits);
  });
}

/** Min-p filter (arXiv 2407.01082). logits: [b, v] -> [b, v]. */
export function minP(logits: tf.Tensor, options: MinPOptions = {}): tf.Tensor {
  checkLogits('logits', logits);
  checkKeys('minP', options, ['minP']);
  const p = options.minP ?? minPDefaults.minP;
  if (!(p >= 0 && p <= 1)) throw new Error(`minP: expected a number in [0, 1], got ${p}`);
  return tf.tidy(() => {
    const probs = tf.softmax(logits, -1);
    const limit = tf.mul(tf.max(probs, -1, true), p);
    return tf.where(tf.less(probs, limit), tf.fill(logits.shape, -Infinity), logits);
  });
}

/** The largest finite float32, used by contrastive decoding as the reference's `-finfo.max`. */
export const FLOAT32_MAX = 3.4028234663852886e38;

/**
 * Contrastive decoding (arXiv 2309.09117, appendix A, algorithm 2): `(1 + beta) * expert - beta *
 * amateur`, with tokens whose expert logit is below `log(alpha) + max(expert)` set to the lowest
 * float32. expertLogits, amateurLogits: [b, v] -> [b, v].
 */
export function contrastiveDecode(
  expertLogits: tf.Tensor,
  amateurLogits: tf.Tensor,
  options: ContrastiveDecodeOptions = {},
): tf.Tensor {
  checkLogits('expertLogits', expertLogits);
  checkTensor('amateurLogits', amateurLogits, {
    shape: expertLogits.shape,
    desc: 'same shape as expertLogits',
  });
  checkKeys('contrastiveDecode', options, ['alpha', 'beta']);
  const alpha = options.alpha ?? contrastiveDecodeDefaults.alpha;
  const beta = options.beta ?? contrastiveDecodeDefaults.beta;
  if (!(alpha > 0)) throw new Error(`alpha: expected a positive number, got ${alpha}`);
  return tf.tidy(() => {
    const cutoff = tf.add(tf.max(expertLogits, -1, true), Math.log(alpha));
    const diffs = tf.sub(tf.mul(expertLogits, 1 + beta), tf.mul(amateurLogits, beta));
    return tf.where(tf.less(expertLogits, cutoff), tf.fill(expertLogits.shape, -FLOAT32_MAX), diffs);
  });
}

const SNAKE: Record<string, string> = {
  frac_num_tokens: 'fracNumTokens',
  min_p_pow: 'minPPow',
  min_p_ratio: 'minPRatio',
  min_p: 'minP',
};

/** Maps the reference's snake_case keyword names to ours (`frac_num_tokens` -> `fracNumTokens`). */
export function normalizeFilterKwargs(kwargs: FilterKwargs = {}): FilterKwargs {
  const out: FilterKwargs = {};
  for (const [k, v] of Object.entries(kwargs)) out[SNAKE[k] ?? k] = v;
  return out;
}

/** The built-in filters by name (the reference's names and their camelCase forms). */
export const FILTER_LOGITS_FN: Readonly<Record<FilterName, FilterFn>> = {
  top_k: topK,
  top_p: topP,
  top_a: topA,
  min_p: minP,
  topK,
  topP,
  topA,
  minP,
};

/** Resolves a filter given by name or function; an unknown name throws listing the valid ones. */
export function resolveFilter(filter: FilterName | FilterFn | string, argName = 'filterLogitsFn'): FilterFn {
  if (typeof filter === 'function') return filter;
  if (typeof filter === 'string' && Object.hasOwn(FILTER_LOGITS_FN, filter)) {
    const fn = FILTER_LOGITS_FN[filter as FilterName];
    return (logits, kwargs) => fn(logits, normalizeFilterKwargs(kwargs));
  }
  throw new Error(
    `${argName}: expected a function or one of ${Object.keys(FILTER_LOGITS_FN).join(', ')}, got ${JSON.stringify(filter)}`,
  );
}
