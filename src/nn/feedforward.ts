import * as tf from '@tensorflow/tfjs-core';
import { Module } from './module.js';
import { Linear } from './linear.js';
import { LayerNorm } from './norms.js';
import { dropout, gelu, reluSquared, silu } from './functional.js';
import { getRng, type Rng } from '../utils/random.js';
import { OptionError } from '../utils/errors.js';
import { MAX_DIMENSION, checkOptionValues, stripUndefined } from '../utils/option-rules.js';

/** Options of `FeedForward` (camelCase of the reference's keyword names). */
export interface FeedForwardOptions {
  dimOut: number | null;
  mult: number;
  glu: boolean;
  gluMultBias: boolean;
  swish: boolean;
  reluSquared: boolean;
  postActLn: boolean;
  dropout: number;
  noBias: boolean;
  zeroInitOutput: boolean;
}

export const feedForwardDefaults: FeedForwardOptions = {
  dimOut: null,
  mult: 4,
  glu: false,
  gluMultBias: false,
  swish: false,
  reluSquared: false,
  postActLn: false,
  dropout: 0,
  noBias: false,
  zeroInitOutput: false,
};

type Activation = (x: tf.Tensor) => tf.Tensor;

/**
 * The hidden size floor(dim * mult): a float factor can make it zero or too large to allocate,
 * which the rule of `mult` alone does not see. Throws an OptionError naming `mult`.
 */
export function feedForwardInnerDim(dim: number, mult: number): number {
  const inner = Math.floor(dim * mult);
  if (!(inner >= 1 && inner <= MAX_DIMENSION))
    throw OptionError.of(
      'mult',
      `a factor that makes the feedforward size floor(dim * mult) an integer in [1, ${MAX_DIMENSION}] (dim is ${dim})`,
      mult,
    );
  return inner;
}

/** A module holding children under explicit index names ('0', '2', ...), as a filtered nn.Sequential. */
export class Indexed extends Module {
  add<M extends Module>(index: number, m: M): M {
    return this.registerModule(String(index), m);
  }
}

/** Gated linear unit: `proj` [2 * dimOut, dimIn]; x * act(gate) (* `mult_bias` [dimOut]). */
export class GLU extends Module {
  proj: Linear;
  multBias: tf.Variable | null = null;
  constructor(
    dimIn: number,
    dimOut: number,
    private readonly act: Activation,
    multBias = false,
    rng?: Rng,
  ) {
    super();
    this.proj = this.registerModule('proj', new Linear(dimIn, dimOut * 2, { rng }));
    if (multBias) this.multBias = this.registerParameter('mult_bias', tf.ones([dimOut]));
  }

  /** x: [..., dimIn] -> [..., dimOut]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      const [a, gate] = tf.split(this.proj.forward(x), 2, -1);
      const out = tf.mul(a, this.act(gate));
      return this.multBias ? tf.mul(out, this.multBias) : out;
    });
  }
}

/**
 * The reference's FeedForward: `ff.0` (Linear+act, or GLU), optional post-activation LayerNorm,
 * dropout, and the output Linear, indexed as the reference's nn.Sequential.
 */
export class FeedForward extends Module {
  readonly options: FeedForwardOptions;
  ff: Indexed;
  private readonly projIn: Linear | null = null;
  private readonly glu: GLU | null = null;
  private readonly postLn: LayerNorm | null = null;
  private readonly projOut: Linear;
  private readonly act: Activation;

  constructor(
    readonly dim: number,
    options: Partial<FeedForwardOptions> = {},
  ) {
    super();
    checkOptionValues(options, feedForwardDefaults, 'FeedForward');
    const o = { ...feedForwardDefaults, ...stripUndefined(options) };
    this.options = o;
    const inner = feedForwardInnerDim(dim, o.mult);
    const dimOut = o.dimOut ?? dim;
    this.act = o.reluSquared ? reluSquared : o.swish ? silu : gelu;
    const rng = getRng();
    this.ff = this.registerModule('ff', new Indexed());
    if (o.glu) {
      this.glu = this.ff.add(0, new GLU(dim, inner, this.act, o.gluMultBias, rng));
    } else {
      const seq = this.ff.add(0, new Indexed());
      this.projIn = seq.add(0, new Linear(dim, inner, { bias: !o.noBias, rng }));
    }
    let idx = 1;
    if (o.postActLn) this.postLn = this.ff.add(idx++, new LayerNorm(inner));
    idx++; // dropout
    this.projOut = this.ff.add(idx, new Linear(inner, dimOut, { bias: !o.noBias, rng }));
    if (o.zeroInitOutput) {
      tf.tidy(() => {
        this.projOut.weight.assign(tf.zerosLike(this.projOut.weight));
        if (this.projOut.bias) this.projOut.bias.assign(tf.zerosLike(this.projOut.bias));
      });
    }
  }

  /** x: [..., dim] -> [..., dimOut]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => {
      let h = this.glu ? this.glu.forward(x) : this.act(this.projIn!.forward(x));
      if (this.postLn) h = this.postLn.forward(h);
      h = dropout(h, this.options.dropout, this.training);
      return this.projOut.forward(h);
    });
  }
}
