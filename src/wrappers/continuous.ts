import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { Linear } from '../nn/linear.js';
import { LayerNorm } from '../nn/norms.js';
import { dropout } from '../nn/functional.js';
import { AbsolutePositionalEmbedding, ScaledSinusoidalEmbedding } from '../nn/embedding.js';
import { getRng } from '../utils/random.js';
import {
  checkMask,
  fmt,
  maskedMean,
  padMaskLeft,
  repeatBatch,
  runLayers,
  type LayersLike,
} from './common.js';
import { checkOptionValues, requireOption, stripUndefined } from '../utils/option-rules.js';
import { OptionError } from '../utils/errors.js';

/** Options of `ContinuousTransformerWrapper` (the reference's keyword arguments in camelCase). */
export interface ContinuousTransformerWrapperOptions {
  /** Longest sequence the absolute positions cover (0: no absolute positions). */
  maxSeqLen: number;
  attnLayers: LayersLike;
  /** Input features; `project_in` Linear(dimIn, dim, no bias) when given, else inputs are [.., dim]. */
  dimIn?: number | null;
  /** Output features; `project_out` Linear(dim, dimOut, no bias) when given. */
  dimOut?: number | null;
  /** Accepted as in the reference (unused there too). */
  embDim?: number | null;
  /** Memories kept per layer with `returnMems`. */
  maxMemLen?: number;
  /** Learned `memory_tokens` [n, dim] prepended to the sequence. */
  numMemoryTokens?: number | null;
  postEmbNorm?: boolean;
  embDropout?: number;
  useAbsPosEmb?: boolean;
  scaledSinuPosEmb?: boolean;
  /** Average the output over the (masked) sequence: [b, dimOut]. */
  averagePoolEmbed?: boolean;
}

/** Scalar options of `ContinuousTransformerWrapper` with the reference's defaults (maxSeqLen has none). */
export const continuousTransformerWrapperDefaults = {
  maxSeqLen: 0,
  dimIn: null as number | null,
  dimOut: null as number | null,
  embDim: null as number | null,
  maxMemLen: 0,
  numMemoryTokens: null as number | null,
  postEmbNorm: false,
  embDropout: 0,
  useAbsPosEmb: true,
  scaledSinuPosEmb: false,
  averagePoolEmbed: false,
};

export type ContinuousTransformerWrapperConfig = typeof continuousTransformerWrapperDefaults;

/** Per-call options of `ContinuousTransformerWrapper.forward`. */
export interface ContinuousForwardOptions {
  /** mask: [b, n] bool, true = keep */
  mask?: tf.Tensor;
  /** Return the embeddings [b, n, dim] (before `project_out`). */
  returnEmbeddings?: boolean;
  /** mems: one [b, m, dim] per attention layer (Transformer-XL) */
  mems?: tf.Tensor[];
  /** pos: [n] int32 custom positions for the absolute positional embedding */
  pos?: tf.Tensor;
  /** prependEmbeds: [b, p, dim] embeddings placed before the sequence */
  prependEmbeds?: tf.Tensor;
  /** prependMask: [b, p] bool */
  prependMask?: tf.Tensor;
  /** context: [b, m, dimContext], contextMask: [b, m] (cross-attending layers) */
  context?: tf.Tensor;
  contextMask?: tf.Tensor;
  /** attnMask: [i, j] or [b|1, h|1, i, j] bool */
  attnMask?: tf.Tensor;
}

/**
 * A transformer over continuous vectors: `project_in` -> + positions -> (post-embedding norm) ->
 * memory tokens -> attention layers -> `project_out`.
 */
export class ContinuousTransformerWrapper extends Module {
  readonly options: ContinuousTransformerWrapperConfig;
  readonly dim: number;
  readonly maxSeqLen: number;
  readonly maxMemLen: number;
  readonly numMemoryTokens: number;
  memoryTokens: tf.Variable | null = null;
  posEmb: AbsolutePositionalEmbedding | ScaledSinusoidalEmbedding | null = null;
  postEmbNorm: LayerNorm | null = null;
  attnLayers: LayersLike;
  projectIn: Linear | null = null;
  projectOut: Linear | null = null;

  constructor(options: ContinuousTransformerWrapperOptions) {
    super();
    const { attnLayers: _given, ...given } = options;
    checkOptionValues(given, continuousTransformerWrapperDefaults, 'ContinuousTransformerWrapper');
    requireOption(given, 'maxSeqLen');
    const o = { ...continuousTransformerWrapperDefaults, ...stripUndefined(options) };
    if (!(options.attnLayers instanceof Module))
      throw OptionError.of('attnLayers', 'an AttentionLayers module', options.attnLayers);
    const { attnLayers: _layers, ...rest } = o;
    this.options = rest;
    const attnLayers = options.attnLayers;
    const dim = attnLayers.dim;
    this.dim = dim;
    this.maxSeqLen = o.maxSeqLen;
    this.maxMemLen = o.maxMemLen;
    this.numMemoryTokens = o.numMemoryTokens ?? 0;

    if (this.numMemoryTokens > 0) {
      this.memoryTokens = this.registerParameter(
        'memory_tokens',
        tf.tensor2d(getRng().fillNormal(this.numMemoryTokens * dim, 0, 1), [this.numMemoryTokens, dim]),
      );
    }
    const noAbsPosEmb = o.maxSeqLen === 0 || !(o.useAbsPosEmb && !attnLayers.disableAbsPosEmb);
    if (!noAbsPosEmb) {
      this.posEmb = this.registerModule(
        'pos_emb',
        o.scaledSinuPosEmb
          ? new ScaledSinusoidalEmbedding(dim)
          : new AbsolutePositionalEmbedding(dim, o.maxSeqLen),
      );
    }
    if (o.postEmbNorm) this.postEmbNorm = this.registerModule('post_emb_norm', new LayerNorm(dim));
    this.attnLayers = this.registerModule('attn_layers', attnLayers);
    if (o.dimIn !== null)
      this.projectIn = this.registerModule('project_in', new Linear(o.dimIn, dim, { bias: false }));
    if (o.dimOut !== null) {
      this.projectOut = this.registerModule('project_out', new Linear(dim, o.dimOut, { bias: false }));
    }
  }

  /**
   * x: [b, n, dimIn] (or [b, n, dim] without dimIn) -> [b, n, dimOut] ([b, n, dim] without dimOut or
   * with `returnEmbeddings`; [b, dimOut] with `averagePoolEmbed`).
   */
  forward(x: tf.Tensor, opts: ContinuousForwardOptions = {}): tf.Tensor {
    const out = this.forwardWithState(x, opts);
    for (const m of out.mems ?? []) m.dispose();
    return out.out;
  }

  /** As `forward`, also returning the new memories (one [b, <=maxMemLen, dim] per layer) when `returnMems`. */
  forwardWithState(
    x: tf.Tensor,
    opts: ContinuousForwardOptions & { returnMems?: boolean } = {},
  ): { out: tf.Tensor; mems?: tf.Tensor[] } {
    const inDim = this.projectIn ? this.projectIn.inFeatures : this.dim;
    if (!(x instanceof tf.Tensor) || x.rank !== 3 || x.shape[2] !== inDim) {
      throw new Error(
        `x: expected shape [batch, seq, ${inDim}]${this.projectIn ? ' (dimIn)' : ' (dim)'}, got ${x instanceof tf.Tensor ? `[${x.shape.join(', ')}]` : fmt(x)}`,
      );
    }
    const [b, n] = x.shape as [number, number, number];
    if (opts.mask) checkMask('mask', opts.mask, b, n);
    if (this.posEmb instanceof AbsolutePositionalEmbedding && n > this.maxSeqLen && !opts.pos) {
      throw new Error(`x: expected a sequence length of at most maxSeqLen ${this.maxSeqLen}, got ${n}`);
    }
    if (opts.prependEmbeds) {
      const p = opts.prependEmbeds;
      if (p.rank !== 3 || p.shape[0] !== b || p.shape[2] !== this.dim) {
        throw new Error(`prependEmbeds: expected shape [${b}, *, ${this.dim}], got [${p.shape.join(', ')}]`);
      }
      if (opts.prependMask) checkMask('prependMask', opts.prependMask, b, p.shape[1]!);
    }
    const result = tf.tidy(() => {
      let h = this.projectIn ? this.projectIn.forward(x) : x;
      if (this.posEmb) h = tf.add(h, this.posEmb.forward(n, opts.pos ? { pos: opts.pos } : {}));
      if (this.postEmbNorm) h = this.postEmbNorm.forward(h);
      let mask = opts.mask;
      if (this.memoryTokens) {
        h = tf.concat([repeatBatch(this.memoryTokens, b), h], 1);
        if (mask) mask = padMaskLeft(mask, this.numMemoryTokens);
      }
      if (opts.prependEmbeds) {
        const p = opts.prependEmbeds;
        h = tf.concat([p, h], 1);
        if (opts.prependMask || mask) {
          const seqMask = mask ?? tf.ones([b, h.shape[1]! - p.shape[1]!], 'bool');
          const preMask = opts.prependMask ?? tf.ones([b, p.shape[1]!], 'bool');
          mask = tf.concat([preMask, seqMask], 1);
        }
      }
      h = dropout(h, this.options.embDropout, this.training);
      const returnHiddens = !!opts.returnMems;
      const { out, hiddens } = runLayers(this.attnLayers, h, {
        mask,
        mems: opts.mems,
        context: opts.context,
        contextMask: opts.contextMask,
        attnMask: opts.attnMask,
        returnHiddens,
      });
      let y = out;
      if (this.memoryTokens) {
        // sequence order is [prepended, memory tokens, x]: drop the memory tokens
        const p = opts.prependEmbeds?.shape[1] ?? 0;
        const tail = tf.slice(y, [0, p + this.numMemoryTokens, 0], [-1, -1, -1]);
        y = p > 0 ? tf.concat([tf.slice(y, [0, 0, 0], [-1, p, -1]), tail], 1) : tail;
      }
      if (this.options.averagePoolEmbed) y = maskedMean(y, opts.mask);
      if (this.projectOut && !opts.returnEmbeddings) y = this.projectOut.forward(y);
      const mems = opts.returnMems
        ? hiddens.map((t) => {
            const len = t.shape[1]!;
            // as the reference's t[..., -maxMemLen:, :], which keeps everything when maxMemLen is 0
            const keep = this.maxMemLen > 0 ? Math.min(this.maxMemLen, len) : len;
            return tf.slice(t, [0, len - keep, 0], [-1, keep, -1]);
          })
        : [];
      return { out: y, mems };
    });
    return opts.returnMems ? result : { out: result.out };
  }
}
