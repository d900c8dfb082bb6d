import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../../src/nn/module.js';
import { Rng } from '../../src/utils/random.js';

/**
 * A tiny next-token model for training tests: embedding -> tanh hidden -> logits, with a LayerNorm-like
 * gain and a bias (to exercise the no-decay rule), and the shifted cross-entropy loss of
 * forward(x: [b, n + 1]).
 */
export class TinyLm extends Module {
  readonly emb: tf.Variable;
  readonly w: tf.Variable;
  readonly b: tf.Variable;
  readonly gamma: tf.Variable;
  readonly out: tf.Variable;

  constructor(
    readonly numTokens: number,
    dim: number,
    seed = 1,
  ) {
    super();
    const rng = new Rng(seed);
    const init = (shape: number[], std: number): tf.Tensor =>
      tf.tensor(
        rng.fillNormal(
          shape.reduce((a, c) => a * c, 1),
          0,
          std,
        ),
        shape,
      );
    this.emb = this.registerParameter('token_emb', init([numTokens, dim], 0.5));
    this.w = this.registerParameter('proj_weight', init([dim, dim], 0.3));
    this.b = this.registerParameter('proj_bias', tf.zeros([dim]));
    this.gamma = this.registerParameter('norm_gamma', tf.ones([dim]));
    this.out = this.registerParameter('to_logits_weight', init([dim, numTokens], 0.3));
  }

  logits(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const e = tf.gather(this.emb, x);
      const h = tf.mul(
        tf.tanh(tf.add(tf.matMul(tf.reshape(e, [-1, e.shape[2]!]), this.w), this.b)),
        this.gamma,
      );
      return tf.reshape(tf.matMul(h, this.out), [x.shape[0]!, x.shape[1]!, this.numTokens]);
    });
  }

  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const n = x.shape[1]! - 1;
      const inp = tf.slice(x, [0, 0], [-1, n]);
      const tgt = tf.slice(x, [0, 1], [-1, n]);
      const logits = tf.reshape(this.logits(inp), [-1, this.numTokens]);
      const logp = tf.logSoftmax(logits);
      const oh = tf.oneHot(tf.reshape(tgt, [-1]), this.numTokens);
      return tf.neg(tf.mean(tf.sum(tf.mul(logp, oh), -1)));
    });
  }
}

/** A token stream with structure a model can learn: repeated noisy counting. */
export function countingTokens(n: number, vocab: number, seed = 3): Int32Array {
  const rng = new Rng(seed);
  const out = new Int32Array(n);
  let v = 0;
  for (let i = 0; i < n; i++) {
    v = rng.random() < 0.1 ? rng.int(0, vocab) : (v + 1) % vocab;
    out[i] = v;
  }
  return out;
}
