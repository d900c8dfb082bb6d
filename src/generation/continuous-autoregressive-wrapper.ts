/**
 * Autoregressive training and generation over continuous vectors (the reference's
 * ContinuousAutoregressiveWrapper): predict x[:, 1:] from x[:, :-1] with a mean-squared error.
 */
import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { checkTensor } from '../utils/errors.js';
import { ensureGradients } from '../train/gradients.js';

await ensureGradients();

/** What the wrapper needs of its model (ContinuousTransformerWrapper). */
export interface ContinuousNet extends Module {
  readonly maxSeqLen: number;
  /** x: [b, n, dimIn] -> [b, n, dimOut] */
  forward(x: tf.Tensor, opts?: { mask?: tf.Tensor }): tf.Tensor;
}

export interface ContinuousAutoregressiveWrapperOptions {
  /**
   * With a mask and sequences of different lengths, weight every sequence the same (mean over its
   * positions first) instead of every position.
   */
  equalLossWeightBatch: boolean;
}

export const continuousAutoregressiveWrapperDefaults: ContinuousAutoregressiveWrapperOptions = {
  equalLossWeightBatch: false,
};

export class ContinuousAutoregressiveWrapper extends Module {
  readonly options: ContinuousAutoregressiveWrapperOptions;
  readonly maxSeqLen: number;
  net: ContinuousNet;

  constructor(net: ContinuousNet, options: Partial<ContinuousAutoregressiveWrapperOptions> = {}) {
    super();
    for (const k of Object.keys(options)) {
      if (!(k in continuousAutoregressiveWrapperDefaults)) {
        throw new Error(`${k}: unknown ContinuousAutoregressiveWrapper option`);
      }
    }
    this.options = { ...continuousAutoregressiveWrapperDefaults, ...options };
    if (typeof this.options.equalLossWeightBatch !== 'boolean') {
      throw new Error(
        `equalLossWeightBatch: expected a boolean, got ${String(this.options.equalLossWeightBatch)}`,
      );
    }
    this.maxSeqLen = net.maxSeqLen;
    this.net = this.registerModule('net', net);
  }

  /**
   * x: [b, n + 1, d] float32 -> scalar MSE of the predictions of x[:, 1:]. mask: [b, n + 1] or
   * [b, n] bool (true = real position); masked-out positions are left out of the mean.
   */
  forward(x: tf.Tensor, opts: { mask?: tf.Tensor } = {}): tf.Scalar {
    checkTensor('x', x, { rank: 3, dtype: 'float32', desc: '[batch, seq + 1, dim]' });
    const [b, seq, d] = x.shape as [number, number, number];
    if (seq < 2) throw new Error(`x: expected at least 2 positions (inputs and shifted targets), got ${seq}`);
    const n = seq - 1;
    let mask = opts.mask;
    if (mask) {
      checkTensor('mask', mask, { rank: 2, dtype: 'bool', desc: '[batch, seq + 1] or [batch, seq]' });
      if (mask.shape[0] !== b || (mask.shape[1] !== seq && mask.shape[1] !== n)) {
        throw new Error(`mask: expected shape [${b}, ${seq}] or [${b}, ${n}], got [${mask.shape}]`);
      }
    }
    return tf.tidy(() => {
      const inp = tf.slice(x, [0, 0, 0], [b, n, d]);
      const target = tf.slice(x, [0, 1, 0], [b, n, d]);
      if (mask && mask.shape[1] === seq) mask = tf.slice(mask, [0, 0], [b, n]);
      const out = this.net.forward(inp, mask ? { mask } : {});
      if (out.shape.join() !== target.shape.join()) {
        throw new Error(
          `net: expected outputs of shape [${target.shape}] to match the targets, got [${out.shape}]`,
        );
      }
      const loss = tf.square(tf.sub(out, target)); // [b, n, d]
      if (!mask) return tf.mean(loss) as tf.Scalar;
      const m = tf.cast(mask, 'float32'); // [b, n]
      const masked = tf.mul(loss, tf.expandDims(m, -1));
      if (this.options.equalLossWeightBatch) {
        // per sequence: sum over its positions and dims / number of its positions, then the batch mean
        const perSeq = tf.div(tf.sum(masked, [1, 2]), tf.maximum(tf.sum(m, 1), 1));
        return tf.mean(perSeq) as tf.Scalar;
      }
      // mean over the kept positions' elements
      return tf.div(tf.sum(masked), tf.mul(tf.sum(m), d)) as tf.Scalar;
    });
  }

  /**
   * Appends `seqLen` predicted vectors to `startTokens` ([b, t, d], or [t, d]), each from the last
   * maxSeqLen positions. Returns only the new vectors: [b, seqLen, d] (or [seqLen, d]).
   */
  async generate(startTokens: tf.Tensor, seqLen: number): Promise<tf.Tensor> {
    checkTensor('startTokens', startTokens, { dtype: 'float32' });
    if (startTokens.rank !== 2 && startTokens.rank !== 3) {
      throw new Error(
        `startTokens: expected shape [batch, seq, dim] or [seq, dim], got [${startTokens.shape}]`,
      );
    }
    if (!Number.isInteger(seqLen) || seqLen < 1)
      throw new Error(`seqLen: expected a positive integer, got ${seqLen}`);
    const rank2 = startTokens.rank === 2;
    const wasTraining = this.net.training;
    this.net.eval();
    let out = rank2 ? tf.expandDims(startTokens, 0) : startTokens.clone();
    const t = out.shape[1]!;
    try {
      for (let i = 0; i < seqLen; i++) {
        const next = tf.tidy(() => {
          const len = out.shape[1]!;
          const start = this.maxSeqLen > 0 ? Math.max(0, len - this.maxSeqLen) : 0;
          const x = tf.slice(out, [0, start, 0], [-1, len - start, -1]);
          const y = this.net.forward(x);
          const last = tf.slice(y, [0, y.shape[1]! - 1, 0], [-1, 1, -1]);
          return tf.concat([out, last], 1);
        });
        out.dispose();
        out = next;
      }
      const res = tf.tidy(() => {
        const fresh = tf.slice(out, [0, t, 0], [-1, seqLen, -1]);
        return rank2 ? tf.squeeze(fresh, [0]) : fresh;
      });
      return res;
    } finally {
      out.dispose();
      this.net.train(wasTraining);
    }
  }
}
