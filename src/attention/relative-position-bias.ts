import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { getRng } from '../utils/random.js';
import type { PositionBias } from './types.js';
import { embeddingLookup } from '../nn/embedding.js';

/** Options of `RelativePositionBias` (the reference's kwargs in camelCase). */
export interface RelativePositionBiasOptions {
  causal: boolean;
  numBuckets: number;
  maxDistance: number;
  heads: number;
}

export const relativePositionBiasDefaults: RelativePositionBiasOptions = {
  causal: false,
  numBuckets: 32,
  maxDistance: 128,
  heads: 8,
};

/** A learned lookup table `weight` [numBuckets, heads] (nn.Embedding, normal init). */
class BucketTable extends Module {
  readonly weight: tf.Variable;
  constructor(buckets: number, heads: number) {
    super();
    this.weight = this.registerParameter(
      'weight',
      tf.tensor2d(getRng().fillNormal(buckets * heads, 0, 1), [buckets, heads]),
    );
  }
}

/**
 * The T5 bucket of a relative position (key - query), as the reference computes it in float32:
 * exact buckets for small distances, logarithmic ones up to maxDistance; bidirectional buckets
 * use half of the buckets for each direction.
 */
export function relativePositionBucket(
  relativePosition: number,
  causal: boolean,
  numBuckets: number,
  maxDistance: number,
): number {
  let ret = 0;
  let n = -relativePosition;
  let nb = numBuckets;
  if (!causal) {
    nb = Math.floor(nb / 2);
    if (n < 0) ret += nb;
    n = Math.abs(n);
  } else {
    n = Math.max(n, 0);
  }
  const maxExact = Math.floor(nb / 2);
  if (n < maxExact) return ret + n;
  const f = Math.fround;
  const ratio = f(f(Math.log(f(n / maxExact))) / Math.log(maxDistance / maxExact));
  const large = maxExact + Math.trunc(f(ratio * (nb - maxExact)));
  return ret + Math.min(large, nb - 1);
}

/**
 * T5 relative position bias: a learned scalar per (bucket, head), times `scale`.
 * Parameter: `relative_attention_bias.weight` [numBuckets, heads].
 */
export class RelativePositionBias extends Module implements PositionBias {
  readonly scale: number;
  readonly options: RelativePositionBiasOptions;
  readonly relativeAttentionBias: BucketTable;

  /** scale: multiplies the bias (the reference passes dimHead ** 0.5). */
  constructor(scale: number, options: Partial<RelativePositionBiasOptions> = {}) {
    super();
    const o = { ...relativePositionBiasDefaults, ...options };
    for (const key of ['numBuckets', 'maxDistance', 'heads'] as const) {
      if (!Number.isInteger(o[key]) || o[key] <= 0)
        throw new Error(`${key}: expected a positive integer, got ${o[key]}`);
    }
    if (o.numBuckets > o.maxDistance)
      throw new Error(`numBuckets: expected at most maxDistance (${o.maxDistance}), got ${o.numBuckets}`);
    this.scale = scale;
    this.options = o;
    this.relativeAttentionBias = this.registerModule(
      'relative_attention_bias',
      new BucketTable(o.numBuckets, o.heads),
    );
  }

  /** [heads, i, j] for queries at key positions j - i .. j - 1 against keys 0 .. j - 1. */
  bias(i: number, j: number): tf.Tensor {
    if (!(Number.isInteger(i) && Number.isInteger(j) && i > 0 && j >= i))
      throw new Error(`i: expected integers 0 < i <= j, got i=${i}, j=${j}`);
    const { causal, numBuckets, maxDistance } = this.options;
    const buckets = new Int32Array(i * j);
    for (let r = 0; r < i; r++) {
      const qPos = j - i + r;
      for (let c = 0; c < j; c++) {
        buckets[r * j + c] = relativePositionBucket(c - qPos, causal, numBuckets, maxDistance);
      }
    }
    return tf.tidy(() => {
      const idx = tf.tensor2d(buckets, [i, j], 'int32');
      const values = embeddingLookup(this.relativeAttentionBias.weight, idx); // [i, j, h]
      return tf.mul(tf.transpose(values, [2, 0, 1]), this.scale);
    });
  }
}
