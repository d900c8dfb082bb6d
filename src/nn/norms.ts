import * as tf from '@tensorflow/tfjs-core';
import { Module } from './module.js';
import { normalize } from './functional.js';
import { Linear } from './linear.js';
import { fusedLayerNorm } from './fused.js';

/** Options shared by the reference's norms. */
export interface NormOptions {
  /** gamma is stored minus one (initialised 0) and 1 is added back on use. */
  unitOffset?: boolean;
}

/**
 * A norm over the last axis: x: [..., dim] -> [..., dim]. Adaptive norms also take a condition
 * [b, dimCondition] or [b, n, dimCondition]; the others ignore it.
 */
export interface Norm extends Module {
  forward(x: tf.Tensor, condition?: tf.Tensor): tf.Tensor;
}

/**
 * (x - mean) / sqrt(var + 1e-5) over the last axis (biased variance): tf.moments and the reference's
 * order of operations without moments' value-preserving cast and reshape. x - mean is computed twice
 * on purpose: the gradient then accumulates in the same order as through tf.moments, so the
 * gradients keep the same numbers too. x: [..., dim] float32.
 */
function standardize(x: tf.Tensor): tf.Tensor {
  const mean = tf.mean(x, -1, true);
  const variance = tf.mean(tf.square(tf.sub(x, mean)), -1, true);
  return tf.mul(tf.sub(x, mean), tf.rsqrt(tf.add(variance, 1e-5)));
}

/** Bias-less LayerNorm (eps 1e-5) with a learned `gamma` [dim]. */
export class LayerNorm extends Module implements Norm {
  readonly unitOffset: boolean;
  gamma: tf.Variable;
  constructor(
    readonly dim: number,
    options: NormOptions = {},
  ) {
    super();
    this.unitOffset = options.unitOffset ?? false;
    this.gamma = this.registerParameter('gamma', tf.fill([dim], this.unitOffset ? 0 : 1));
  }

  /** x: [..., dim]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const fused = fusedLayerNorm(x, this.gamma, 1e-5, this.unitOffset ? 1 : 0);
      if (fused) return fused;
      const normed = standardize(x);
      return tf.mul(normed, this.unitOffset ? tf.add(this.gamma, 1) : this.gamma);
    });
  }
}

/** normalize(x) * sqrt(dim) * `g`, with `g` of shape [dim] (RMSNorm) or [1] (ScaleNorm). */
abstract class GainNorm extends Module implements Norm {
  readonly unitOffset: boolean;
  readonly scale: number;
  g: tf.Variable;
  constructor(
    readonly dim: number,
    options: NormOptions,
    gainSize: number,
  ) {
    super();
    this.unitOffset = options.unitOffset ?? false;
    this.scale = dim ** 0.5;
    this.g = this.registerParameter('g', tf.fill([gainSize], this.unitOffset ? 0 : 1));
  }

  /** x: [..., dim]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() =>
      tf.mul(tf.mul(normalize(x), this.scale), this.unitOffset ? tf.add(this.g, 1) : this.g),
    );
  }
}

/** RMSNorm: normalize(x) * sqrt(dim) * `g` [dim]. */
export class RMSNorm extends GainNorm {
  constructor(dim: number, options: NormOptions = {}) {
    super(dim, options, dim);
  }
}

/** ScaleNorm: normalize(x) * sqrt(dim) * `g` [1]. */
export class ScaleNorm extends GainNorm {
  constructor(dim: number, options: NormOptions = {}) {
    super(dim, options, 1);
  }
}

/** SimpleRMSNorm: normalize(x) * sqrt(dim), no parameters. */
export class SimpleRMSNorm extends Module implements Norm {
  readonly scale: number;
  constructor(
    readonly dim: number,
    _options: NormOptions = {},
  ) {
    super();
    this.scale = dim ** 0.5;
  }

  /** x: [..., dim]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => tf.mul(normalize(x), this.scale));
  }
}

/** condition: [b, d] -> [b, 1, d]; [b, n, d] unchanged. */
function conditionRank3(condition: tf.Tensor | undefined, name: string): tf.Tensor {
  if (!condition) throw new Error(`condition: expected a tensor for the adaptive ${name}, got undefined`);
  return condition.rank === 2 ? tf.expandDims(condition, 1) : condition;
}

/** LayerNorm without affine whose gain is (1 + to_gamma(condition)); `to_gamma.weight` [dim, dimCondition], zero init. */
export class AdaptiveLayerNorm extends Module implements Norm {
  toGamma: Linear;
  constructor(
    readonly dim: number,
    dimCondition = dim,
  ) {
    super();
    this.toGamma = this.registerModule('to_gamma', new Linear(dimCondition, dim, { bias: false }));
    tf.tidy(() => this.toGamma.weight.assign(tf.zerosLike(this.toGamma.weight)));
  }

  /** x: [b, n, dim], condition: [b, dimCondition] or [b, n, dimCondition]. */
  forward(x: tf.Tensor, condition?: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const c = conditionRank3(condition, 'layernorm');
      return tf.mul(standardize(x), tf.add(this.toGamma.forward(c), 1));
    });
  }
}

/** normalize(x) * sqrt(dim) * (1 + to_gamma(condition)); `to_gamma.weight` zero init. */
export class AdaptiveRMSNorm extends Module implements Norm {
  readonly scale: number;
  toGamma: Linear;
  constructor(
    readonly dim: number,
    dimCondition = dim,
  ) {
    super();
    this.scale = dim ** 0.5;
    this.toGamma = this.registerModule('to_gamma', new Linear(dimCondition, dim, { bias: false }));
    tf.tidy(() => this.toGamma.weight.assign(tf.zerosLike(this.toGamma.weight)));
  }

  /** x: [b, n, dim], condition: [b, dimCondition] or [b, n, dimCondition]. */
  forward(x: tf.Tensor, condition?: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const c = conditionRank3(condition, 'rmsnorm');
      return tf.mul(tf.mul(normalize(x), this.scale), tf.add(this.toGamma.forward(c), 1));
    });
  }
}

export type NormKind =
  'layernorm' | 'rmsnorm' | 'scalenorm' | 'simple_rmsnorm' | 'adaptive_layernorm' | 'adaptive_rmsnorm';

/** Builds the norm of a kind (adaptive kinds take `dimCondition`, default dim). */
export function makeNorm(
  kind: NormKind,
  dim: number,
  options: NormOptions & { dimCondition?: number } = {},
): Norm {
  switch (kind) {
    case 'adaptive_layernorm':
      return new AdaptiveLayerNorm(dim, options.dimCondition ?? dim);
    case 'adaptive_rmsnorm':
      return new AdaptiveRMSNorm(dim, options.dimCondition ?? dim);
    case 'rmsnorm':
      return new RMSNorm(dim, options);
    case 'scalenorm':
      return new ScaleNorm(dim, options);
    case 'simple_rmsnorm':
      return new SimpleRMSNorm(dim, options);
    default:
      return new LayerNorm(dim, options);
  }
}
