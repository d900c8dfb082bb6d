import * as tf from '@tensorflow/tfjs-core';
import { getRng, type Rng } from '../utils/random.js';
import { uniformTensor } from '../nn/init.js';

/**
 * Tensor helpers of the attention code. None of them dispose their inputs; callers run them
 * inside `tf.tidy`.
 */

/** The reference's masking value: -torch.finfo(float32).max. */
export const MASK_VALUE = -3.4028234663852886e38;

/** Returns x with no gradient flowing back through it (torch's `.detach()`). x: any shape. */
export const stopGradient = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => ({
  value: tf.clone(args[0] as tf.Tensor),
  gradFunc: (dy: tf.Tensor) => tf.zerosLike(dy),
})) as (x: tf.Tensor) => tf.Tensor;

/**
 * fn(x) computed off the gradient tape: no gradient flows back into x through it (for masks and
 * indices derived from values, e.g. top-k thresholds). x: any shape; fn's result: any shape.
 */
export function noGrad(fn: (x: tf.Tensor) => tf.Tensor, x: tf.Tensor): tf.Tensor {
  const f = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
    const input = args[0] as tf.Tensor;
    (args[1] as tf.GradSaveFunc)([input]);
    return {
      value: fn(input),
      gradFunc: (_dy: tf.Tensor, saved: tf.Tensor[]) => tf.zerosLike(saved[0]!),
    };
  }) as (x: tf.Tensor) => tf.Tensor;
  return f(x);
}

/**
 * Straight-through estimator, in the reference's order of operations:
 * `hard + soft - detach(soft)`; the gradient reaches `soft` only. hard, soft: same shape.
 */
export function straightThrough(hard: tf.Tensor, soft: tf.Tensor): tf.Tensor {
  return tf.sub(tf.add(stopGradient(hard), soft), stopGradient(soft));
}

/** F.normalize along the last axis: x / max(||x||, eps). x: [..., d]. */
export function normalizeLast(x: tf.Tensor, eps = 1e-12): tf.Tensor {
  // max(sqrt(s), eps) as sqrt(max(s, eps^2)): the same value, and a zero vector gets a zero gradient
  // (as torch's) instead of 0 * inf = NaN from sqrt's derivative at 0
  const norm = tf.sqrt(tf.maximum(tf.sum(tf.square(x), -1, true), eps * eps));
  return tf.div(x, norm);
}

/** L2-normalises `groups` equal chunks of the last axis. x: [..., g * d] -> same shape. */
export function l2normGroups(x: tf.Tensor, groups = 1): tf.Tensor {
  if (groups === 1) return normalizeLast(x);
  const last = x.shape[x.rank - 1]!;
  const shape = [...x.shape.slice(0, -1), groups, last / groups];
  return tf.reshape(normalizeLast(tf.reshape(x, shape)), x.shape);
}

/** Pads axis `axis` with `before`/`after` entries of `value` (bool tensors pad with value !== 0). */
export function padAxis(x: tf.Tensor, axis: number, before: number, after: number, value = 0): tf.Tensor {
  if (before === 0 && after === 0) return x;
  const ax = axis < 0 ? x.rank + axis : axis;
  const pads = x.shape.map((): [number, number] => [0, 0]);
  pads[ax] = [before, after];
  if (x.dtype === 'bool') return tf.cast(tf.pad(tf.cast(x, 'int32'), pads, value ? 1 : 0), 'bool');
  return tf.pad(x, pads, value);
}

/** Where `keep` is false, `value`; else x. keep: bool broadcastable to x. */
export function maskedFill(x: tf.Tensor, keep: tf.Tensor, value: number): tf.Tensor {
  return tf.where(keep, x, tf.scalar(value, x.dtype));
}

/**
 * The right-aligned causal mask as "may attend" booleans: query r (at key position j - i + r) sees
 * keys c <= j - i + r. Returns [i, j] bool.
 */
export function causalKeep(i: number, j: number): tf.Tensor2D {
  return tf.tidy(() => {
    const rows = tf.reshape(tf.range(j - i, j, 1, 'int32'), [i, 1]);
    const cols = tf.reshape(tf.range(0, j, 1, 'int32'), [1, j]);
    return tf.lessEqual(cols, rows) as tf.Tensor2D;
  });
}

/**
 * Inverted dropout drawn from `rng` (default: the library generator): in training each element is
 * zeroed with probability p and the rest scaled by 1 / (1 - p); otherwise x is returned unchanged.
 */
export function dropoutSeeded(x: tf.Tensor, p: number, training: boolean, rng: Rng = getRng()): tf.Tensor {
  if (!training || p <= 0) return x;
  if (p >= 1) return tf.zerosLike(x);
  const u = uniformTensor(rng, x.shape, 0, 1);
  const keep = tf.cast(tf.greaterEqual(u, p), x.dtype);
  return tf.div(tf.mul(x, keep), 1 - p);
}

/** Repeats the heads of kv [b, kvh, n, d] to [b, kvh * r, n, d], head h using kv head h mod kvh. */
export function repeatKvHeads(t: tf.Tensor, heads: number): tf.Tensor {
  const kvh = t.shape[1]!;
  if (kvh === heads) return t;
  return tf.tile(t, [1, heads / kvh, 1, 1]);
}

/** Sets every entry of a variable to `value` (nn.init.constant_), leaving no tensor behind. */
export function fillVariable(v: tf.Variable, value: number): void {
  tf.tidy(() => v.assign(tf.fill(v.shape, value, v.dtype)));
}
