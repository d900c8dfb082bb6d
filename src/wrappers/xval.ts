import * as tf from '@tensorflow/tfjs-core';
import { Module, ModuleList } from '../nn/module.js';
import { Linear } from '../nn/linear.js';
import { dropout } from '../nn/functional.js';
import { AbsolutePositionalEmbedding, ScaledSinusoidalEmbedding, TokenEmbedding } from '../nn/embedding.js';
import { getRng } from '../utils/random.js';
import { checkMask, fmt, padMaskLeft, repeatBatch, runLayers, type LayersLike } from './common.js';
import { checkOptionValues, requireOption, stripUndefined } from '../utils/option-rules.js';
import { OptionError } from '../utils/errors.js';

/** Options of `XValTransformerWrapper` (the reference's keyword arguments in camelCase). */
export interface XValTransformerWrapperOptions {
  numTokens: number;
  maxSeqLen: number;
  /** The token id whose embedding is scaled by the number at its position. */
  numericalTokenId: number;
  attnLayers: LayersLike;
  /** Token embedding size; must equal the model dim (the reference has no projection here). */
  embDim?: number | null;
  /** Output logits size (default numTokens). */
  logitsDim?: number | null;
  /** Logits from the token embedding matrix instead of `to_logits`. */
  tieEmbedding?: boolean;
  maxMemLen?: number;
  /** Learned `memory_tokens` [n, dim] prepended to the sequence. */
  numMemoryTokens?: number | null;
  embDropout?: number;
  useAbsPosEmb?: boolean;
  scaledSinuPosEmb?: boolean;
}

/** Scalar options of `XValTransformerWrapper` with the reference's defaults. */
export const xValTransformerWrapperDefaults = {
  numTokens: 0,
  maxSeqLen: 0,
  numericalTokenId: 0,
  embDim: null as number | null,
  logitsDim: null as number | null,
  tieEmbedding: false,
  maxMemLen: 0,
  numMemoryTokens: null as number | null,
  embDropout: 0,
  useAbsPosEmb: true,
  scaledSinuPosEmb: false,
};

export type XValTransformerWrapperConfig = typeof xValTransformerWrapperDefaults;

/** Per-call options of `XValTransformerWrapper.forward`. */
export interface XValForwardOptions {
  /** mask: [b, n] bool, true = keep */
  mask?: tf.Tensor;
  /** mems: one [b, m, dim] per attention layer */
  mems?: tf.Tensor[];
  /** pos: [n] int32 custom positions */
  pos?: tf.Tensor;
  /** prependEmbeds: [b, p, dim] */
  prependEmbeds?: tf.Tensor;
  /** context: [b, m, dimContext], contextMask: [b, m] (cross-attending layers) */
  context?: tf.Tensor;
  contextMask?: tf.Tensor;
  attnMask?: tf.Tensor;
}

/** What `XValTransformerWrapper.forward` returns. */
export interface XValOutput {
  /** logits: [b, n, logitsDim] */
  logits: tf.Tensor;
  /** numerical: [b, n] predicted number at every position */
  numerical: tf.Tensor;
}

/**
 * xVal (arXiv 2310.02989): discrete tokens whose numerical token embedding is scaled by the number
 * it stands for; predicts both token logits (`to_logits`, with bias) and a number
 * (`to_numerical_output.0`, Linear(dim, 1)) per position.
 */
export class XValTransformerWrapper extends Module {
  readonly options: XValTransformerWrapperConfig;
  readonly dim: number;
  readonly numMemoryTokens: number;
  tokenEmb: TokenEmbedding;
  posEmb: AbsolutePositionalEmbedding | ScaledSinusoidalEmbedding | null = null;
  memoryTokens: tf.Variable | null = null;
  attnLayers: LayersLike;
  toLogits: Linear | null = null;
  toNumericalOutput: ModuleList<Linear>;

  constructor(options: XValTransformerWrapperOptions) {
    super();
    const { attnLayers, ...given } = options;
    checkOptionValues(given, xValTransformerWrapperDefaults, 'XValTransformerWrapper');
    for (const k of ['numTokens', 'maxSeqLen', 'numericalTokenId']) requireOption(given, k);
    const o = { ...xValTransformerWrapperDefaults, ...stripUndefined(given) };
    if (o.maxSeqLen === 0)
      throw new OptionError('maxSeqLen', 'a positive integer (the size of the position tables)', '0');
    if (o.numericalTokenId >= o.numTokens)
      throw new OptionError(
        'numericalTokenId',
        `a token id below numTokens ${o.numTokens}`,
        String(o.numericalTokenId),
      );
    if (!(attnLayers instanceof Module))
      throw OptionError.of('attnLayers', 'an AttentionLayers module', attnLayers);
    const dim = attnLayers.dim;
    if (o.embDim !== null && o.embDim !== dim) {
      throw new Error(
        `embDim: expected the model dim ${dim} (xVal has no embedding projection), got ${fmt(o.embDim)}`,
      );
    }
    if (o.tieEmbedding && o.logitsDim !== null && o.logitsDim !== o.numTokens) {
      throw new Error(`logitsDim: expected numTokens ${o.numTokens} with tieEmbedding, got ${o.logitsDim}`);
    }
    this.options = o;
    this.dim = dim;
    this.numMemoryTokens = o.numMemoryTokens ?? 0;
    const rng = getRng();

    this.tokenEmb = this.registerModule('token_emb', new TokenEmbedding(dim, o.numTokens, { rng }));
    if (o.useAbsPosEmb && !attnLayers.disableAbsPosEmb) {
      this.posEmb = this.registerModule(
        'pos_emb',
        o.scaledSinuPosEmb
          ? new ScaledSinusoidalEmbedding(dim)
          : new AbsolutePositionalEmbedding(dim, o.maxSeqLen, { rng }),
      );
    }
    if (this.numMemoryTokens > 0) {
      this.memoryTokens = this.registerParameter(
        'memory_tokens',
        tf.tensor2d(rng.fillNormal(this.numMemoryTokens * dim, 0, 1), [this.numMemoryTokens, dim]),
      );
    }
    this.attnLayers = this.registerModule('attn_layers', attnLayers);
    if (!o.tieEmbedding) {
      this.toLogits = this.registerModule('to_logits', new Linear(dim, o.logitsDim ?? o.numTokens, { rng }));
    }
    this.toNumericalOutput = this.registerModule(
      'to_numerical_output',
      new ModuleList([new Linear(dim, 1, { rng })]),
    );
  }

  /** ids: [b, n] int32, nums: [b, n] float32 (read where ids == numericalTokenId) -> logits and numbers. */
  forward(ids: tf.Tensor, nums: tf.Tensor, opts: XValForwardOptions = {}): XValOutput {
    const [embeddings] = this.embed(ids, nums, opts);
    return tf.tidy(() => {
      const logits = this.toLogits
        ? this.toLogits.forward(embeddings)
        : tf.matMul(embeddings, this.tokenEmb.emb.weight, false, true);
      const numerical = tf.squeeze(this.toNumericalOutput.at(0).forward(embeddings), [-1]);
      embeddings.dispose();
      return { logits, numerical };
    });
  }

  /** ids: [b, n], nums: [b, n] -> embeddings [b, n, dim] after the attention layers. */
  forwardEmbeddings(ids: tf.Tensor, nums: tf.Tensor, opts: XValForwardOptions = {}): tf.Tensor {
    return this.embed(ids, nums, opts)[0];
  }

  private embed(ids: tf.Tensor, nums: tf.Tensor, opts: XValForwardOptions): [tf.Tensor] {
    if (!(ids instanceof tf.Tensor) || ids.rank !== 2) {
      throw new Error(
        `ids: expected shape [batch, seq], got ${ids instanceof tf.Tensor ? `[${ids.shape.join(', ')}]` : fmt(ids)}`,
      );
    }
    if (ids.dtype !== 'int32') throw new Error(`ids: expected dtype int32, got ${ids.dtype}`);
    if (
      !(nums instanceof tf.Tensor) ||
      nums.rank !== 2 ||
      nums.shape[0] !== ids.shape[0] ||
      nums.shape[1] !== ids.shape[1]
    ) {
      throw new Error(
        `nums: expected the shape of ids [${ids.shape.join(', ')}], got ${nums instanceof tf.Tensor ? `[${nums.shape.join(', ')}]` : fmt(nums)}`,
      );
    }
    const [b, n] = ids.shape as [number, number];
    if (this.posEmb instanceof AbsolutePositionalEmbedding && n > this.options.maxSeqLen && !opts.pos) {
      throw new Error(
        `ids: expected a sequence length of at most maxSeqLen ${this.options.maxSeqLen}, got ${n}`,
      );
    }
    if (opts.mask) checkMask('mask', opts.mask, b, n);
    if (opts.prependEmbeds && (opts.prependEmbeds.rank !== 3 || opts.prependEmbeds.shape[2] !== this.dim)) {
      throw new Error(
        `prependEmbeds: expected shape [${b}, *, ${this.dim}], got [${opts.prependEmbeds.shape.join(', ')}]`,
      );
    }
    return [
      tf.tidy(() => {
        const isNumber = tf.equal(ids, this.options.numericalTokenId);
        const scale = tf.where(isNumber, tf.cast(nums, 'float32'), tf.fill(ids.shape, 1));
        let x = tf.mul(this.tokenEmb.forward(ids), tf.expandDims(scale, -1));
        if (this.posEmb) x = tf.add(x, this.posEmb.forward(n, opts.pos ? { pos: opts.pos } : {}));
        let mask = opts.mask;
        if (this.memoryTokens) {
          x = tf.concat([repeatBatch(this.memoryTokens, b), x], 1);
          if (mask) mask = padMaskLeft(mask, this.numMemoryTokens);
        }
        if (opts.prependEmbeds) {
          x = tf.concat([opts.prependEmbeds, x], 1);
          if (mask) mask = padMaskLeft(mask, opts.prependEmbeds.shape[1]!);
        }
        x = dropout(x, this.options.embDropout, this.training);
        let { out } = runLayers(this.attnLayers, x, {
          mask,
          mems: opts.mems,
          context: opts.context,
          contextMask: opts.contextMask,
          attnMask: opts.attnMask,
        });
        if (this.memoryTokens) {
          const p = opts.prependEmbeds?.shape[1] ?? 0;
          const tail = tf.slice(out, [0, p + this.numMemoryTokens, 0], [-1, -1, -1]);
          out = p > 0 ? tf.concat([tf.slice(out, [0, 0, 0], [-1, p, -1]), tail], 1) : tail;
        }
        return out;
      }),
    ];
  }
}
