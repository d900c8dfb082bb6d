/**
 * Autoregressive training and generation for xVal models (the reference's XValAutoregressiveWrapper):
 * token cross-entropy plus, where the target is the numerical token, the squared error of the
 * predicted number.
 */
import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { checkTensor } from '../utils/errors.js';
import { Rng } from '../utils/random.js';
import { ensureGradients } from '../train/gradients.js';
import { crossEntropyRows } from '../nn/losses.js';
import { resolveFilter, topK, type FilterFn, type FilterKwargs, type FilterName } from './filters.js';
import { checkTemperature, sampleNext } from './sampling.js';

await ensureGradients();

/** What the wrapper needs of its model (XValTransformerWrapper). */
export interface XValNet extends Module {
  readonly options: { numTokens: number; maxSeqLen: number; numericalTokenId: number };
  /** ids: [b, n] int32, nums: [b, n] float32 -> logits [b, n, V], numerical [b, n] */
  forward(
    ids: tf.Tensor,
    nums: tf.Tensor,
    opts?: { mask?: tf.Tensor },
  ): { logits: tf.Tensor; numerical: tf.Tensor };
}

export interface XValAutoregressiveWrapperOptions {
  ignoreIndex: number;
  padValue: number;
  numericalLossWeight: number;
}

export const xvalAutoregressiveWrapperDefaults: XValAutoregressiveWrapperOptions = {
  ignoreIndex: -100,
  padValue: 0,
  numericalLossWeight: 1,
};

export interface XValGenerateOptions {
  filterLogitsFn?: FilterName | FilterFn;
  filterKwargs?: FilterKwargs;
  /** 0 = greedy; default 1 */
  temperature?: number;
  seed?: number;
}

/** What `XValAutoregressiveWrapper.generate` returns (the caller disposes the tensors). */
export interface XValGenerateResult {
  /** sampledTokenIds: [b, seqLen] int32 */
  sampledTokenIds: tf.Tensor;
  /** sampledNumbers: [b, seqLen] float32, NaN where the token is not the numerical token */
  sampledNumbers: tf.Tensor;
  /** isNumberMask: [b, seqLen] bool */
  isNumberMask: tf.Tensor;
}

export class XValAutoregressiveWrapper extends Module {
  readonly options: XValAutoregressiveWrapperOptions;
  readonly maxSeqLen: number;
  net: XValNet;

  constructor(net: XValNet, options: Partial<XValAutoregressiveWrapperOptions> = {}) {
    super();
    for (const k of Object.keys(options)) {
      if (!(k in xvalAutoregressiveWrapperDefaults))
        throw new Error(`${k}: unknown XValAutoregressiveWrapper option`);
    }
    const o = { ...xvalAutoregressiveWrapperDefaults, ...options };
    if (!Number.isInteger(o.ignoreIndex))
      throw new Error(`ignoreIndex: expected an integer, got ${o.ignoreIndex}`);
    if (!(o.numericalLossWeight >= 0)) {
      throw new Error(`numericalLossWeight: expected a non-negative number, got ${o.numericalLossWeight}`);
    }
    this.options = o;
    this.maxSeqLen = net.options.maxSeqLen;
    this.net = this.registerModule('net', net);
  }

  /**
   * x: [b, n + 1] int32 ids, xNum: [b, n + 1] float32 numbers -> scalar: mean over the non-ignored
   * targets of cross-entropy + numericalLossWeight * squared error (numerical targets only).
   * mask: [b, n] (or [b, n + 1]) bool key-padding mask, also excluding those targets.
   */
  forward(x: tf.Tensor, xNum: tf.Tensor, opts: { mask?: tf.Tensor } = {}): tf.Scalar {
    checkTensor('x', x, { rank: 2, dtype: 'int32', desc: 'token ids [batch, seq + 1]' });
    checkTensor('xNum', xNum, { shape: x.shape, dtype: 'float32', desc: 'numbers, the shape of x' });
    const [b, seq] = x.shape as [number, number];
    if (seq < 2) throw new Error(`x: expected at least 2 positions (inputs and shifted targets), got ${seq}`);
    const n = seq - 1;
    const { ignoreIndex, numericalLossWeight } = this.options;
    const numId = this.net.options.numericalTokenId;
    let mask = opts.mask;
    if (mask) {
      checkTensor('mask', mask, { rank: 2, dtype: 'bool' });
      if (mask.shape[0] !== b || (mask.shape[1] !== n && mask.shape[1] !== seq)) {
        throw new Error(`mask: expected shape [${b}, ${n}] or [${b}, ${seq}], got [${mask.shape}]`);
      }
    }
    return tf.tidy(() => {
      const inp = tf.slice(x, [0, 0], [b, n]);
      const target = tf.slice(x, [0, 1], [b, n]);
      const numInp = tf.slice(xNum, [0, 0], [b, n]);
      let numTarget = tf.slice(xNum, [0, 1], [b, n]);
      if (mask && mask.shape[1] === seq) mask = tf.slice(mask, [0, 0], [b, n]);
      let targetMask = tf.notEqual(target, ignoreIndex);
      if (mask) targetMask = tf.logicalAnd(targetMask, mask);
      const { logits, numerical } = this.net.forward(inp, numInp, mask ? { mask } : {});
      // per-position cross-entropy (0 where ignored)
      const ce = crossEntropyRows(logits, target, ignoreIndex); // [b, n]
      const isNum = tf.equal(target, numId);
      numTarget = tf.where(isNum, numTarget, tf.zerosLike(numTarget));
      const tm = tf.cast(targetMask, 'float32');
      const mse = tf.mul(tf.mul(tf.square(tf.sub(numerical, numTarget)), tm), tf.cast(isNum, 'float32'));
      const loss = tf.add(tf.mul(ce, tm), tf.mul(mse, numericalLossWeight));
      return tf.div(tf.sum(tf.mul(loss, tm)), tf.sum(tm)) as tf.Scalar;
    });
  }

  /**
   * Samples `seqLen` tokens and numbers after startTokens/startNumbers ([b, t] each): every step
   * feeds the last maxSeqLen positions and appends the sampled token and the predicted number.
   */
  async generate(
    startTokens: tf.Tensor,
    startNumbers: tf.Tensor,
    seqLen: number,
    options: XValGenerateOptions = {},
  ): Promise<XValGenerateResult> {
    checkTensor('startTokens', startTokens, { rank: 2, dtype: 'int32', desc: 'token ids [batch, seq]' });
    checkTensor('startNumbers', startNumbers, {
      shape: startTokens.shape,
      dtype: 'float32',
      desc: 'the shape of startTokens',
    });
    if (!Number.isInteger(seqLen) || seqLen < 1)
      throw new Error(`seqLen: expected a positive integer, got ${seqLen}`);
    const temperature = checkTemperature(options.temperature ?? 1);
    const filter = resolveFilter(options.filterLogitsFn ?? topK);
    const ids = startTokens.arraySync() as number[][];
    const nums = startNumbers.arraySync() as number[][];
    const V = this.net.options.numTokens;
    for (const r of ids) {
      for (const id of r) {
        if (!Number.isInteger(id) || id < 0 || id >= V)
          throw new Error(`startTokens: expected token ids in [0, ${V}), got ${id}`);
      }
    }
    const t = ids[0]!.length;
    const b = ids.length;
    const rng = new Rng(options.seed ?? 0);
    const wasTraining = this.net.training;
    this.net.eval();
    try {
      for (let step = 0; step < seqLen; step++) {
        const start = Math.max(0, ids[0]!.length - this.maxSeqLen);
        const x = tf.tensor2d(
          ids.map((r) => r.slice(start)),
          undefined,
          'int32',
        );
        const xn = tf.tensor2d(
          nums.map((r) => r.slice(start)),
          undefined,
          'float32',
        );
        const { logits, numerical } = this.net.forward(x, xn);
        tf.dispose([x, xn]);
        const n = logits.shape[1]!;
        const last = tf.tidy(() => tf.reshape(tf.slice(logits, [0, n - 1, 0], [b, 1, V]), [b, V]));
        const lastNum = tf.tidy(() => tf.reshape(tf.slice(numerical, [0, n - 1], [b, 1]), [b]));
        tf.dispose([logits, numerical]);
        let sample: number[];
        let numbers: Float32Array;
        try {
          sample = sampleNext(last, { temperature, filter, filterKwargs: options.filterKwargs, rng });
          numbers = lastNum.dataSync() as Float32Array;
        } finally {
          tf.dispose([last, lastNum]);
        }
        sample.forEach((s, i) => {
          ids[i]!.push(s);
          nums[i]!.push(numbers[i]!);
        });
      }
    } finally {
      this.net.train(wasTraining);
    }
    const numId = this.net.options.numericalTokenId;
    const newIds = ids.map((r) => r.slice(t));
    const isNum = newIds.map((r) => r.map((id) => id === numId));
    const newNums = nums.map((r, i) => r.slice(t).map((v, j) => (isNum[i]![j] ? v : NaN)));
    return {
      sampledTokenIds: tf.tensor2d(newIds, [b, seqLen], 'int32'),
      sampledNumbers: tf.tensor2d(newNums, [b, seqLen], 'float32'),
      isNumberMask: tf.tensor2d(
        isNum.map((r) => r.map((v) => (v ? 1 : 0))),
        [b, seqLen],
        'bool',
      ),
    };
  }
}
