import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import type { TransformerWrapper, TransformerForwardOptions } from '../wrappers/transformer-wrapper.js';
import { checkTensor } from '../utils/errors.js';
import { getRng, type Rng } from '../utils/random.js';
import { ensureGradients } from '../train/gradients.js';
import { crossEntropy } from '../nn/losses.js';
import { decode, decodeStream, type GenerateOptions, type GenerateStep, type Prompts } from './generate.js';

export { crossEntropy } from '../nn/losses.js';

// gradients for the loss (TF.js's Node build leaves them out; see ensureGradients)
await ensureGradients();

/** Options of `AutoregressiveWrapper` (camelCase of the reference's keyword names). */
export interface AutoregressiveWrapperOptions {
  /** Target id excluded from the loss (default -100). */
  ignoreIndex: number;
  /** Id that replaces `ignoreIndex` in the inputs (default 0). */
  padValue: number;
  /** Forgetful causal masking: fraction of key positions hidden from every query (default 0). */
  maskProb: number;
  /** Adds the net's attention z-loss (TransformerWrapper `returnAttnZLoss`) to the loss (default false). */
  addAttnZLoss: boolean;
}

export const autoregressiveWrapperDefaults: AutoregressiveWrapperOptions = {
  ignoreIndex: -100,
  padValue: 0,
  maskProb: 0,
  addAttnZLoss: false,
};

/** Per-call options of `AutoregressiveWrapper.forward`. */
export interface AutoregressiveForwardOptions extends Omit<TransformerForwardOptions, 'returnEmbeddings'> {
  /** Generator for the forgetful-causal-masking draw (default: the library generator). */
  rng?: Rng;
}

/**
 * Trains a TransformerWrapper as a language model: `forward(x)` is the mean cross-entropy of
 * predicting x[:, 1:] from x[:, :-1], ignoring `ignoreIndex` targets (the reference's
 * AutoregressiveWrapper). The parameters are the net's, under `net.`.
 */
export class AutoregressiveWrapper extends Module {
  readonly options: AutoregressiveWrapperOptions;
  readonly ignoreIndex: number;
  readonly padValue: number;
  readonly maskProb: number;
  readonly addAttnZLoss: boolean;
  readonly maxSeqLen: number;
  net: TransformerWrapper;

  constructor(net: TransformerWrapper, options: Partial<AutoregressiveWrapperOptions> = {}) {
    super();
    for (const k of Object.keys(options))
      if (!(k in autoregressiveWrapperDefaults))
        throw new Error(`${k}: unknown AutoregressiveWrapper option`);
    const o = { ...autoregressiveWrapperDefaults, ...options };
    if (!(o.maskProb >= 0 && o.maskProb < 1))
      throw new Error(`maskProb: expected a number in [0, 1), got ${o.maskProb}`);
    if (!Number.isInteger(o.ignoreIndex))
      throw new Error(`ignoreIndex: expected an integer, got ${o.ignoreIndex}`);
    if (!Number.isInteger(o.padValue)) throw new Error(`padValue: expected an integer, got ${o.padValue}`);
    this.options = o;
    this.ignoreIndex = o.ignoreIndex;
    this.padValue = o.padValue;
    this.maskProb = o.maskProb;
    if (typeof o.addAttnZLoss !== 'boolean')
      throw new Error(`addAttnZLoss: expected a boolean, got ${String(o.addAttnZLoss)}`);
    this.addAttnZLoss = o.addAttnZLoss;
    this.net = this.registerModule('net', net);
    this.maxSeqLen = net.maxSeqLen;
  }

  /**
   * x: [b, n + 1] int32 -> scalar mean cross-entropy over the non-ignored targets (plus the attention
   * z-loss with addAttnZLoss).
   */
  forward(x: tf.Tensor, opts: AutoregressiveForwardOptions = {}): tf.Scalar {
    checkTensor('x', x, { rank: 2, dtype: 'int32', desc: 'token ids [batch, seq + 1]' });
    const [b, seq] = x.shape as [number, number];
    if (seq < 2) throw new Error(`x: expected at least 2 positions (inputs and shifted targets), got ${seq}`);
    const { rng: rngOpt, ...netOpts } = opts;
    const rng = rngOpt ?? getRng();
    const n = seq - 1;
    const inp = tf.tidy(() => {
      const i = tf.slice(x, [0, 0], [b, n]);
      return tf.where(tf.equal(i, this.ignoreIndex), tf.fill([b, n], this.padValue, 'int32'), i);
    });
    let kvMask: tf.Tensor | undefined;
    if (this.maskProb > 0) {
      const numMask = Math.min(Math.floor(seq * this.maskProb), seq - 1);
      if (numMask > 0) kvMask = forgetfulMask(b, n, numMask, rng);
    }
    try {
      return tf.tidy(() => {
        const target = tf.slice(x, [0, 1], [b, n]);
        const callOpts = {
          ...netOpts,
          ...(kvMask
            ? {
                selfAttnKvMask: netOpts.selfAttnKvMask
                  ? tf.logicalAnd(netOpts.selfAttnKvMask, kvMask)
                  : kvMask,
              }
            : {}),
        };
        if (!this.addAttnZLoss)
          return crossEntropy(this.net.forward(inp, callOpts), target, this.ignoreIndex);
        const st = this.net.forwardWithState(inp, { ...callOpts, returnAttnZLoss: true });
        return tf.add(crossEntropy(st.logits, target, this.ignoreIndex), st.attnZLoss!) as tf.Scalar;
      });
    } finally {
      inp.dispose();
      kvMask?.dispose();
    }
  }
  /**
   * Samples up to `seqLen` tokens after `prompts` ([b, n] int32, or [n]) with the reference's
   * semantics (temperature 0 = greedy, filterLogitsFn + filterKwargs, eosToken, promptLens,
   * restrictToMaxSeqLen, cacheKv, contrastive decoding with amateurModel, seed). Returns only the
   * new tokens: [b, steps] int32 (steps < seqLen when every row reached eosToken).
   */
  async generate(prompts: Prompts, seqLen: number, options: GenerateOptions = {}): Promise<tf.Tensor> {
    return Promise.resolve(decode(this.net, prompts, seqLen, options, this.padValue));
  }

  /**
   * As `generate`, yielding each step's tokens (one per row; padValue once a row has ended) as soon
   * as they are sampled. Stops on `options.signal`; breaking out of the loop frees every tensor.
   */
  generateStream(
    prompts: Prompts,
    seqLen: number,
    options: GenerateOptions = {},
  ): AsyncGenerator<GenerateStep, void, undefined> {
    return decodeStream(this.net, prompts, seqLen, options, this.padValue);
  }
}

/**
 * Forgetful causal masking: for each row, `numMask` random key positions (never the first) are
 * hidden. Returns [b, n] bool, true = visible.
 */
export function forgetfulMask(b: number, n: number, numMask: number, rng: Rng): tf.Tensor {
  const data = new Uint8Array(b * n).fill(1);
  for (let r = 0; r < b; r++) {
    const idx = Array.from({ length: n - 1 }, (_, i) => i + 1);
    for (let i = 0; i < Math.min(numMask, idx.length); i++) {
      const j = i + Math.floor(rng.random() * (idx.length - i));
      [idx[i], idx[j]] = [idx[j]!, idx[i]!];
      data[r * n + idx[i]!] = 0;
    }
  }
  return tf.tensor2d(data, [b, n], 'bool');
}
