import * as tf from '@tensorflow/tfjs-core';
import { Module } from './module.js';
import { getRng } from '../utils/random.js';

/** Options of the residual connections. */
export interface ResidualOptions {
  /** A learned per-feature scale of the residual (`residual_scale` [dim], init 1). */
  scaleResidual?: boolean;
  /** A constant multiplier of the residual. */
  scaleResidualConstant?: number;
}

/** How a branch's output is merged back into the stream. */
export interface ResidualFn extends Module {
  /** out: [b, n, dim] (branch output), residual: [b, n, dim] -> [b, n, dim]. */
  forward(out: tf.Tensor, residual: tf.Tensor): tf.Tensor;
}

/** out + residual (* `residual_scale`) (* constant). */
export class Residual extends Module implements ResidualFn {
  residualScale: tf.Variable | null = null;
  readonly scaleResidualConstant: number;
  constructor(dim: number, options: ResidualOptions = {}) {
    super();
    if (options.scaleResidual) this.residualScale = this.registerParameter('residual_scale', tf.ones([dim]));
    this.scaleResidualConstant = options.scaleResidualConstant ?? 1;
  }

  forward(out: tf.Tensor, residual: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      let r = residual;
      if (this.residualScale) r = tf.mul(r, this.residualScale);
      if (this.scaleResidualConstant !== 1) r = tf.mul(r, this.scaleResidualConstant);
      return tf.add(out, r);
    });
  }
}

/**
 * GRU-gated residual: a GRUCell (`gru.weight_ih` [3d, d], `gru.weight_hh` [3d, d], `gru.bias_ih`,
 * `gru.bias_hh` [3d], gates ordered r, z, n as torch) with the branch output as input and the
 * residual as hidden state.
 */
export class GRUGating extends Module implements ResidualFn {
  gru: GRUCell;
  residualScale: tf.Variable | null = null;
  constructor(dim: number, options: ResidualOptions = {}) {
    super();
    this.gru = this.registerModule('gru', new GRUCell(dim, dim));
    if (options.scaleResidual) this.residualScale = this.registerParameter('residual_scale', tf.ones([dim]));
  }

  forward(out: tf.Tensor, residual: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const r = this.residualScale ? tf.mul(residual, this.residualScale) : residual;
      const d = out.shape[out.rank - 1];
      const h = this.gru.forward(tf.reshape(out, [-1, d]), tf.reshape(r, [-1, d]));
      return tf.reshape(h, out.shape);
    });
  }
}

/** torch.nn.GRUCell, initialised uniform in +-1/sqrt(hidden). */
export class GRUCell extends Module {
  weightIh: tf.Variable;
  weightHh: tf.Variable;
  biasIh: tf.Variable;
  biasHh: tf.Variable;
  constructor(
    readonly inputSize: number,
    readonly hiddenSize: number,
  ) {
    super();
    const rng = getRng();
    const k = 1 / Math.sqrt(hiddenSize);
    const u = (n: number) => rng.fillUniform(n, -k, k);
    this.weightIh = this.registerParameter(
      'weight_ih',
      tf.tensor2d(u(3 * hiddenSize * inputSize), [3 * hiddenSize, inputSize]),
    );
    this.weightHh = this.registerParameter(
      'weight_hh',
      tf.tensor2d(u(3 * hiddenSize * hiddenSize), [3 * hiddenSize, hiddenSize]),
    );
    this.biasIh = this.registerParameter('bias_ih', tf.tensor1d(u(3 * hiddenSize)));
    this.biasHh = this.registerParameter('bias_hh', tf.tensor1d(u(3 * hiddenSize)));
  }

  /** x: [N, input], h: [N, hidden] -> [N, hidden]. */
  forward(x: tf.Tensor, h: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const gi = tf.add(tf.matMul(x, this.weightIh, false, true), this.biasIh);
      const gh = tf.add(tf.matMul(h, this.weightHh, false, true), this.biasHh);
      const [ir, iz, inn] = tf.split(gi, 3, -1);
      const [hr, hz, hn] = tf.split(gh, 3, -1);
      const r = tf.sigmoid(tf.add(ir, hr));
      const z = tf.sigmoid(tf.add(iz, hz));
      const n = tf.tanh(tf.add(inn, tf.mul(r, hn)));
      return tf.add(tf.mul(tf.sub(1, z), n), tf.mul(z, h));
    });
  }
}
