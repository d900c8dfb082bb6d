import * as tf from '@tensorflow/tfjs-core';
import { Module } from './module.js';
import { normalize } from './functional.js';

/** Options shared by the reference's norms. */
export interface NormOptions {
  /** gamma is stored minus one (initialised 0) and 1 is added back on use. */
  unitOffset?: boolean;
}

/** A norm over the last axis: x: [..., dim] -> [..., dim]. */
export interface Norm extends Module {
  forward(x: tf.Tensor): tf.Tensor;
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
      const { mean, variance } = tf.moments(x, -1, true);
      const normed = tf.mul(tf.sub(x, mean), tf.rsqrt(tf.add(variance, 1e-5)));
      return tf.mul(normed, this.unitOffset ? tf.add(this.gamma, 1) : this.gamma);
    });
  }
}

/** RMSNorm: normalize(x) * sqrt(dim) * `g` [dim]. */
export class RMSNorm extends Module implements Norm {
  readonly unitOffset: boolean;
  readonly scale: number;
  g: tf.Variable;
  constructor(
    readonly dim: number,
    options: NormOptions = {},
  ) {
    super();
    this.unitOffset = options.unitOffset ?? false;
    this.scale = dim ** 0.5;
    this.g = this.registerParameter('g', tf.fill([dim], this.unitOffset ? 0 : 1));
  }

  /** x: [..., dim]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() =>
      tf.mul(tf.mul(normalize(x), this.scale), this.unitOffset ? tf.add(this.g, 1) : this.g),
    );
  }
}

/** ScaleNorm: normalize(x) * sqrt(dim) * `g` [1]. */
export class ScaleNorm extends Module implements Norm {
  readonly unitOffset: boolean;
  readonly scale: number;
  g: tf.Variable;
  constructor(
    readonly dim: number,
    options: NormOptions = {},
  ) {
    super();
    this.unitOffset = options.unitOffset ?? false;
    this.scale = dim ** 0.5;
    this.g = this.registerParameter('g', tf.fill([1], this.unitOffset ? 0 : 1));
  }

  /** x: [..., dim]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() =>
      tf.mul(tf.mul(normalize(x), this.scale), this.unitOffset ? tf.add(this.g, 1) : this.g),
    );
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

export type NormKind = 'layernorm' | 'rmsnorm' | 'scalenorm' | 'simple_rmsnorm';

/** Builds the norm of a kind. */
export function makeNorm(kind: NormKind, dim: number, options: NormOptions = {}): Norm {
  switch (kind) {
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
