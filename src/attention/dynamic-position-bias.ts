import * as tf from '@tensorflow/tfjs-core';
import { Module, ModuleList } from '../nn/module.js';
import { Linear } from '../nn/linear.js';
import { LayerNorm } from '../nn/norms.js';
import type { PositionBias } from './types.js';
import { embeddingLookup } from '../nn/embedding.js';

/** Options of `DynamicPositionBias` (the reference's kwargs in camelCase). */
export interface DynamicPositionBiasOptions {
  heads: number;
  /** Number of hidden layers of the MLP (>= 1). */
  depth: number;
  /** Feed sign(d) * log(|d| + 1) instead of the distance d. */
  logDistance: boolean;
  /** LayerNorm after each hidden Linear. */
  norm: boolean;
}

export const dynamicPositionBiasDefaults: DynamicPositionBiasOptions = {
  heads: 8,
  depth: 2,
  logDistance: false,
  norm: false,
};

/** torch's nn.LayerNorm(dim) with `weight` and `bias` (eps 1e-5). */
class AffineLayerNorm extends Module {
  readonly weight: tf.Variable;
  readonly bias: tf.Variable;
  constructor(dim: number) {
    super();
    this.weight = this.registerParameter('weight', tf.ones([dim]));
    this.bias = this.registerParameter('bias', tf.zeros([dim]));
  }
  /** x: [..., dim]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const { mean, variance } = tf.moments(x, -1, true);
      const normed = tf.mul(tf.sub(x, mean), tf.rsqrt(tf.add(variance, 1e-5)));
      return tf.add(tf.mul(normed, this.weight), this.bias);
    });
  }
}

/** nn.Sequential(Linear, [norm], SiLU) with the reference's indices ('0', '1'). */
class HiddenLayer extends Module {
  readonly linear: Linear;
  readonly norm: { forward(x: tf.Tensor): tf.Tensor } | null = null;
  constructor(inDim: number, dim: number, norm: 'gamma' | 'affine' | null) {
    super();
    this.linear = this.registerModule('0', new Linear(inDim, dim));
    if (norm === 'gamma') this.norm = this.registerModule('1', new LayerNorm(dim));
    else if (norm === 'affine') this.norm = this.registerModule('1', new AffineLayerNorm(dim));
  }
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      let y = this.linear.forward(x);
      if (this.norm) y = this.norm.forward(y);
      return tf.mul(y, tf.sigmoid(y));
    });
  }
}

/**
 * Dynamic position bias: a small MLP maps each relative distance to one bias per head.
 * Parameters: mlp.0.0 (Linear(1, dim)), [mlp.0.1.gamma], mlp.k.0 (Linear(dim, dim)),
 * [mlp.k.1.weight/bias], mlp.depth (Linear(dim, heads)).
 */
export class DynamicPositionBias extends Module implements PositionBias {
  readonly options: DynamicPositionBiasOptions;
  readonly mlp: ModuleList;
  private readonly hidden: HiddenLayer[] = [];
  private readonly last: Linear;

  /** dim: hidden size of the MLP. */
  constructor(dim: number, options: Partial<DynamicPositionBiasOptions> = {}) {
    super();
    const o = { ...dynamicPositionBiasDefaults, ...options };
    if (!Number.isInteger(dim) || dim <= 0) throw new Error(`dim: expected a positive integer, got ${dim}`);
    if (!Number.isInteger(o.depth) || o.depth < 1)
      throw new Error(`depth: expected an integer >= 1, got ${o.depth}`);
    if (!Number.isInteger(o.heads) || o.heads <= 0)
      throw new Error(`heads: expected a positive integer, got ${o.heads}`);
    this.options = o;
    this.mlp = this.registerModule('mlp', new ModuleList());
    this.hidden.push(this.mlp.push(new HiddenLayer(1, dim, o.norm ? 'gamma' : null)) as HiddenLayer);
    for (let d = 1; d < o.depth; d++)
      this.hidden.push(this.mlp.push(new HiddenLayer(dim, dim, o.norm ? 'affine' : null)) as HiddenLayer);
    this.last = this.mlp.push(new Linear(dim, o.heads)) as Linear;
  }

  /**
   * [heads, i, j] for queries at key positions j - i .. j - 1 against keys 0 .. j - 1 (the
   * reference handles i = j only; a shorter query block, as in cached decoding, takes the last rows).
   */
  bias(i: number, j: number): tf.Tensor {
    if (!(Number.isInteger(i) && Number.isInteger(j) && i > 0 && j >= i))
      throw new Error(`i: expected integers 0 < i <= j, got i=${i}, j=${j}`);
    return tf.tidy(() => {
      let pos: tf.Tensor = tf.reshape(tf.range(-j + 1, j, 1, 'float32'), [2 * j - 1, 1]);
      if (this.options.logDistance) pos = tf.mul(tf.sign(pos), tf.log(tf.add(tf.abs(pos), 1)));
      for (const layer of this.hidden) pos = layer.forward(pos);
      pos = this.last.forward(pos); // [2j - 1, h]
      const q = tf.reshape(tf.range(j - i, j, 1, 'int32'), [i, 1]);
      const k = tf.reshape(tf.range(0, j, 1, 'int32'), [1, j]);
      const idx = tf.add(tf.sub(q, k), tf.scalar(j - 1, 'int32')); // [i, j]
      return tf.transpose(embeddingLookup(pos, idx), [2, 0, 1]);
    });
  }
}
