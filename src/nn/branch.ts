import * as tf from '@tensorflow/tfjs-core';
import { Module } from './module.js';
import { padAt } from './functional.js';
import { Linear } from './linear.js';

/** What a branch (attention or feedforward) returns: a tensor, or an object holding `out`. */
export type BranchOut = tf.Tensor | { out: tf.Tensor };

/**
 * A branch module called as `forward(x, opts, condition)`: `opts` are the branch's own inputs,
 * `condition` ([b, dimCondition] or [b, n, dimCondition]) the stack's, for adaptive layerscale.
 * Attention and FeedForward take what they need of these; the wrappers below pass them through.
 */
export interface Callable<O, R extends BranchOut> {
  forward(x: tf.Tensor, opts?: O, condition?: tf.Tensor): R;
}

function mapOut<R extends BranchOut>(r: R, f: (t: tf.Tensor) => tf.Tensor): R {
  if (r instanceof tf.Tensor) return f(r) as R;
  return { ...r, out: f(r.out) };
}

/** Multiplies a branch's output by a constant (`fn` holds the branch, as the reference's Scale). */
export class Scale<O, R extends BranchOut> extends Module implements Callable<O, R> {
  fn: Module & Callable<O, R>;
  constructor(
    readonly value: number,
    fn: Module & Callable<O, R>,
  ) {
    super();
    this.fn = this.registerModule('fn', fn);
  }

  /** x: [b, n, dim]. */
  forward(x: tf.Tensor, opts?: O, condition?: tf.Tensor): R {
    const r = this.fn.forward(x, opts, condition);
    return mapOut(r, (t) => {
      const y = tf.mul(t, this.value);
      t.dispose();
      return y;
    });
  }
}

/** Multiplies a branch's output by a learned per-feature `gamma` [dim] (+1 with unitOffset). */
export class LayerScale<O, R extends BranchOut> extends Module implements Callable<O, R> {
  fn: Module & Callable<O, R>;
  gamma: tf.Variable;
  constructor(
    fn: Module & Callable<O, R>,
    dim: number,
    readonly initValue = 0,
    readonly unitOffset = false,
  ) {
    super();
    this.fn = this.registerModule('fn', fn);
    this.gamma = this.registerParameter('gamma', tf.fill([dim], initValue - (unitOffset ? 1 : 0)));
  }

  /** x: [b, n, dim]. */
  forward(x: tf.Tensor, opts?: O, condition?: tf.Tensor): R {
    const r = this.fn.forward(x, opts, condition);
    return mapOut(r, (t) => {
      const y = tf.tidy(() => tf.mul(t, this.unitOffset ? tf.add(this.gamma, 1) : this.gamma));
      t.dispose();
      return y;
    });
  }
}

/**
 * Token shifting: splits the features into `shifts.length` equal segments (the remainder is left
 * alone) and shifts segment i along the sequence by shifts[i] (positive: towards later positions),
 * zeroing masked positions first, before calling the branch.
 */
export class ShiftTokens<O extends { mask?: tf.Tensor }, R extends BranchOut>
  extends Module
  implements Callable<O, R>
{
  fn: Module & Callable<O, R>;
  constructor(
    readonly shifts: number[],
    fn: Module & Callable<O, R>,
  ) {
    super();
    this.fn = this.registerModule('fn', fn);
  }

  /** x: [b, n, dim]; opts.mask?: [b, n] bool. */
  forward(x: tf.Tensor, opts?: O, condition?: tf.Tensor): R {
    const shifted = shiftTokens(x, this.shifts, opts?.mask);
    try {
      return this.fn.forward(shifted, opts, condition);
    } finally {
      if (shifted !== x) shifted.dispose();
    }
  }
}

/** x: [b, n, dim] -> [b, n, dim], see `ShiftTokens`. */
export function shiftTokens(x: tf.Tensor, shifts: number[], mask?: tf.Tensor): tf.Tensor {
  return tf.tidy(() => {
    const dim = x.shape[2]!;
    const n = x.shape[1]!;
    const segments = shifts.length;
    const per = Math.floor(dim / segments);
    const parts: tf.Tensor[] = [];
    for (let i = 0; i < segments; i++) {
      let seg = tf.slice(x, [0, 0, i * per], [-1, -1, per]);
      const amount = Math.min(shifts[i]!, n);
      if (shifts[i] === 0) {
        parts.push(seg);
        continue;
      }
      if (mask) seg = tf.where(tf.expandDims(mask, -1), seg, tf.zerosLike(seg));
      if (amount > 0) {
        seg = tf.slice(padAt(seg, 1, amount, 0), [0, 0, 0], [-1, n, -1]);
      } else {
        const a = Math.min(-amount, n);
        seg = tf.slice(padAt(seg, 1, 0, a), [0, a, 0], [-1, n, -1]);
      }
      parts.push(seg);
    }
    if (per * segments < dim) parts.push(tf.slice(x, [0, 0, per * segments], [-1, -1, -1]));
    return tf.concat(parts, -1);
  });
}

/**
 * DiT's ada-LN-zero gate: multiplies a branch's output by sigmoid(to_gamma(condition)), with
 * `to_gamma` Linear(dimCondition, dim) initialised to weight 0, bias `initBiasValue` (-2).
 */
export class AdaptiveLayerScale<O, R extends BranchOut> extends Module implements Callable<O, R> {
  fn: Module & Callable<O, R>;
  toGamma: Linear;
  constructor(fn: Module & Callable<O, R>, dim: number, dimCondition = dim, initBiasValue = -2) {
    super();
    this.fn = this.registerModule('fn', fn);
    this.toGamma = this.registerModule('to_gamma', new Linear(dimCondition, dim));
    tf.tidy(() => {
      this.toGamma.weight.assign(tf.zerosLike(this.toGamma.weight));
      this.toGamma.bias!.assign(tf.fill([dim], initBiasValue));
    });
  }

  /** x: [b, n, dim], condition: [b, dimCondition] or [b, n, dimCondition] (required). */
  forward(x: tf.Tensor, opts?: O, condition?: tf.Tensor): R {
    if (!condition)
      throw new Error('condition: expected a tensor for the adaptive layerscale, got undefined');
    const r = this.fn.forward(x, opts, condition);
    return mapOut(r, (t) => {
      const y = tf.tidy(() => {
        const c = condition.rank === 2 ? tf.expandDims(condition, 1) : condition;
        return tf.mul(t, tf.sigmoid(this.toGamma.forward(c)));
      });
      t.dispose();
      return y;
    });
  }
}
