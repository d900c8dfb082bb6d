import * as tf from '@tensorflow/tfjs-core';
import { Module } from './module.js';
import { getRng, type Rng } from '../utils/random.js';
import { uniformTensor } from './init.js';
import { backendHasKernel } from './fused.js';

/** Options of `Linear`. */
export interface LinearOptions {
  /** Adds a bias (default true). */
  bias?: boolean;
  /** Generator for the initial weights (default: the library generator). */
  rng?: Rng;
}

/**
 * y = x W^T + b, with `weight` [out, in] and `bias` [out] as torch's nn.Linear, initialised as torch
 * does: uniform in +-1/sqrt(in) for both.
 */
export class Linear extends Module {
  readonly inFeatures: number;
  readonly outFeatures: number;
  weight: tf.Variable;
  bias: tf.Variable | null = null;

  constructor(inFeatures: number, outFeatures: number, options: LinearOptions = {}) {
    super();
    if (!Number.isInteger(inFeatures) || inFeatures <= 0)
      throw new Error(`inFeatures: expected a positive integer, got ${inFeatures}`);
    if (!Number.isInteger(outFeatures) || outFeatures <= 0)
      throw new Error(`outFeatures: expected a positive integer, got ${outFeatures}`);
    this.inFeatures = inFeatures;
    this.outFeatures = outFeatures;
    const rng = options.rng ?? getRng();
    const bound = 1 / Math.sqrt(inFeatures);
    this.weight = this.registerParameter(
      'weight',
      uniformTensor(rng, [outFeatures, inFeatures], -bound, bound),
    );
    if (options.bias ?? true) {
      this.bias = this.registerParameter('bias', uniformTensor(rng, [outFeatures], -bound, bound));
    }
  }

  /** x: [..., in] -> [..., out]. */
  forward(x: tf.Tensor): tf.Tensor {
    return linear(x, this.weight, this.bias);
  }
}

/** dy of y = x W^T (+ b) -> [dx, dW(, db)], the ops TF.js's own gradients would run, in their order. */
function linearGrads(dy: tf.Tensor, x: tf.Tensor, w: tf.Tensor, withBias: boolean): tf.Tensor[] {
  // in a tidy: the engine runs a custom gradient outside one (its temporaries would otherwise live
  // until the whole backward pass ends)
  return tf.tidy(() => linearGradsImpl(dy, x, w, withBias));
}

function linearGradsImpl(dy: tf.Tensor, x: tf.Tensor, w: tf.Tensor, withBias: boolean): tf.Tensor[] {
  const [outF, inF] = w.shape as [number, number];
  const flat = x.rank > 2;
  const dx = tf.matMul(dy, w);
  const dw = flat
    ? tf.matMul(tf.reshape(dy, [-1, outF]), tf.reshape(x, [-1, inF]), true, false)
    : tf.matMul(dy, x, true, false);
  if (!withBias) return [dx, dw];
  const lead = Array.from({ length: dy.rank - 1 }, (_, i) => i);
  return [dx, dw, tf.reshape(tf.sum(dy, lead), [outF])];
}

/**
 * y = x W^T (+ b) for x: [..., in] (rank >= 2), W: [out, in], b: [out] as one broadcast matmul
 * (TF.js's matmul gradient does not reduce a broadcast operand, hence the explicit gradient). The
 * numbers are those of the flattened [-1, in] product, forward and backward; only x and W are kept
 * for the backward pass (not the product before the bias).
 */
const linearNoBias = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
  const [x, w, save] = args as [tf.Tensor, tf.Tensor, tf.GradSaveFunc];
  save([x, w]);
  return {
    value: tf.matMul(x, w, false, true),
    gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => linearGrads(dy, saved[0]!, saved[1]!, false),
  };
}) as (x: tf.Tensor, w: tf.Tensor) => tf.Tensor;

/**
 * A kernel a backend may register to run a biased linear layer as one step:
 *   XtLinear  inputs {x: float32 [..., in], w: float32 [out, in], bias: float32 [out]}
 *             output x W^T + bias: the product, then the bias added (the same numbers as those
 *             two ops)
 */
export const XT_LINEAR = 'XtLinear';

const linearBias = tf.customGrad((...args: (tf.Tensor | tf.GradSaveFunc)[]) => {
  const [x, w, b, save] = args as [tf.Tensor, tf.Tensor, tf.Tensor, tf.GradSaveFunc];
  save([x, w]);
  return {
    value: backendHasKernel(XT_LINEAR)
      ? (tf.engine().runKernel(XT_LINEAR, { x, w, bias: b }) as tf.Tensor)
      : tf.add(tf.matMul(x, w, false, true), b),
    gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => linearGrads(dy, saved[0]!, saved[1]!, true),
  };
}) as (x: tf.Tensor, w: tf.Tensor, b: tf.Tensor) => tf.Tensor;

/** x: [..., in], weight: [out, in], bias?: [out] -> [..., out]. */
export function linear(x: tf.Tensor, weight: tf.Tensor, bias: tf.Tensor | null = null): tf.Tensor {
  return tf.tidy(() => {
    const inF = weight.shape[1];
    if (x.shape[x.rank - 1] !== inF) {
      throw new Error(`x: expected last dimension ${inF}, got shape [${x.shape.join(', ')}]`);
    }
    if (x.rank >= 2 && x.dtype === 'float32' && weight.dtype === 'float32' && weight.rank === 2) {
      // one kernel instead of reshape, matmul, reshape
      return bias && bias.rank === 1 ? linearBias(x, weight, bias) : linearNoBias(x, weight);
    }
    const lead = x.shape.slice(0, -1);
    const flat = tf.reshape(x, [-1, inF]);
    let y: tf.Tensor = tf.matMul(flat, weight, false, true);
    if (bias) y = tf.add(y, bias);
    return tf.reshape(y, [...lead, weight.shape[0]]);
  });
}
