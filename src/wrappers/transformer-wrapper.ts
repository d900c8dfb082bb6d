import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { Linear } from '../nn/linear.js';
import { LayerNorm } from '../nn/norms.js';
import { AbsolutePositionalEmbedding, ScaledSinusoidalEmbedding, TokenEmbedding } from '../nn/embedding.js';
import { dropout, padAt, tidyObj } from '../nn/functional.js';
import { AttentionLayers, type LayersCache } from '../layers/attention-layers.js';
import { checkTensor } from '../utils/errors.js';
import { getRng } from '../utils/random.js';

/** Options of `TransformerWrapper` (camelCase of the reference's keyword names). */
export interface TransformerWrapperOwnOptions {
  numTokens: number;
  maxSeqLen: number;
  embDim: number | null;
  maxMemLen: number;
  shiftMemDown: number;
  embDropout: number;
  postEmbNorm: boolean;
  numMemoryTokens: number | null;
  tieEmbedding: boolean;
  logitsDim: number | null;
  returnOnlyEmbed: boolean;
  useAbsPosEmb: boolean;
  scaledSinuPosEmb: boolean;
  l2normEmbed: boolean;
  embFracGradient: number;
  averagePoolEmbed: boolean;
  useClsToken: boolean;
  numClsTokens: number;
  squeezeOutLastDim: boolean;
  sigsoftmaxLogits: boolean;
}

export interface TransformerWrapperOptions extends Partial<TransformerWrapperOwnOptions> {
  numTokens: number;
  maxSeqLen: number;
  attnLayers: AttentionLayers;
}

export const transformerWrapperDefaults: TransformerWrapperOwnOptions = {
  numTokens: 0,
  maxSeqLen: 0,
  embDim: null,
  maxMemLen: 0,
  shiftMemDown: 0,
  embDropout: 0,
  postEmbNorm: false,
  numMemoryTokens: null,
  tieEmbedding: false,
  logitsDim: null,
  returnOnlyEmbed: false,
  useAbsPosEmb: true,
  scaledSinuPosEmb: false,
  l2normEmbed: false,
  embFracGradient: 1,
  averagePoolEmbed: false,
  useClsToken: false,
  numClsTokens: 1,
  squeezeOutLastDim: false,
  sigsoftmaxLogits: false,
};

/** Per-call options of `TransformerWrapper.forward` / `forwardWithState`. */
export interface TransformerForwardOptions {
  /** mask: [b, n] bool, true = keep. */
  mask?: tf.Tensor;
  /** Return the final embeddings [b, n, dim] instead of logits (forward only). */
  returnEmbeddings?: boolean;
  /** mems: one [b, m, dim] per self-attention layer (XL recurrence). */
  mems?: tf.Tensor[];
  /** memMasks: one [b, m] bool per self-attention layer. */
  memMasks?: tf.Tensor[];
  /** Return the next mems (forwardWithState). */
  returnMems?: boolean;
  /** KV cache of earlier steps: x is the whole sequence so far; only its last token(s) are computed. */
  cache?: LayersCache;
  /** How many trailing positions to compute with a cache (default 1). */
  cacheAge?: number;
  /** Return a KV cache including this call (forwardWithState). */
  returnCache?: boolean;
  /** prependEmbeds: [b, p, dim] embeddings placed before the tokens (PaLI style). */
  prependEmbeds?: tf.Tensor;
  /** prependMask: [b, p] bool. */
  prependMask?: tf.Tensor;
  /** sumEmbeds: [b, n, embDim] added to the token embeddings. */
  sumEmbeds?: tf.Tensor;
  /** posOverride: [n] (or [b, n]) int32 positions for the absolute embedding, or [b, n, embDim] float embeddings. */
  posOverride?: tf.Tensor;
  /** seqStartPos: [b] int32 first real position of left-padded rows. */
  seqStartPos?: tf.Tensor;
  /** context / contextMask / attnMask / selfAttnKvMask: passed to the attention layers. */
  context?: tf.Tensor;
  contextMask?: tf.Tensor;
  attnMask?: tf.Tensor;
  selfAttnKvMask?: tf.Tensor;
  /** condition: [b, dimCondition] or [b, n, dimCondition] for adaptive norms / layerscale. */
  condition?: tf.Tensor;
}

/** What `forwardWithState` returns; the caller owns every tensor (and the cache). */
export interface TransformerState {
  /** logits: [b, n, logitsDim] (absent with returnOnlyEmbed). */
  logits: tf.Tensor;
  /** embeddings: [b, n, dim] after the attention layers. */
  embeddings: tf.Tensor;
  mems?: tf.Tensor[];
  cache?: LayersCache;
}

/** Identity whose gradient is zero (torch's detach). */
const detach = tf.customGrad(((x: tf.Tensor) => ({
  value: x.clone(),
  gradFunc: (dy: tf.Tensor) => tf.zerosLike(dy),
})) as unknown as Parameters<typeof tf.customGrad>[0]) as unknown as (x: tf.Tensor) => tf.Tensor;

/**
 * Token ids in, logits out: token (+ absolute position) embedding, attention layers, projection to
 * logits, as the reference's TransformerWrapper. Parameters: `token_emb.emb.weight`,
 * `pos_emb.emb.weight` (or `pos_emb.scale`), `post_emb_norm.gamma`, `project_emb`, `attn_layers.*`,
 * `to_logits.weight`, `memory_tokens`, `cls_token`.
 */
export class TransformerWrapper extends Module {
  readonly options: TransformerWrapperOwnOptions;
  readonly numTokens: number;
  readonly maxSeqLen: number;
  readonly dim: number;
  readonly embDim: number;
  readonly numMemoryTokens: number;
  readonly hasAbsPosEmb: boolean;
  tokenEmb: TokenEmbedding;
  posEmb: AbsolutePositionalEmbedding | ScaledSinusoidalEmbedding | null = null;
  postEmbNorm: LayerNorm | null = null;
  projectEmb: Linear | null = null;
  attnLayers: AttentionLayers;
  clsToken: tf.Variable | null = null;
  toLogits: Linear | null = null;
  memoryTokens: tf.Variable | null = null;

  constructor(options: TransformerWrapperOptions) {
    super();
    const { attnLayers, ...rest } = options;
    for (const k of Object.keys(rest))
      if (!(k in transformerWrapperDefaults)) throw new Error(`${k}: unknown TransformerWrapper option`);
    const o: TransformerWrapperOwnOptions = { ...transformerWrapperDefaults, ...stripUndefined(rest) };
    if (!(attnLayers instanceof AttentionLayers))
      throw new Error(
        `attnLayers: expected an AttentionLayers (Encoder, Decoder...), got ${String(attnLayers)}`,
      );
    if (!Number.isInteger(o.numTokens) || o.numTokens <= 0)
      throw new Error(`numTokens: expected a positive integer, got ${o.numTokens}`);
    if (!Number.isInteger(o.maxSeqLen) || o.maxSeqLen < 0)
      throw new Error(`maxSeqLen: expected a non-negative integer, got ${o.maxSeqLen}`);
    if (!(o.embDropout >= 0 && o.embDropout < 1))
      throw new Error(`embDropout: expected a number in [0, 1), got ${o.embDropout}`);
    if (!(o.embFracGradient > 0 && o.embFracGradient <= 1))
      throw new Error(`embFracGradient: expected a number in (0, 1], got ${o.embFracGradient}`);
    if (o.averagePoolEmbed && o.useClsToken)
      throw new Error('averagePoolEmbed: expected at most one of averagePoolEmbed and useClsToken');
    const nm = o.numMemoryTokens ?? 0;
    if (!Number.isInteger(nm) || nm < 0)
      throw new Error(`numMemoryTokens: expected a non-negative integer, got ${o.numMemoryTokens}`);
    this.options = o;
    this.numTokens = o.numTokens;
    this.maxSeqLen = o.maxSeqLen;
    const dim = attnLayers.dim;
    this.dim = dim;
    const embDim = o.embDim ?? dim;
    this.embDim = embDim;
    this.numMemoryTokens = nm;
    const rng = getRng();

    this.tokenEmb = this.registerModule(
      'token_emb',
      new TokenEmbedding(embDim, o.numTokens, { l2normEmbed: o.l2normEmbed, rng }),
    );
    const noAbs = o.maxSeqLen === 0 || !(o.useAbsPosEmb && !attnLayers.disableAbsPosEmb);
    this.hasAbsPosEmb = !noAbs;
    if (!noAbs) {
      this.posEmb = this.registerModule(
        'pos_emb',
        o.scaledSinuPosEmb
          ? new ScaledSinusoidalEmbedding(embDim)
          : new AbsolutePositionalEmbedding(embDim, o.maxSeqLen, { l2normEmbed: o.l2normEmbed, rng }),
      );
    }
    if (o.postEmbNorm) this.postEmbNorm = this.registerModule('post_emb_norm', new LayerNorm(embDim));
    if (embDim !== dim)
      this.projectEmb = this.registerModule('project_emb', new Linear(embDim, dim, { rng }));
    this.attnLayers = this.registerModule('attn_layers', attnLayers);
    if (o.useClsToken) {
      this.clsToken = this.registerParameter(
        'cls_token',
        tf.tensor2d(rng.fillNormal(o.numClsTokens * dim, 0, 0.02), [o.numClsTokens, dim]),
      );
    }
    const logitsDim = o.logitsDim ?? o.numTokens;
    if (!o.returnOnlyEmbed && !o.tieEmbedding) {
      this.toLogits = this.registerModule('to_logits', new Linear(dim, logitsDim, { bias: false, rng }));
    }
    if (o.tieEmbedding && embDim !== dim)
      throw new Error(`tieEmbedding: expected embDim equal to the model dim ${dim}, got ${embDim}`);
    if (nm > 0) {
      this.memoryTokens = this.registerParameter(
        'memory_tokens',
        tf.tensor2d(rng.fillNormal(nm * dim, 0, 1), [nm, dim]),
      );
    }
  }

  /** Whether KV-cached decoding is possible (no memory tokens). */
  get canCacheKv(): boolean {
    return this.numMemoryTokens === 0 && this.attnLayers.canCacheKv;
  }

  /** Whether cached decoding may run past maxSeqLen (no absolute positions). */
  get canCacheKvOutsideMaxSeqLen(): boolean {
    return !this.hasAbsPosEmb;
  }

  /**
   * x: [b, n] int32 token ids -> logits [b, n, logitsDim], or embeddings [b, n, dim] with
   * `returnEmbeddings` (or `returnOnlyEmbed`).
   */
  forward(x: tf.Tensor, opts: TransformerForwardOptions = {}): tf.Tensor {
    const { returnEmbeddings, ...rest } = opts;
    const st = this.run(x, { ...rest, returnMems: false, returnCache: false }, !returnEmbeddings);
    if (returnEmbeddings || !st.logits) return st.embeddings;
    st.embeddings.dispose();
    return st.logits;
  }

  /** x: [b, n] int32 -> logits, embeddings, and with returnMems / returnCache the next mems and cache. */
  forwardWithState(x: tf.Tensor, opts: TransformerForwardOptions = {}): TransformerState {
    return this.run(x, opts, true);
  }

  private validate(x: tf.Tensor, opts: TransformerForwardOptions): void {
    checkTensor('x', x, { rank: 2, dtype: 'int32', desc: 'token ids [batch, seq]' });
    const [b, n] = x.shape as [number, number];
    if (x.size > 0) {
      // one read of the ids (no min / max kernels, one sync instead of two)
      const ids = x.dataSync();
      let mn = ids[0]!;
      let mx = mn;
      for (let i = 1; i < ids.length; i++) {
        const v = ids[i]!;
        if (v < mn) mn = v;
        else if (v > mx) mx = v;
      }
      if (mn < 0 || mx >= this.numTokens)
        throw new Error(`x: expected token ids in [0, ${this.numTokens}), got values in [${mn}, ${mx}]`);
    }
    const external = opts.posOverride && opts.posOverride.dtype === 'float32';
    if (
      this.posEmb instanceof AbsolutePositionalEmbedding &&
      !external &&
      !opts.posOverride &&
      n > this.maxSeqLen
    )
      throw new Error(
        `x: expected a sequence length of at most maxSeqLen ${this.maxSeqLen} (absolute positional embedding), got ${n}`,
      );
    if (opts.mask) checkTensor('mask', opts.mask, { shape: [b, n], dtype: 'bool' });
    if (opts.prependEmbeds) {
      checkTensor('prependEmbeds', opts.prependEmbeds, { shape: [b, null, this.embDim], dtype: 'float32' });
      if (opts.prependMask)
        checkTensor('prependMask', opts.prependMask, {
          shape: [b, opts.prependEmbeds.shape[1]!],
          dtype: 'bool',
        });
    } else if (opts.prependMask) throw new Error('prependMask: given without prependEmbeds');
    if (opts.sumEmbeds)
      checkTensor('sumEmbeds', opts.sumEmbeds, { shape: [b, n, this.embDim], dtype: 'float32' });
    if (opts.seqStartPos) checkTensor('seqStartPos', opts.seqStartPos, { shape: [b], dtype: 'int32' });
    if (opts.cache && !this.canCacheKv)
      throw new Error(
        'cache: this model cannot decode with a KV cache (memory tokens, token shifting or an attention layer that cannot cache)',
      );
  }

  private run(x: tf.Tensor, opts: TransformerForwardOptions, wantLogits: boolean): TransformerState {
    this.validate(x, opts);
    const o = this.options;
    const [b, n] = x.shape as [number, number];
    const training = this.training;
    const numMem = this.numMemoryTokens;
    const wantMems = !!opts.returnMems;
    let cache: LayersCache | undefined;
    const out = tidyObj(() => {
      let pos: tf.Tensor | number = 0;
      const po = opts.posOverride;
      if (po && po.dtype === 'float32') pos = po;
      else if (this.posEmb) pos = this.posEmb.forward(n, { pos: po, seqStartPos: opts.seqStartPos });
      let h: tf.Tensor = this.tokenEmb.forward(x);
      if (pos !== 0) h = tf.add(h, pos);
      if (opts.sumEmbeds) h = tf.add(h, opts.sumEmbeds);
      if (this.postEmbNorm) h = this.postEmbNorm.forward(h);
      let mask = opts.mask;
      // a self-attention key mask covers the tokens; extra positions put in front are visible
      let kvMask = opts.selfAttnKvMask;
      if (opts.prependEmbeds) {
        const p = opts.prependEmbeds.shape[1]!;
        h = tf.concat([opts.prependEmbeds, h], 1);
        if (kvMask) kvMask = padAt(kvMask, 1, p, 0, 1);
        if (opts.prependMask || mask) {
          const m = mask ?? tf.ones([b, n], 'bool');
          const pm = opts.prependMask ?? tf.ones([b, p], 'bool');
          mask = tf.concat([tf.cast(pm, 'bool'), tf.cast(m, 'bool')], 1);
        }
      }
      if (o.embFracGradient < 1) {
        h = tf.add(tf.mul(h, o.embFracGradient), tf.mul(detach(h), 1 - o.embFracGradient));
      }
      h = dropout(h, o.embDropout, training);
      if (this.projectEmb) h = this.projectEmb.forward(h);
      if (this.clsToken) {
        h = tf.concat([tf.tile(tf.expandDims(this.clsToken, 0), [b, 1, 1]), h], 1);
        if (mask) mask = padAt(mask, 1, o.numClsTokens, 0, 1);
        if (kvMask) kvMask = padAt(kvMask, 1, o.numClsTokens, 0, 1);
      }
      const memSeq = h.shape[1]!;
      if (numMem > 0) {
        h = tf.concat([tf.tile(tf.expandDims(this.memoryTokens!, 0), [b, 1, 1]), h], 1);
        if (mask) mask = padAt(mask, 1, numMem, 0, 1);
        if (kvMask) kvMask = padAt(kvMask, 1, numMem, 0, 1);
      }
      let mems = opts.mems;
      if (o.shiftMemDown && mems && mems.length) {
        const k = o.shiftMemDown;
        mems = [...mems.slice(k), ...mems.slice(0, k)];
      }
      const res = this.attnLayers.forward(h, {
        mask,
        mems,
        memMasks: opts.memMasks,
        cache: opts.cache,
        cacheAge: opts.cacheAge,
        returnCache: opts.returnCache,
        returnHiddens: wantMems,
        seqStartPos: opts.seqStartPos,
        context: opts.context,
        contextMask: opts.contextMask,
        attnMask: opts.attnMask,
        selfAttnKvMask: kvMask,
        condition: opts.condition,
      });
      cache = res.cache;
      let e = res.out;
      if (numMem > 0) e = tf.slice(e, [0, numMem, 0], [-1, memSeq, -1]);
      if (o.averagePoolEmbed) {
        if (opts.mask) {
          const m = tf.expandDims(tf.cast(opts.mask, 'float32'), -1);
          e = tf.div(tf.sum(tf.mul(e, m), 1), tf.maximum(tf.sum(m, 1), 1));
        } else e = tf.mean(e, 1);
      }
      if (this.clsToken) {
        e = tf.slice(e, [0, 0, 0], [-1, o.numClsTokens, -1]);
        if (o.numClsTokens === 1) e = tf.squeeze(e, [1]);
      }
      let logits: tf.Tensor | null = null;
      if (wantLogits && !o.returnOnlyEmbed) {
        let l: tf.Tensor = o.tieEmbedding
          ? tf.reshape(tf.matMul(tf.reshape(e, [-1, this.dim]), this.tokenEmb.emb.weight, false, true), [
              ...e.shape.slice(0, -1),
              this.numTokens,
            ])
          : this.toLogits!.forward(e);
        if (o.sigsoftmaxLogits) l = tf.add(l, tf.log(tf.sigmoid(l)));
        if (o.squeezeOutLastDim && l.shape[l.rank - 1] === 1) l = tf.squeeze(l, [-1]);
        logits = l;
      }
      let newMems: tf.Tensor[] | undefined;
      if (wantMems) {
        const hiddens = res.hiddens;
        const pairs = mems && mems.length ? hiddens.map((hd, i) => tf.concat([mems![i]!, hd], 1)) : hiddens;
        newMems = pairs.map((t) => {
          const len = t.shape[1]!;
          const keep = o.maxMemLen > 0 ? Math.min(o.maxMemLen, len) : len;
          return detach(tf.slice(t, [0, len - keep, 0], [-1, keep, -1]));
        });
      }
      return { logits, embeddings: e, mems: newMems };
    });
    return {
      logits: out.logits as tf.Tensor,
      embeddings: out.embeddings,
      ...(out.mems ? { mems: out.mems } : {}),
      ...(cache ? { cache } : {}),
    };
  }
}

function stripUndefined<T extends object>(o: T): Partial<T> {
  const out: Partial<T> = {};
  for (const [k, v] of Object.entries(o)) if (v !== undefined) (out as Record<string, unknown>)[k] = v;
  return out;
}
