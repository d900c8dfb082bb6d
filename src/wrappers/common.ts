import * as tf from '@tensorflow/tfjs-core';
import { stopGradient } from '../attention/ops.js';
import { checkTensor } from '../utils/errors.js';
import type { Module } from '../nn/module.js';
import { padAt } from '../nn/functional.js';
import { OptionError } from '../utils/errors.js';
import { RULES, type Rule } from '../utils/option-rules.js';

/**
 * What the wrappers need of an attention stack (`AttentionLayers`, `Encoder`, `Decoder`, ...):
 * its model dimension, whether it replaces absolute positions, and a forward pass.
 */
export interface LayersLike extends Module {
  readonly dim: number;
  readonly disableAbsPosEmb: boolean;
  forward(x: tf.Tensor, opts?: LayersCallOptions): LayersCallOutput;
}

/** The per-call options the wrappers pass on to the attention stack. */
export interface LayersCallOptions {
  /** mask: [b, n] bool, true = keep */
  mask?: tf.Tensor;
  /** context: [b, m, dimContext] (cross-attention) */
  context?: tf.Tensor;
  /** contextMask: [b, m] bool */
  contextMask?: tf.Tensor;
  /** attnMask: [i, j] or [b|1, h|1, i, j] bool */
  attnMask?: tf.Tensor;
  /** mems: one [b, m, dim] per attention layer */
  mems?: tf.Tensor[];
  returnHiddens?: boolean;
}

/** What the attention stack returns: out [b, n, dim], the hidden states, and its key/value cache. */
export interface LayersCallOutput {
  out: tf.Tensor;
  hiddens?: tf.Tensor[];
  cache?: { dispose(): void };
}

/**
 * Runs the attention stack and returns its output (and, with `returnHiddens`, its hidden states:
 * the input of each self-attention layer), disposing everything else it returned.
 * x: [b, n, dim] -> out [b, n, dim].
 */
export function runLayers(
  layers: LayersLike,
  x: tf.Tensor,
  opts: LayersCallOptions = {},
): { out: tf.Tensor; hiddens: tf.Tensor[] } {
  const res = layers.forward(x, opts);
  const hiddens = opts.returnHiddens ? (res.hiddens ?? []) : [];
  const keep = new Set<tf.Tensor>([res.out, ...hiddens]);
  res.cache?.dispose();
  for (const [k, v] of Object.entries(res as object))
    if (k !== 'cache' && k !== 'out') disposeExcept(v, keep);
  return { out: res.out, hiddens };
}

/** Disposes every tensor found in nested arrays / plain objects of `value`, except those in `keep`. */
export function disposeExcept(value: unknown, keep: Set<tf.Tensor>): void {
  if (value instanceof tf.Tensor) {
    if (!keep.has(value) && !value.isDisposed) value.dispose();
  } else if (Array.isArray(value)) {
    for (const v of value) disposeExcept(v, keep);
  } else if (
    value !== null &&
    typeof value === 'object' &&
    Object.getPrototypeOf(value) === Object.prototype
  ) {
    for (const v of Object.values(value)) disposeExcept(v, keep);
  }
}

/** Throws an OptionError naming `name` unless `v` passes `rule` (one of the table's RULES). */
function checkRule<T>(name: string, rule: Rule, v: unknown): T {
  if (!rule.test(v)) throw OptionError.of(name, rule.expected, v);
  return v as T;
}

/** Throws `name: expected a positive integer, got v` unless v is one. */
export const checkPositiveInt = (name: string, v: unknown): number => checkRule(name, RULES.posInt, v);

/** Throws unless v is a non-negative integer. */
export const checkNonNegInt = (name: string, v: unknown): number => checkRule(name, RULES.nonNegInt, v);

/** Throws unless v is a probability in [0, 1). */
export const checkProb = (name: string, v: unknown): number => checkRule(name, RULES.prob, v);

/** Throws unless v is a boolean. */
export const checkBool = (name: string, v: unknown): boolean => checkRule(name, RULES.bool, v);

/** Throws unless every key of `options` is one of `allowed`. */
export function checkKnownKeys(owner: string, options: object, allowed: readonly string[]): void {
  for (const k of Object.keys(options)) {
    if (!allowed.includes(k)) throw new OptionError(k, `an option of ${owner}`, 'an unknown option');
  }
}

/** Formats a value for an error message (the library's one formatter, under its short name). */
export { fmtValue as fmt } from '../utils/errors.js';

/** Checks that `mask` is a [b, n] bool tensor. */
export function checkMask(name: string, mask: tf.Tensor, b: number, n: number): void {
  if (mask.rank !== 2 || mask.shape[0] !== b || mask.shape[1] !== n) {
    throw new Error(`${name}: expected shape [${b}, ${n}], got [${mask.shape.join(', ')}]`);
  }
  if (mask.dtype !== 'bool') throw new Error(`${name}: expected dtype bool, got ${mask.dtype}`);
}

/** Prepends `count` true entries along the sequence axis. mask: [b, n] bool -> [b, count + n]. */
export function padMaskLeft(mask: tf.Tensor, count: number): tf.Tensor {
  return tf.tidy(() => tf.concat([tf.ones([mask.shape[0]!, count], 'bool'), mask], 1));
}

/**
 * Mean over the sequence of the positions the mask keeps (all positions without a mask).
 * x: [b, n, d], mask?: [b, n] bool -> [b, d]
 */
export function maskedMean(x: tf.Tensor, mask?: tf.Tensor): tf.Tensor {
  return tf.tidy(() => {
    if (!mask) return tf.mean(x, 1);
    const m = tf.expandDims(tf.cast(mask, 'float32'), -1);
    const num = tf.sum(tf.mul(x, m), 1);
    const den = tf.maximum(tf.sum(m, 1), 1);
    return tf.div(num, den);
  });
}

/** Repeats a learned [m, d] table over the batch: -> [b, m, d]. */
export function repeatBatch(t: tf.Tensor, b: number): tf.Tensor {
  return tf.tidy(() => tf.tile(tf.expandDims(t, 0), [b, 1, 1]));
}

/**
 * Memory tokens in front of every chunk of `every` positions: x [b, len, d] (len = n tokens plus
 * the positions put in front of them), zero-padded so that the n tokens fill whole chunks, and
 * memoryTokens [m, d] -> [b, chunks * (m + every), d].
 */
export function intersperseMemoryTokens(
  x: tf.Tensor,
  n: number,
  every: number,
  memoryTokens: tf.Tensor,
): tf.Tensor {
  const [b, len, d] = x.shape as [number, number, number];
  const padded = len + Math.ceil(n / every) * every - n;
  if (padded % every !== 0)
    throw new Error(
      `memoryTokensInterspersedEvery: expected the positions put in front of the tokens (${len - n}) to fill whole chunks of ${every}`,
    );
  const chunks = padded / every;
  const numMem = memoryTokens.shape[0]!;
  return tf.tidy(() => {
    const h = tf.reshape(padAt(x, 1, 0, padded - len, 0), [b * chunks, every, d]);
    const mem = tf.tile(tf.expandDims(memoryTokens, 0), [b * chunks, 1, 1]);
    return tf.reshape(tf.concat([mem, h], 1), [b, chunks * (numMem + every), d]);
  });
}

/** The inverse of intersperseMemoryTokens: [b, chunks * (numMem + every), d] -> [b, chunks * every, d]. */
export function dropInterspersedMemory(e: tf.Tensor, numMem: number, every: number): tf.Tensor {
  const [b, len, d] = e.shape as [number, number, number];
  const chunks = len / (numMem + every);
  return tf.tidy(() => {
    const perChunk = tf.slice(
      tf.reshape(e, [b * chunks, numMem + every, d]),
      [0, numMem, 0],
      [-1, every, -1],
    );
    return tf.reshape(perChunk, [b, chunks * every, d]);
  });
}

/**
 * The attention z-loss of the layers' pre-softmax logits ([b, h, i, j] each), times `weight`: the
 * mean over batch and queries of the sum over heads of (the sum over layers of logsumexp)^2.
 */
export function attentionZLoss(inters: { preSoftmaxAttn?: tf.Tensor }[], weight: number): tf.Tensor {
  return tf.tidy(() => {
    let lse: tf.Tensor | null = null;
    for (const inter of inters) {
      if (!inter.preSoftmaxAttn)
        throw new Error('returnAttnZLoss: an attention layer did not form its logits (fused attention)');
      const l = tf.logSumExp(inter.preSoftmaxAttn, -1);
      lse = lse ? tf.add(lse, l) : l;
    }
    if (!lse) throw new Error('returnAttnZLoss: the attention layers have no attention layer');
    return tf.mul(tf.mean(tf.sum(tf.square(lse), 1)), weight);
  });
}

/**
 * The memories the next segment reads (Transformer-XL): each layer's hidden states after its
 * memories (`mems`, when given), the last `maxMemLen` positions (all when 0), off the gradient tape.
 */
export function nextMems(
  hiddens: tf.Tensor[],
  mems: tf.Tensor[] | undefined,
  maxMemLen: number,
): tf.Tensor[] {
  const pairs = mems && mems.length ? hiddens.map((hd, i) => tf.concat([mems[i]!, hd], 1)) : hiddens;
  return pairs.map((t) => {
    const len = t.shape[1]!;
    const keep = maxMemLen > 0 ? Math.min(maxMemLen, len) : len;
    return stopGradient(tf.slice(t, [0, len - keep, 0], [-1, keep, -1]));
  });
}

/** Forward inputs that TransformerWrapper and MultiInputTransformerWrapper take alike. */
export interface SharedForwardInputs {
  mask?: tf.Tensor;
  prependEmbeds?: tf.Tensor;
  prependMask?: tf.Tensor;
  sumEmbeds?: tf.Tensor;
  seqStartPos?: tf.Tensor;
}

/** Checks the shapes and dtypes of the shared forward inputs for tokens [b, n] and width embDim. */
export function checkSharedInputs(o: SharedForwardInputs, b: number, n: number, embDim: number): void {
  if (o.mask) checkTensor('mask', o.mask, { shape: [b, n], dtype: 'bool' });
  if (o.prependEmbeds) {
    checkTensor('prependEmbeds', o.prependEmbeds, { shape: [b, null, embDim], dtype: 'float32' });
    if (o.prependMask)
      checkTensor('prependMask', o.prependMask, { shape: [b, o.prependEmbeds.shape[1]!], dtype: 'bool' });
  } else if (o.prependMask) throw new Error('prependMask: given without prependEmbeds');
  if (o.sumEmbeds) checkTensor('sumEmbeds', o.sumEmbeds, { shape: [b, n, embDim], dtype: 'float32' });
  if (o.seqStartPos) checkTensor('seqStartPos', o.seqStartPos, { shape: [b], dtype: 'int32' });
}

/** Embeddings with the masks that cover them: the self-attention mask and the key mask. */
export interface MaskedEmbeds {
  h: tf.Tensor;
  mask?: tf.Tensor;
  kvMask?: tf.Tensor;
}

/**
 * `front` ([b, p, d]) put before the embeddings; the mask grows by `frontMask` (visible where not
 * given, as is the whole mask when only `frontMask` is given), the key mask by visible positions.
 */
export function putInFront(e: MaskedEmbeds, front: tf.Tensor, frontMask?: tf.Tensor): MaskedEmbeds {
  const [b, n] = e.h.shape as [number, number];
  const p = front.shape[1]!;
  const h = tf.concat([front, e.h], 1);
  const kvMask = e.kvMask ? padAt(e.kvMask, 1, p, 0, 1) : undefined;
  let mask = e.mask;
  if (frontMask || mask) {
    const m = mask ?? tf.ones([b, n], 'bool');
    const pm = frontMask ?? tf.ones([b, p], 'bool');
    mask = tf.concat([tf.cast(pm, 'bool'), tf.cast(m, 'bool')], 1);
  }
  return { h, mask, kvMask };
}

/** Learned tokens ([k, d]) put before every row's embeddings, visible in both masks. */
export function putTokensInFront(e: MaskedEmbeds, tokens: tf.Tensor): MaskedEmbeds {
  const [b] = e.h.shape as [number];
  const k = tokens.shape[0]!;
  return {
    h: tf.concat([tf.tile(tf.expandDims(tokens, 0), [b, 1, 1]), e.h], 1),
    mask: e.mask ? padAt(e.mask, 1, k, 0, 1) : undefined,
    kvMask: e.kvMask ? padAt(e.kvMask, 1, k, 0, 1) : undefined,
  };
}

/** The embedding's gradient scaled by `fraction` (the reference's emb_frac_gradient), values unchanged. */
export function scaleEmbGradient(h: tf.Tensor, fraction: number): tf.Tensor {
  if (fraction >= 1) return h;
  return tf.add(tf.mul(h, fraction), tf.mul(stopGradient(h), 1 - fraction));
}
