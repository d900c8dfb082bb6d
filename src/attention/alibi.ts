import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { fmtShape } from '../utils/errors.js';
import type { PositionBias } from './types.js';

/** The ALiBi head slopes of the paper (geometric; interleaved for a non-power-of-two count). */
export function alibiSlopes(heads: number): number[] {
  const powerOf2 = (n: number): number[] => {
    const start = 2 ** -(2 ** -(Math.log2(n) - 3));
    return Array.from({ length: n }, (_, i) => start * start ** i);
  };
  if (Number.isInteger(Math.log2(heads))) return powerOf2(heads);
  const closest = 2 ** Math.floor(Math.log2(heads));
  const extra = powerOf2(2 * closest).filter((_, i) => i % 2 === 0);
  return [...powerOf2(closest), ...extra.slice(0, heads - closest)];
}

/**
 * ALiBi: bias = -|key pos - query pos| * slope per head; the first `heads` of `totalHeads` heads get
 * a slope, the rest a zero bias. Distances are symmetric, so it also serves bidirectional attention.
 * Buffer (not persistent, as the reference): `slopes` [heads, 1, 1].
 */
export class AlibiPositionalBias extends Module implements PositionBias {
  readonly heads: number;
  readonly totalHeads: number;

  /** heads: heads with a slope; totalHeads: all heads (default heads); slopes: custom slopes. */
  constructor(heads: number, options: { totalHeads?: number | null; slopes?: number[] | null } = {}) {
    super();
    if (!Number.isInteger(heads) || heads <= 0)
      throw new Error(`heads: expected a positive integer, got ${heads}`);
    const total = options.totalHeads ?? heads;
    if (!Number.isInteger(total) || total < heads)
      throw new Error(`totalHeads: expected an integer >= heads (${heads}), got ${total}`);
    const slopes = options.slopes ?? alibiSlopes(heads);
    if (slopes.length !== heads) throw new Error(`slopes: expected ${heads} values, got ${slopes.length}`);
    this.heads = heads;
    this.totalHeads = total;
    this.registerBuffer('slopes', tf.tensor3d(slopes, [heads, 1, 1]), false);
  }

  get slopes(): tf.Tensor {
    return this.getBuffer('slopes');
  }

  private finish(negDist: tf.Tensor): tf.Tensor {
    const bias = tf.mul(negDist, this.slopes);
    const missing = this.totalHeads - this.heads;
    if (missing === 0) return bias;
    const axis = bias.rank - 3;
    const pads = bias.shape.map((): [number, number] => [0, 0]);
    pads[axis] = [0, missing];
    return tf.pad(bias, pads);
  }

  /** [totalHeads, i, j] for queries at key positions j - i .. j - 1 against keys 0 .. j - 1. */
  bias(i: number, j: number): tf.Tensor {
    if (!(Number.isInteger(i) && Number.isInteger(j) && i > 0 && j >= i))
      throw new Error(`i: expected integers 0 < i <= j, got i=${i}, j=${j}`);
    return tf.tidy(() => {
      const q = tf.reshape(tf.range(j - i, j, 1, 'float32'), [1, i, 1]);
      const k = tf.reshape(tf.range(0, j, 1, 'float32'), [1, 1, j]);
      return this.finish(tf.neg(tf.abs(tf.sub(k, q))));
    });
  }

  /**
   * Custom positions. posI: [i] or [b, i]; posJ: [j] or [b, j] (default posI) ->
   * [totalHeads, i, j] or [b, totalHeads, i, j].
   */
  biasFromPositions(posI: tf.Tensor, posJ?: tf.Tensor): tf.Tensor {
    const pj = posJ ?? posI;
    if ((posI.rank !== 1 && posI.rank !== 2) || pj.rank !== posI.rank)
      throw new Error(
        `pos: expected [n] or [b, n] positions, got ${fmtShape(posI.shape)} and ${fmtShape(pj.shape)}`,
      );
    return tf.tidy(() => {
      const qi = tf.expandDims(tf.cast(posI, 'float32'), -1);
      const kj = tf.expandDims(tf.cast(pj, 'float32'), -2);
      const negDist = tf.neg(tf.abs(tf.sub(kj, qi))); // [i, j] or [b, i, j]
      return this.finish(tf.expandDims(negDist, negDist.rank === 3 ? 1 : 0));
    });
  }
}
