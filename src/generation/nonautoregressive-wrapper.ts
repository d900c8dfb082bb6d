import * as tf from '@tensorflow/tfjs-core';
import { stopGradient } from '../attention/ops.js';
import { Module } from '../nn/module.js';
import { Linear } from '../nn/linear.js';
import { uniformTensor } from '../nn/init.js';
import { crossEntropy } from '../nn/losses.js';
import { tidyObj } from '../nn/functional.js';
import { TransformerWrapper } from '../wrappers/transformer-wrapper.js';
import { checkBool, checkKnownKeys, checkPositiveInt, fmt } from '../wrappers/common.js';
import { checkTensor } from '../utils/errors.js';
import { getRng, Rng } from '../utils/random.js';
import { ensureGradients } from '../train/gradients.js';
import {
  NAR_SCHEDULES,
  maskCounts,
  maskSubset,
  scheduleMask,
  type ScheduleFn,
  type ScheduleName,
} from './nar-masking.js';

export { NAR_SCHEDULES, maskCounts, linspace01 } from './nar-masking.js';
export type { ScheduleFn, ScheduleName } from './nar-masking.js';

// gradients for the losses (TF.js's Node build leaves them out; see ensureGradients)
await ensureGradients();

/** Options of `NonAutoregressiveWrapper` (camelCase of the reference's keyword names). */
export interface NonAutoregressiveWrapperOptions {
  /** The id of the [mask] token (required; an id of the net's vocabulary). */
  maskId: number;
  /** Decoding steps of `generate`. */
  steps: number;
  /** Self-conditioning on the net's previous embeddings (adds `null_embed`, `to_self_cond`). */
  selfCond: boolean;
  /** In training, how often the self-conditioning embeddings come from a first pass of the net. */
  selfCondTrainProb: number;
  /** Fraction of the masked tokens left unchanged in the input (when a coin flip says so). */
  noReplaceProb: number;
  /** Fraction of the masked tokens replaced by random tokens (when a coin flip says so). */
  randomTokenProb: number;
  /** 'linear' (1 - t), 'cosine' (cos(t pi / 2)) or a function of t in [0, 1]. */
  schedule: ScheduleName | ScheduleFn;
  /** In decoding, whether a token unmasked earlier may be masked again. */
  canMaskPrevUnmasked: boolean;
  /** A token critic (a TransformerWrapper with one output per position, `logitsDim: 1`), or null. */
  tokenCritic: TransformerWrapper | null;
  /** A critic head on the net itself (`token_critic.to_logits`) instead of a separate critic. */
  selfTokenCritic: boolean;
  /** Weight of the critic's loss in the total. */
  criticLossWeight: number;
}

export const nonAutoregressiveWrapperDefaults: NonAutoregressiveWrapperOptions = {
  maskId: -1,
  steps: 18,
  selfCond: false,
  selfCondTrainProb: 0.75,
  noReplaceProb: 0.15,
  randomTokenProb: 0.1,
  schedule: 'linear',
  canMaskPrevUnmasked: false,
  tokenCritic: null,
  selfTokenCritic: false,
  criticLossWeight: 1,
};

/**
 * Every random draw of one training step, for reproducing a step exactly (otherwise they come from
 * the call's `rng`). b = batch, n = maxSeqLen, v = the net's logits size.
 */
export interface NARTrainNoise {
  /** times: [b] uniform in [0, 1): the schedule's time of each row. */
  times: tf.Tensor;
  /** perm: [b, n] uniform: its argsort picks the masked positions. */
  perm: tf.Tensor;
  /** noReplace: [b, n] uniform ordering the masked tokens kept unchanged, or null (the coin said no). */
  noReplace: tf.Tensor | null;
  /** randomToken: [b, n] uniform ordering the masked tokens replaced, with the replacements [b, n] int32, or null. */
  randomToken: { order: tf.Tensor; tokens: tf.Tensor } | null;
  /** Whether the self-conditioning embeddings come from a first pass of the net (selfCond). */
  selfCondition: boolean;
  /** Temperature of the critic's sample, when the call gives none. */
  generatorTemperature: number;
  /** gumbel: [b, n, v] Gumbel noise of the critic's sample. */
  gumbel: tf.Tensor | null;
}

/** Per-call options of `NonAutoregressiveWrapper.forward`. */
export interface NARForwardOptions {
  onlyTrainGenerator?: boolean;
  onlyTrainCritic?: boolean;
  /** Temperature of the sample the critic judges (default: uniform in [0, 1) per call). */
  generatorSampleTemperature?: number;
  /** Generator for the step's random draws (default: the library generator). */
  rng?: Rng;
  /** The step's random draws, given instead of drawn. */
  noise?: NARTrainNoise;
}

/** The losses of a training step (scalars; the caller owns them). */
export interface NARLosses {
  /** What to minimise: the generator's loss plus the weighted critic loss (only the critic's with onlyTrainCritic). */
  loss: tf.Scalar;
  /** Cross-entropy of the masked tokens (null with onlyTrainCritic). */
  generatorLoss: tf.Scalar | null;
  /** Binary cross-entropy of the critic (null without a critic or with onlyTrainGenerator). */
  criticLoss: tf.Scalar | null;
}

/** Options of `NonAutoregressiveWrapper.generate`. */
export interface NARGenerateOptions {
  /** Rows to sample; without it one sequence [maxSeqLen] is returned. */
  batchSize?: number;
  /** Temperature of the first step, annealed linearly to 0. */
  startTemperature?: number;
  /** Keep the top ceil((1 - filterThres) * v) logits (null: no filter). */
  filterThres?: number | null;
  /** Scale of the Gumbel noise added to the critic's scores. */
  noiseLevelScale?: number;
  /** Seed of the draws (default: the library generator). */
  seed?: number;
  /** The draws given instead: per step, Gumbel noise [b, n, v] of the sample and [b, n] of the critic's scores. */
  noise?: { gumbel: tf.Tensor[]; criticGumbel?: tf.Tensor[] };
}

type DecodeOptions = NARGenerateOptions & {
  startTemperature: number;
  filterThres: number | null;
  noiseLevelScale: number;
};

/** The critic head on the net (`token_critic.net` is the net, `token_critic.to_logits` [1, dim]). */
class SelfCritic extends Module {
  net: TransformerWrapper;
  toLogits: Linear;

  constructor(net: TransformerWrapper) {
    super();
    this.net = this.registerModule('net', net);
    this.toLogits = this.registerModule('to_logits', new Linear(net.dim, 1));
  }

  /** x: [b, n] int32 -> [b, n, 1]. */
  forward(x: tf.Tensor): tf.Tensor {
    return tf.tidy(() => this.toLogits.forward(this.net.forward(x, { returnEmbeddings: true })));
  }
}

/** Gumbel noise -log(-log(u + 1e-10) + 1e-10) of uniform draws u. */
function gumbelOf(u: tf.Tensor): tf.Tensor {
  return tf.tidy(() => tf.neg(tf.log(tf.add(tf.neg(tf.log(tf.add(u, 1e-10))), 1e-10))));
}

/**
 * MaskGIT-style non-autoregressive training and decoding of a `TransformerWrapper` (the reference's
 * `NonAutoregressiveWrapper`). Training masks a scheduled fraction of each sequence (some masked
 * tokens kept or replaced by random ones, as BERT) and scores the net's predictions of the masked
 * tokens; `generate` starts from all [mask] tokens and unmasks over `steps` steps, remasking the least
 * confident (or, with a token critic, the most suspect) tokens. Parameters: `net.*`, with selfCond
 * `null_embed` [dim] and `to_self_cond.weight` [dim, dim], with a critic `token_critic.*` (with
 * selfTokenCritic `token_critic.net.*`, the net's own, and `token_critic.to_logits.{weight,bias}`).
 */
export class NonAutoregressiveWrapper extends Module {
  readonly options: NonAutoregressiveWrapperOptions;
  readonly scheduleFn: ScheduleFn;
  readonly maxSeqLen: number;
  readonly numTokens: number;
  net: TransformerWrapper;
  nullEmbed: tf.Variable | null = null;
  toSelfCond: Linear | null = null;
  tokenCritic: TransformerWrapper | SelfCritic | null = null;

  constructor(
    net: TransformerWrapper,
    options: Partial<NonAutoregressiveWrapperOptions> & { maskId: number },
  ) {
    super();
    if (!(net instanceof TransformerWrapper))
      throw new Error(
        `net: expected a TransformerWrapper, got ${fmt((net as unknown as object)?.constructor?.name)}`,
      );
    if (typeof options !== 'object' || options === null)
      throw new Error(`options: expected an object with maskId, got ${fmt(options)}`);
    checkKnownKeys('NonAutoregressiveWrapper', options, Object.keys(nonAutoregressiveWrapperDefaults));
    const o: NonAutoregressiveWrapperOptions = { ...nonAutoregressiveWrapperDefaults, ...options };
    this.scheduleFn = checkOptions(net, o);
    this.options = o;
    this.net = this.registerModule('net', net);
    this.maxSeqLen = net.maxSeqLen;
    this.numTokens = net.numTokens;
    if (o.selfCond) {
      const rng = getRng();
      this.nullEmbed = this.registerParameter('null_embed', tf.tensor1d(rng.fillNormal(net.embDim, 0, 1)));
      this.toSelfCond = this.registerModule(
        'to_self_cond',
        new Linear(net.embDim, net.embDim, { bias: false }),
      );
    }
    if (o.tokenCritic) this.tokenCritic = this.registerModule('token_critic', o.tokenCritic);
    else if (o.selfTokenCritic) this.tokenCritic = this.registerModule('token_critic', new SelfCritic(net));
  }

  /** How many tokens stay masked after each decoding step: [steps] counts from the schedule. */
  maskSchedule(): number[] {
    return maskCounts(this.scheduleFn, this.options.steps, this.maxSeqLen);
  }

  /** x: [b, maxSeqLen] int32 token ids -> the step's losses (see NARLosses). */
  forward(x: tf.Tensor, opts: NARForwardOptions = {}): NARLosses {
    checkTensor('x', x, {
      shape: [null, this.maxSeqLen],
      dtype: 'int32',
      desc: 'token ids [batch, maxSeqLen]',
    });
    checkIds('x', x, this.numTokens);
    if (opts.onlyTrainGenerator && opts.onlyTrainCritic)
      throw new Error('onlyTrainCritic: expected at most one of onlyTrainGenerator and onlyTrainCritic');
    const t = opts.generatorSampleTemperature;
    if (t !== undefined && !(typeof t === 'number' && t >= 0 && Number.isFinite(t)))
      throw new Error(`generatorSampleTemperature: expected a non-negative number, got ${fmt(t)}`);
    const [b, n] = x.shape as [number, number];
    const owned: tf.Tensor[] = [];
    const noise = opts.noise ?? this.drawNoise(b, n, opts, owned);
    try {
      this.checkNoise(noise, b, n, !opts.onlyTrainGenerator);
      return this.losses(x, noise, opts);
    } finally {
      tf.dispose(owned);
    }
  }

  /** The masks of a step: which positions are predicted, and the net's input. */
  private masks(x: tf.Tensor, noise: NARTrainNoise): { mask: Uint8Array; input: Int32Array } {
    const [b, n] = x.shape as [number, number];
    const o = this.options;
    const mask = scheduleMask(this.scheduleFn, noise.times.dataSync(), noise.perm.dataSync(), b, n);
    const replace = mask.slice();
    let left = 1;
    if (noise.noReplace) {
      left -= o.noReplaceProb;
      const keep = maskSubset(mask, o.noReplaceProb, noise.noReplace.dataSync(), b, n);
      keep.forEach((k, i) => k && (replace[i] = 0));
    }
    const input = Int32Array.from(x.dataSync());
    if (noise.randomToken) {
      const sub = maskSubset(replace, o.randomTokenProb * left, noise.randomToken.order.dataSync(), b, n);
      const tokens = noise.randomToken.tokens.dataSync();
      sub.forEach((k, i) => {
        if (!k) return;
        input[i] = tokens[i]!;
        replace[i] = 0;
      });
    }
    replace.forEach((k, i) => k && (input[i] = o.maskId));
    return { mask, input };
  }

  private losses(x: tf.Tensor, noise: NARTrainNoise, opts: NARForwardOptions): NARLosses {
    const [b, n] = x.shape as [number, number];
    const { mask, input } = this.masks(x, noise);
    return tidyObj((): NARLosses => {
      const masked = tf.tensor2d(input, [b, n], 'int32');
      let sumEmbeds: tf.Tensor | undefined;
      if (this.nullEmbed) {
        const cond = noise.selfCondition
          ? stopGradient(this.net.forward(masked, { returnEmbeddings: true }))
          : tf.tile(tf.reshape(this.nullEmbed, [1, 1, -1]), [b, n, 1]);
        sumEmbeds = this.toSelfCond!.forward(cond);
      }
      const logits = this.net.forward(masked, { sumEmbeds });
      const maskT = tf.tensor2d(mask, [b, n], 'bool');
      const genLoss = this.generatorLoss(logits, x, maskT);
      const critic = this.tokenCritic;
      if (!critic || opts.onlyTrainGenerator)
        return { loss: genLoss, generatorLoss: genLoss, criticLoss: null };
      const temperature = opts.generatorSampleTemperature ?? noise.generatorTemperature;
      // the sample is a constant of the loss (argmax has no gradient): taken off the tape by value
      const picked = tf.argMax(tf.add(tf.div(logits, Math.max(temperature, 1e-10)), noise.gumbel!), -1);
      const sampled = tf.tensor2d(picked.dataSync() as Int32Array, [b, n], 'int32');
      const generated = tf.where(maskT, sampled, x);
      const criticLogits = tf.squeeze(critic.forward(generated), [-1]);
      const labels = tf.cast(tf.notEqual(sampled, x), 'float32');
      const criticLoss = bceWithLogits(criticLogits, labels);
      if (opts.onlyTrainCritic) return { loss: criticLoss, generatorLoss: null, criticLoss };
      const loss = tf.add(genLoss, tf.mul(criticLoss, this.options.criticLossWeight)) as tf.Scalar;
      return { loss, generatorLoss: genLoss, criticLoss };
    });
  }

  /** Mean cross-entropy (negative log-likelihood for log-probability outputs) of the masked positions. */
  private generatorLoss(logits: tf.Tensor, x: tf.Tensor, mask: tf.Tensor): tf.Scalar {
    const target = tf.where(mask, x, tf.fill(x.shape, -100, 'int32'));
    if (!this.net.outputIsLogProb) return crossEntropy(logits, target, -100);
    const picked = tf.sum(
      tf.mul(logits, tf.oneHot(tf.where(mask, x, tf.zerosLike(x)), logits.shape[2]!)),
      -1,
    );
    const m = tf.cast(mask, 'float32');
    return tf.neg(tf.div(tf.sum(tf.mul(picked, m)), tf.sum(m))) as tf.Scalar;
  }

  /** Draws a step's noise from the call's generator; the tensors created go to `owned`. */
  private drawNoise(b: number, n: number, opts: NARForwardOptions, owned: tf.Tensor[]): NARTrainNoise {
    const rng = opts.rng ?? getRng();
    const o = this.options;
    const own = <T extends tf.Tensor>(t: T): T => (owned.push(t), t);
    const times = own(tf.tensor1d(rng.fillUniform(b, 0, 1)));
    const perm = own(tf.tensor2d(rng.fillUniform(b * n, 0, 1), [b, n]));
    const noReplace =
      o.noReplaceProb > 0 && rng.random() < 0.5
        ? own(tf.tensor2d(rng.fillUniform(b * n, 0, 1), [b, n]))
        : null;
    let randomToken: NARTrainNoise['randomToken'] = null;
    if (o.randomTokenProb > 0 && rng.random() < 0.5) {
      const order = own(tf.tensor2d(rng.fillUniform(b * n, 0, 1), [b, n]));
      const ids = Int32Array.from({ length: b * n }, () => rng.int(0, this.numTokens));
      randomToken = { order, tokens: own(tf.tensor2d(ids, [b, n], 'int32')) };
    }
    const selfCondition = o.selfCond && rng.random() < o.selfCondTrainProb;
    const critic = this.tokenCritic !== null && !opts.onlyTrainGenerator;
    const generatorTemperature = critic ? rng.random() : 1;
    const v = this.net.options.logitsDim ?? this.numTokens;
    const gumbel = critic ? own(gumbelOf(own(uniformTensor(rng, [b, n, v], 0, 1)))) : null;
    return { times, perm, noReplace, randomToken, selfCondition, generatorTemperature, gumbel };
  }

  private checkNoise(noise: NARTrainNoise, b: number, n: number, critic: boolean): void {
    checkTensor('noise.times', noise.times, { shape: [b], dtype: 'float32' });
    checkTensor('noise.perm', noise.perm, { shape: [b, n], dtype: 'float32' });
    if (noise.noReplace) checkTensor('noise.noReplace', noise.noReplace, { shape: [b, n], dtype: 'float32' });
    if (noise.randomToken) {
      checkTensor('noise.randomToken.order', noise.randomToken.order, { shape: [b, n], dtype: 'float32' });
      checkTensor('noise.randomToken.tokens', noise.randomToken.tokens, { shape: [b, n], dtype: 'int32' });
    }
    if (this.tokenCritic && critic) {
      const v = this.net.options.logitsDim ?? this.numTokens;
      if (!noise.gumbel)
        throw new Error('noise.gumbel: expected a [b, n, v] tensor with a token critic, got null');
      checkTensor('noise.gumbel', noise.gumbel, { shape: [b, n, v], dtype: 'float32' });
    }
  }

  /**
   * Samples sequences of maxSeqLen tokens: [batchSize, maxSeqLen] int32, or [maxSeqLen] without
   * batchSize. The model is in eval mode while it runs (its mode is restored after).
   */
  async generate(options: NARGenerateOptions = {}): Promise<tf.Tensor> {
    return Promise.resolve(this.sample(options));
  }

  private sample(options: NARGenerateOptions): tf.Tensor {
    const o: DecodeOptions = { startTemperature: 1, filterThres: 0.7, noiseLevelScale: 1, ...options };
    const sampleOne = o.batchSize === undefined;
    const b = sampleOne ? 1 : checkPositiveInt('batchSize', o.batchSize);
    checkGenerateOptions(o, this, b);
    const rng = o.seed !== undefined ? new Rng(o.seed) : getRng();
    const wasTraining = this.training;
    this.eval();
    try {
      const seq = this.decode(b, o, rng);
      if (!sampleOne) return seq;
      const one = tf.reshape(seq, [this.maxSeqLen]);
      seq.dispose();
      return one;
    } finally {
      this.train(wasTraining);
    }
  }

  /** The decoding loop: b rows from all [mask] to tokens in `steps` steps -> [b, maxSeqLen] int32. */
  private decode(b: number, o: DecodeOptions, rng: Rng): tf.Tensor {
    const n = this.maxSeqLen;
    const steps = this.options.steps;
    const counts = this.maskSchedule();
    let seq = tf.fill([b, n], this.options.maskId, 'int32');
    let mask = tf.ones([b, n], 'bool');
    let lastEmbed: tf.Tensor | null = this.nullEmbed
      ? tf.tidy(() => tf.tile(tf.reshape(this.nullEmbed!, [1, 1, -1]), [b, n, 1]))
      : null;
    try {
      for (let step = 0; step < steps; step++) {
        const annealing = (steps - 1 - step) / steps;
        const temperature = Math.max(o.startTemperature * annealing, 1e-3);
        const next = tidyObj(() => {
          const sumEmbeds = lastEmbed ? this.toSelfCond!.forward(lastEmbed) : undefined;
          const st = this.net.forwardWithState(seq, { sumEmbeds });
          let logits = st.logits;
          if (o.filterThres !== null) logits = topKFilter(logits, o.filterThres);
          const gumbel = o.noise ? o.noise.gumbel[step]! : gumbelOf(uniformTensor(rng, logits.shape, 0, 1));
          const sampled = tf.argMax(tf.add(tf.div(logits, temperature), gumbel), -1);
          const filled = tf.where(mask, sampled, seq);
          let scores: tf.Tensor;
          if (this.tokenCritic) {
            const g = o.noise?.criticGumbel
              ? o.noise.criticGumbel[step]!
              : gumbelOf(uniformTensor(rng, [b, n], 0, 1));
            scores = tf.squeeze(this.tokenCritic.forward(filled), [-1]);
            scores = tf.add(scores, tf.mul(g, o.noiseLevelScale * annealing));
          } else {
            const probs = tf.softmax(logits, -1);
            scores = tf.sub(1, tf.sum(tf.mul(probs, tf.oneHot(sampled, probs.shape[2]!)), -1));
          }
          if (!this.options.canMaskPrevUnmasked)
            scores = tf.where(mask, scores, tf.fill([b, n], -3.4028234663852886e38));
          const newMask = topMask(scores, counts[step]!);
          const newSeq = tf.where(newMask, tf.fill([b, n], this.options.maskId, 'int32'), filled);
          return { seq: newSeq, mask: newMask, embed: lastEmbed ? st.embeddings : null };
        });
        tf.dispose([seq, mask, ...(lastEmbed && next.embed ? [lastEmbed] : [])]);
        seq = next.seq;
        mask = next.mask;
        if (next.embed) lastEmbed = next.embed;
      }
      return seq;
    } finally {
      tf.dispose([mask, ...(lastEmbed ? [lastEmbed] : [])]);
    }
  }
}

/** Keeps the top ceil((1 - thres) * v) logits of each row, the rest -inf. logits: [b, n, v]. */
function topKFilter(logits: tf.Tensor, thres: number): tf.Tensor {
  const v = logits.shape[2]!;
  const k = Math.ceil((1 - thres) * v);
  const { values } = tf.topk(logits, k);
  const kth = tf.slice(values, [0, 0, k - 1], [-1, -1, 1]);
  return tf.where(tf.less(logits, kth), tf.fill(logits.shape, -Infinity), logits);
}

/** A [b, n] bool mask of the `count` largest scores of each row (none when count is 0). */
function topMask(scores: tf.Tensor, count: number): tf.Tensor {
  const [b, n] = scores.shape as [number, number];
  if (count === 0) return tf.zeros([b, n], 'bool');
  const { indices } = tf.topk(scores, count);
  return tf.cast(tf.sum(tf.oneHot(indices, n), 1), 'bool');
}

/** Mean binary cross-entropy of logits z against labels y: max(z, 0) - z y + log(1 + e^-|z|). */
function bceWithLogits(z: tf.Tensor, y: tf.Tensor): tf.Scalar {
  return tf.mean(tf.add(tf.sub(tf.relu(z), tf.mul(z, y)), tf.softplus(tf.neg(tf.abs(z))))) as tf.Scalar;
}

function checkIds(name: string, x: tf.Tensor, numTokens: number): void {
  const v = x.dataSync();
  for (let i = 0; i < v.length; i++)
    if (v[i]! < 0 || v[i]! >= numTokens)
      throw new Error(`${name}: expected token ids in [0, ${numTokens}), got ${v[i]}`);
}

/** Checks the wrapper's options against its net; returns the schedule function. */
function checkOptions(net: TransformerWrapper, o: NonAutoregressiveWrapperOptions): ScheduleFn {
  if (!Number.isInteger(o.maskId) || o.maskId < 0 || o.maskId >= net.numTokens)
    throw new Error(
      `maskId: expected a token id in [0, ${net.numTokens}) (numTokens of the net), got ${fmt(o.maskId)}`,
    );
  checkPositiveInt('steps', o.steps);
  for (const k of ['selfCond', 'canMaskPrevUnmasked', 'selfTokenCritic'] as const) checkBool(k, o[k]);
  for (const k of ['selfCondTrainProb', 'noReplaceProb', 'randomTokenProb'] as const)
    if (!(typeof o[k] === 'number' && o[k] >= 0 && o[k] <= 1))
      throw new Error(`${k}: expected a number in [0, 1], got ${fmt(o[k])}`);
  if (typeof o.criticLossWeight !== 'number' || !Number.isFinite(o.criticLossWeight))
    throw new Error(`criticLossWeight: expected a finite number, got ${fmt(o.criticLossWeight)}`);
  if (net.maxSeqLen <= 0)
    throw new Error(
      `net: expected a positive maxSeqLen (the length of every sequence), got ${net.maxSeqLen}`,
    );
  if (net.options.returnOnlyEmbed || net.options.numOutputHeads !== 1)
    throw new Error('net: expected one output head of logits (no returnOnlyEmbed, numOutputHeads 1)');
  if (o.selfCond && net.embDim !== net.dim)
    throw new Error(`selfCond: expected the net's embDim (${net.embDim}) equal to its dim (${net.dim})`);
  if (o.tokenCritic !== null) {
    if (o.selfTokenCritic)
      throw new Error('tokenCritic: expected at most one of tokenCritic and selfTokenCritic');
    if (!(o.tokenCritic instanceof TransformerWrapper))
      throw new Error(`tokenCritic: expected a TransformerWrapper or null, got ${fmt(o.tokenCritic)}`);
    if ((o.tokenCritic.options.logitsDim ?? o.tokenCritic.numTokens) !== 1)
      throw new Error(
        `tokenCritic: expected one output per position (logitsDim 1), got ${o.tokenCritic.options.logitsDim ?? o.tokenCritic.numTokens}`,
      );
    if (o.tokenCritic.numTokens !== net.numTokens)
      throw new Error(
        `tokenCritic: expected the net's numTokens ${net.numTokens}, got ${o.tokenCritic.numTokens}`,
      );
  }
  if (typeof o.schedule === 'function') return o.schedule;
  if (o.schedule === 'linear' || o.schedule === 'cosine') return NAR_SCHEDULES[o.schedule];
  throw new Error(`schedule: expected 'linear', 'cosine' or a function of t, got ${fmt(o.schedule)}`);
}

function checkGenerateOptions(o: NARGenerateOptions, w: NonAutoregressiveWrapper, b: number): void {
  if (typeof o.startTemperature !== 'number' || !(o.startTemperature >= 0))
    throw new Error(`startTemperature: expected a non-negative number, got ${fmt(o.startTemperature)}`);
  if (
    o.filterThres !== null &&
    !(typeof o.filterThres === 'number' && o.filterThres >= 0 && o.filterThres < 1)
  )
    throw new Error(`filterThres: expected a number in [0, 1) or null, got ${fmt(o.filterThres)}`);
  if (typeof o.noiseLevelScale !== 'number' || !Number.isFinite(o.noiseLevelScale))
    throw new Error(`noiseLevelScale: expected a finite number, got ${fmt(o.noiseLevelScale)}`);
  if (o.seed !== undefined && !Number.isFinite(o.seed))
    throw new Error(`seed: expected a finite number, got ${fmt(o.seed)}`);
  if (o.noise) {
    const steps = w.options.steps;
    const n = w.maxSeqLen;
    const v = w.net.options.logitsDim ?? w.numTokens;
    if (!Array.isArray(o.noise.gumbel) || o.noise.gumbel.length !== steps)
      throw new Error(
        `noise.gumbel: expected ${steps} tensors (one per step), got ${fmt(o.noise.gumbel?.length)}`,
      );
    o.noise.gumbel.forEach((g, i) =>
      checkTensor(`noise.gumbel[${i}]`, g, { shape: [b, n, v], dtype: 'float32' }),
    );
    if (w.tokenCritic) {
      const c = o.noise.criticGumbel;
      if (!Array.isArray(c) || c.length !== steps)
        throw new Error(
          `noise.criticGumbel: expected ${steps} tensors (one per step), got ${fmt(c?.length)}`,
        );
      c.forEach((g, i) => checkTensor(`noise.criticGumbel[${i}]`, g, { shape: [b, n], dtype: 'float32' }));
    }
  }
}
