import * as tf from '@tensorflow/tfjs-core';
import { getRng, type Rng } from '../utils/random.js';
import { fusedGelu } from './fused.js';
import { uniformTensor } from './init.js';

/**
 * Small tensor helpers shared by the building blocks. None of them dispose their inputs; callers
 * run them inside `tf.tidy`.
 */

const TWO_OVER_SQRT_PI = 2 / Math.sqrt(Math.PI);

/**
 * x * 0.5 * (1 + erf(x / sqrt 2)) keeping only x for the backward pass, which recomputes the
 * intermediates and runs the ops TF.js's own gradients of that chain would run, in their order
 * (same numbers, four fewer [.., d] tensors held per call while training).
 */
const geluFn = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
  const [x, save] = args as [tf.Tensor, tf.GradSaveFunc];
  save([x]);
  return {
    value: tf.mul(tf.mul(x, 0.5), tf.add(1, tf.erf(tf.mul(x, Math.SQRT1_2)))),
    // in a tidy: the engine runs a custom gradient outside one, so its temporaries would live
    // until the whole backward pass ends
    gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) =>
      tf.tidy(() => {
        const sx = saved[0]!;
        const a = tf.mul(sx, 0.5);
        const c = tf.mul(sx, Math.SQRT1_2);
        const b = tf.add(1, tf.erf(c));
        const dA = tf.mul(dy, b);
        const dB = tf.mul(dy, a);
        const dC = tf.mul(dB, tf.mul(tf.exp(tf.neg(tf.square(c))), TWO_OVER_SQRT_PI));
        return [tf.add(tf.mul(dC, Math.SQRT1_2), tf.mul(dA, 0.5))];
      }),
  };
}) as (x: tf.Tensor) => tf.Tensor;

/**
 * x broadcast to `shape` (numpy rules). On a backend with a BroadcastTo kernel (torch: a view, no
 * copy) it runs that; tf.broadcastTo itself always runs Tile, which copies.
 */
export function broadcastView(x: tf.Tensor, shape: number[]): tf.Tensor {
  const backend = tf.getBackend();
  if (x.rank > shape.length || !backend || !tf.getKernel('BroadcastTo', backend))
    return tf.broadcastTo(x, shape);
  if (tf.util.arraysEqual(x.shape, shape)) return tf.clone(x);
  const lead = shape.length - x.rank;
  x.shape.forEach((d, i) => {
    if (d !== 1 && d !== shape[lead + i])
      throw new Error(`broadcastView: [${x.shape}] cannot be broadcast to [${shape}]`);
  });
  return tf.engine().runKernel('BroadcastTo', { x }, { shape, inputShape: x.shape }) as tf.Tensor;
}

/** Exact (erf) GELU, as torch's nn.GELU(). x: any shape (float32). */
export function gelu(x: tf.Tensor): tf.Tensor {
  return fusedGelu(x) ?? geluFn(x);
}

/** relu(x)^2. x: any shape. */
export function reluSquared(x: tf.Tensor): tf.Tensor {
  return tf.square(tf.relu(x));
}

/** SiLU / swish: x * sigmoid(x). x: any shape. */
export function silu(x: tf.Tensor): tf.Tensor {
  return tf.mul(x, tf.sigmoid(x));
}

/** F.normalize(x, dim=-1): x / max(||x||_2, eps) along the last axis. x: [..., d]. */
export function normalize(x: tf.Tensor, eps = 1e-12): tf.Tensor {
  // max(sqrt(s), eps) as sqrt(max(s, eps^2)): the same value, and a zero vector gets a zero gradient
  // (as torch's) instead of 0 * inf = NaN from sqrt's derivative at 0
  const norm = tf.sqrt(tf.maximum(tf.sum(tf.square(x), -1, true), eps * eps));
  return tf.div(x, norm);
}

/** L2-normalises groups of the last axis. x: [..., g * d] -> same shape. */
export function l2norm(x: tf.Tensor, groups = 1): tf.Tensor {
  if (groups === 1) return normalize(x);
  const last = x.shape[x.rank - 1];
  const shape = [...x.shape.slice(0, -1), groups, last / groups];
  return tf.reshape(normalize(tf.reshape(x, shape)), x.shape);
}

/**
 * Inverted dropout: in training, zeroes each element with probability p and scales the rest by
 * 1 / (1 - p); otherwise (or p = 0) returns x itself. The mask is drawn from `rng` (default: the
 * library generator), so a seeded run is reproducible. x: any shape.
 */
export function dropout(x: tf.Tensor, p: number, training: boolean, rng: Rng = getRng()): tf.Tensor {
  if (!training || p <= 0) return x;
  if (p >= 1) return tf.zerosLike(x);
  const keep = tf.tidy(() =>
    tf.div(tf.cast(tf.greaterEqual(uniformTensor(rng.fork(), x.shape, 0, 1), p), 'float32'), 1 - p),
  );
  const out = tf.mul(x, keep);
  keep.dispose();
  return out;
}

/** Pads axis `axis` of x with `before` and `after` entries of `value`. */
export function padAt(x: tf.Tensor, axis: number, before: number, after: number, value = 0): tf.Tensor {
  if (before === 0 && after === 0) return x;
  const ax = axis < 0 ? x.rank + axis : axis;
  const pads: [number, number][] = x.shape.map(() => [0, 0] as [number, number]);
  pads[ax] = [before, after];
  if (x.dtype === 'bool') return tf.cast(tf.pad(tf.cast(x, 'int32'), pads, value ? 1 : 0), 'bool');
  return tf.pad(x, pads, value);
}

/**
 * tf.tidy for functions returning plain objects / arrays of tensors (tf.tidy keeps every tensor it
 * finds in the returned value and disposes the rest).
 */
export function tidyObj<T>(fn: () => T): T {
  return tf.tidy(fn as unknown as () => tf.TensorContainer) as unknown as T;
}
