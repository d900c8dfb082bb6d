import * as tf from '@tensorflow/tfjs-core';
import { Module } from './module.js';
import { getRng, type Rng } from '../utils/random.js';
import { l2norm } from './functional.js';
import { normalTensor } from './init.js';

/** A lookup table `weight` [numEmbeddings, dim], initialised N(0, std) (torch default std 1). */
export class Embedding extends Module {
  readonly numEmbeddings: number;
  readonly dim: number;
  weight: tf.Variable;

  constructor(numEmbeddings: number, dim: number, options: { std?: number; rng?: Rng } = {}) {
    super();
    if (!Number.isInteger(numEmbeddings) || numEmbeddings <= 0)
      throw new Error(`numEmbeddings: expected a positive integer, got ${numEmbeddings}`);
    if (!Number.isInteger(dim) || dim <= 0) throw new Error(`dim: expected a positive integer, got ${dim}`);
    this.numEmbeddings = numEmbeddings;
    this.dim = dim;
    const rng = options.rng ?? getRng();
    this.weight = this.registerParameter(
      'weight',
      normalTensor(rng, [numEmbeddings, dim], 0, options.std ?? 1),
    );
  }

  /** ids: [...] int32 -> [..., dim]. */
  forward(ids: tf.Tensor): tf.Tensor {
    return embeddingLookup(this.weight, ids);
  }
}

/**
 * Rows of `weight` [V, d] at `ids` [...] -> [..., d]. Differentiable on every backend: where the
 * backend lacks UnsortedSegmentSum (gather's gradient; wasm), the weight gradient is computed as
 * oneHot(ids)^T dy instead (`viaOneHot` forces either path).
 */
export function embeddingLookup(weight: tf.Tensor, ids: tf.Tensor, viaOneHot?: boolean): tf.Tensor {
  return tf.tidy(() => {
    const idx = ids.dtype === 'int32' ? ids : tf.cast(ids, 'int32');
    const oneHotGrad = viaOneHot ?? !tf.getKernel('UnsortedSegmentSum', tf.getBackend());
    if (!oneHotGrad) return tf.gather(weight, idx);
    const lookup = tf.customGrad(((w: tf.Tensor, i: tf.Tensor, save: tf.GradSaveFunc) => {
      save([i]);
      return {
        value: tf.gather(w, i),
        gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
          const [v, d] = w.shape as [number, number];
          const flatIds = tf.reshape(saved[0]!, [-1]);
          const oneHot = tf.cast(tf.oneHot(flatIds, v), 'float32');
          const dw = tf.matMul(oneHot, tf.reshape(dy, [-1, d]), true, false);
          return [dw, tf.zerosLike(saved[0]!)];
        },
      };
    }) as unknown as Parameters<typeof tf.customGrad>[0]) as unknown as (
      w: tf.Tensor,
      i: tf.Tensor,
    ) => tf.Tensor;
    return lookup(weight, idx);
  });
}

/**
 * Token embedding (`emb.weight` [numTokens, dim]), kaiming-normal initialised as the reference
 * (std sqrt(2 / dim)), or N(0, 1e-5) with l2-normalised outputs when `l2normEmbed`.
 */
export class TokenEmbedding extends Module {
  readonly l2normEmbed: boolean;
  emb: Embedding;

  constructor(dim: number, numTokens: number, options: { l2normEmbed?: boolean; rng?: Rng } = {}) {
    super();
    this.l2normEmbed = options.l2normEmbed ?? false;
    const std = this.l2normEmbed ? 1e-5 : Math.sqrt(2 / dim);
    this.emb = this.registerModule('emb', new Embedding(numTokens, dim, { std, rng: options.rng }));
  }

  /** ids: [b, n] int32 -> [b, n, dim]. */
  forward(ids: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const e = this.emb.forward(ids);
      return this.l2normEmbed ? l2norm(e) : e;
    });
  }
}

/** Positions for a sequence: pos?: [n] (or [b, n]) int32, seqStartPos?: [b] int32. */
export interface PositionOptions {
  pos?: tf.Tensor;
  seqStartPos?: tf.Tensor;
}

/**
 * Learned absolute positions (`emb.weight` [maxSeqLen, dim]) scaled by dim^-0.5 (or l2-normalised
 * with scale 1 when `l2normEmbed`).
 */
export class AbsolutePositionalEmbedding extends Module {
  readonly maxSeqLen: number;
  readonly scale: number;
  readonly l2normEmbed: boolean;
  emb: Embedding;

  constructor(dim: number, maxSeqLen: number, options: { l2normEmbed?: boolean; rng?: Rng } = {}) {
    super();
    this.l2normEmbed = options.l2normEmbed ?? false;
    this.scale = this.l2normEmbed ? 1 : dim ** -0.5;
    this.maxSeqLen = maxSeqLen;
    this.emb = this.registerModule(
      'emb',
      new Embedding(maxSeqLen, dim, { std: this.l2normEmbed ? 1e-5 : 1, rng: options.rng }),
    );
  }

  /** seqLen: n -> [n, dim] (or [b, n, dim] with seqStartPos / batched pos). */
  forward(seqLen: number, options: PositionOptions = {}): tf.Tensor {
    if (seqLen > this.maxSeqLen) {
      throw new Error(
        `x: expected a sequence length of at most maxSeqLen ${this.maxSeqLen} (absolute positional embedding), got ${seqLen}`,
      );
    }
    return tf.tidy(() => {
      let pos: tf.Tensor = options.pos ?? tf.range(0, seqLen, 1, 'int32');
      if (options.seqStartPos) {
        pos = tf.maximum(tf.sub(pos, tf.expandDims(tf.cast(options.seqStartPos, 'int32'), -1)), 0);
      }
      const e = tf.mul(this.emb.forward(pos), this.scale);
      return this.l2normEmbed ? l2norm(e) : e;
    });
  }
}

/** Sinusoidal positions with one learned scale (`scale` [1], init dim^-0.5); `inv_freq` is not saved. */
export class ScaledSinusoidalEmbedding extends Module {
  scale: tf.Variable;
  invFreq: tf.Tensor;

  constructor(dim: number, theta = 10000) {
    super();
    if (dim % 2 !== 0) throw new Error(`dim: expected an even number for sinusoidal embedding, got ${dim}`);
    this.scale = this.registerParameter('scale', tf.fill([1], dim ** -0.5));
    const half = dim / 2;
    const inv = new Float32Array(half);
    for (let i = 0; i < half; i++) inv[i] = theta ** -(i / half);
    this.invFreq = this.registerBuffer('inv_freq', tf.tensor1d(inv), false);
  }

  /** seqLen: n -> [n, dim] (or [b, n, dim] with seqStartPos / batched pos). */
  forward(seqLen: number, options: PositionOptions = {}): tf.Tensor {
    return tf.tidy(() => {
      let pos: tf.Tensor = options.pos ?? tf.range(0, seqLen, 1, 'int32');
      if (options.seqStartPos) pos = tf.sub(pos, tf.expandDims(tf.cast(options.seqStartPos, 'int32'), -1));
      const emb = tf.mul(tf.expandDims(tf.cast(pos, 'float32'), -1), this.invFreq);
      return tf.mul(tf.concat([tf.sin(emb), tf.cos(emb)], -1), this.scale);
    });
  }
}
