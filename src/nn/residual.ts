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

/** What `ResidualFn.prepare` returns: the branch input, the residual to merge into, extras. */
export interface PreparedResidual {
  /** branchInput: [b, n, dim]. */
  branchInput: tf.Tensor;
  /** residual: [b, n, dim] (or [b, n, streams, dim] for hyper-connections). */
  residual: tf.Tensor;
  /** Hyper-connections' per-stream output weights [b, n, streams]. */
  beta?: tf.Tensor;
}

/** How a branch's output is merged back into the stream. */
export interface ResidualFn extends Module {
  /** Splits the stream into the branch input and the residual (optional: both are the stream). */
  prepare?(x: tf.Tensor): PreparedResidual;
  /** out: [b, n, dim] (branch output), residual: as prepared -> the new stream. */
  forward(out: tf.Tensor, residual: tf.Tensor, beta?: tf.Tensor): tf.Tensor;
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

/**
 * Dynamic hyper-connections (arXiv 2409.19606, Algorithm 2) over `streams` residual streams, as the
 * reference's HyperConnection with V input views (1, or 3 with qkvReceiveDiffResiduals). The stream
 * is [(b * streams), n, dim] (batch-major). Parameters: `norm.weight` [dim] (bias-less LayerNorm),
 * `static_beta` [S], `static_alpha` [S, V + S], `dynamic_alpha_fn` [dim, S + V],
 * `dynamic_alpha_scale` [], `dynamic_beta_fn` [dim], `dynamic_beta_scale` [].
 */
export class HyperConnection extends Module implements ResidualFn {
  norm: BiasLessLayerNorm;
  staticBeta: tf.Variable;
  staticAlpha: tf.Variable;
  dynamicAlphaFn: tf.Variable;
  dynamicAlphaScale: tf.Variable;
  dynamicBetaFn: tf.Variable;
  dynamicBetaScale: tf.Variable;

  constructor(
    readonly dim: number,
    readonly layerIndex: number,
    readonly streams: number,
    readonly tanh = true,
    /** Branch inputs mixed from the streams (3: queries, keys and values of their own). */
    readonly views = 1,
  ) {
    super();
    if (typeof tanh !== 'boolean') throw new Error(`tanh: expected a boolean, got ${String(tanh)}`);
    this.norm = this.registerModule('norm', new BiasLessLayerNorm(dim));
    this.staticBeta = this.registerParameter('static_beta', tf.ones([streams]));
    const cols = streams + views;
    const alpha = new Float32Array(streams * cols);
    for (let v = 0; v < views; v++) alpha[(layerIndex % streams) * cols + v] = 1;
    for (let i = 0; i < streams; i++) alpha[i * cols + views + i] = 1;
    this.staticAlpha = this.registerParameter('static_alpha', tf.tensor2d(alpha, [streams, cols]));
    this.dynamicAlphaFn = this.registerParameter('dynamic_alpha_fn', tf.zeros([dim, cols]));
    this.dynamicAlphaScale = this.registerParameter('dynamic_alpha_scale', tf.scalar(1e-2));
    this.dynamicBetaFn = this.registerParameter('dynamic_beta_fn', tf.zeros([dim]));
    this.dynamicBetaScale = this.registerParameter('dynamic_beta_scale', tf.scalar(1e-2));
  }

  /**
   * x: [(b * S), n, dim] -> branch input [b, n, dim] (with several views [views, b, n, dim]),
   * residual [b, n, S, dim], beta [b, n, S].
   */
  prepare(x: tf.Tensor): PreparedResidual {
    const S = this.streams;
    const V = this.views;
    const [bs, n, d] = x.shape as [number, number, number];
    const b = bs / S;
    const act = (t: tf.Tensor) => (this.tanh ? tf.tanh(t) : t);
    const out = tf.tidy(() => {
      const r = tf.transpose(tf.reshape(x, [b, S, n, d]), [0, 2, 1, 3]); // [b, n, S, d]
      const normed = this.norm.forward(r);
      const wc = act(
        tf.reshape(tf.matMul(tf.reshape(normed, [-1, d]), this.dynamicAlphaFn), [b, n, S, S + V]),
      );
      const alpha = tf.add(tf.mul(wc, this.dynamicAlphaScale), this.staticAlpha); // [b, n, S, V + S]
      const dc = act(tf.sum(tf.mul(normed, this.dynamicBetaFn), -1)); // [b, n, S]
      const beta = tf.add(tf.mul(dc, this.dynamicBetaScale), this.staticBeta);
      const mix = tf.matMul(tf.transpose(alpha, [0, 1, 3, 2]), r); // [b, n, V + S, d]
      const views = tf.slice(mix, [0, 0, 0, 0], [-1, -1, V, -1]);
      const branchInput = V === 1 ? tf.squeeze(views, [2]) : tf.transpose(views, [2, 0, 1, 3]);
      const residual = tf.slice(mix, [0, 0, V, 0], [-1, -1, S, -1]);
      return [branchInput, residual, beta];
    });
    return { branchInput: out[0]!, residual: out[1]!, beta: out[2]! };
  }

  /** out: [b, n, dim], residual: [b, n, S, dim], beta: [b, n, S] -> [(b * S), n, dim]. */
  forward(out: tf.Tensor, residual: tf.Tensor, beta?: tf.Tensor): tf.Tensor {
    if (!beta) throw new Error('beta: expected the tensor prepare() returned, got undefined');
    return tf.tidy(() => {
      const [b, n, S, d] = residual.shape as [number, number, number, number];
      const merged = tf.add(tf.mul(tf.expandDims(out, 2), tf.expandDims(beta, -1)), residual);
      return tf.reshape(tf.transpose(merged, [0, 2, 1, 3]), [b * S, n, d]);
    });
  }
}

/** torch.nn.LayerNorm(dim, bias=False): normalise (eps 1e-5) and scale by `weight` [dim]. */
export class BiasLessLayerNorm extends Module {
  weight: tf.Variable;
  constructor(readonly dim: number) {
    super();
    this.weight = this.registerParameter('weight', tf.ones([dim]));
  }

  /** x: [..., dim]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const { mean, variance } = tf.moments(x, -1, true);
      return tf.mul(tf.mul(tf.sub(x, mean), tf.rsqrt(tf.add(variance, 1e-5))), this.weight);
    });
  }
}
