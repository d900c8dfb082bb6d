import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { Linear } from '../nn/linear.js';
import { fillVariable } from './ops.js';

/** Extra options of the data-dependent ALiBi modules (the reference's data_dependent_alibi_kwargs). */
export interface DataDependentAlibiKwargs {
  /** Initial bias of the forget-gate projection (DataDependentAlibi). */
  biasInit?: number;
  /** Multiplies the log forget gates. */
  postLogScale?: number;
}

/** nn.Sequential(Linear, ...) holding the Linear at index '0'. */
class Seq0 extends Module {
  readonly linear: Linear;
  constructor(inDim: number, outDim: number, bias: boolean) {
    super();
    this.linear = this.registerModule('0', new Linear(inDim, outDim, { bias }));
  }
}

function logSigmoid(x: tf.Tensor): tf.Tensor {
  return tf.neg(tf.softplus(tf.neg(x)));
}

/**
 * Data-dependent ALiBi of the Forgetting Transformer (openreview q2Lnyegkr8): per-token log forget
 * gates, cumulated, give the bias between positions. Bidirectional uses a second set of gates for
 * the upper triangle. Parameters: `to_forget_gates.0.weight` [heads (x2), dim], `.bias`.
 */
export class DataDependentAlibi extends Module {
  readonly causal: boolean;
  readonly heads: number;
  readonly postLogScale: number;
  private readonly proj: Linear;

  constructor(dim: number, heads: number, causal = true, kwargs: DataDependentAlibiKwargs = {}) {
    super();
    this.causal = causal;
    this.heads = heads;
    this.postLogScale = kwargs.postLogScale ?? 1;
    this.proj = this.registerModule('to_forget_gates', new Seq0(dim, heads * (causal ? 1 : 2), true)).linear;
    fillVariable(this.proj.bias!, kwargs.biasInit ?? 5);
  }

  /** x: [b, n, dim] -> bias [b, heads, n, n]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      let gates = tf.transpose(logSigmoid(this.proj.forward(x)), [0, 2, 1]); // [b, h', n]
      gates = tf.cumsum(tf.mul(gates, this.postLogScale), 2); // over positions (tf.cumsum takes no negative axis)
      const diff = (g: tf.Tensor): tf.Tensor => tf.sub(tf.expandDims(g, -1), tf.expandDims(g, -2)); // g_i - g_j
      if (this.causal) return diff(gates);
      const [fwd, rev] = tf.split(gates, 2, 1) as [tf.Tensor, tf.Tensor];
      const n = x.shape[1]!;
      const lower = tf.linalg.bandPart(tf.ones([n, n]), -1, 0);
      const upper = tf.linalg.bandPart(tf.ones([n, n]), 0, -1);
      return tf.add(tf.mul(diff(fwd), lower), tf.mul(tf.neg(diff(rev)), upper));
    });
  }
}

/**
 * Per-row data-dependent ALiBi: forget gates from small query/key projections
 * (`to_forget_gates.0.weight` [heads * dimHead * 2, dim], no bias); causal only.
 */
export class PerRowDataDependentAlibi extends Module {
  readonly heads: number;
  readonly dimHead: number;
  readonly postLogScale: number;
  private readonly proj: Linear;

  constructor(dim: number, heads: number, causal = true, dimHead = 8, kwargs: DataDependentAlibiKwargs = {}) {
    super();
    if (!causal)
      throw new Error('dataDependentAlibiPerRow: expected causal attention, bidirectional is not supported');
    this.heads = heads;
    this.dimHead = dimHead;
    this.postLogScale = kwargs.postLogScale ?? 1;
    this.proj = this.registerModule('to_forget_gates', new Seq0(dim, heads * dimHead * 2, false)).linear;
  }

  /** x: [b, n, dim] -> bias [b, heads, n, n]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const [b, n] = x.shape as [number, number, number];
      const qk = tf.transpose(
        tf.reshape(this.proj.forward(x), [b, n, 2, this.heads, this.dimHead]),
        [2, 0, 3, 1, 4],
      );
      const [q, k] = tf.unstack(qk, 0) as [tf.Tensor, tf.Tensor];
      let gates = tf.mul(tf.matMul(q, k, false, true), this.dimHead ** -0.5);
      gates = tf.mul(logSigmoid(gates), this.postLogScale);
      const strictlyLower = tf.sub(tf.linalg.bandPart(tf.ones([n, n]), -1, 0), tf.eye(n));
      gates = tf.mul(gates, strictlyLower); // zero the diagonal and above
      return tf.cumsum(gates, 3, false, true); // reverse cumulative sum over keys
    });
  }
}
