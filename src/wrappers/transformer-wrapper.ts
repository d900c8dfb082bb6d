import * as tf from '@tensorflow/tfjs-core';
import { stopGradient } from '../attention/ops.js';
import { Module, ModuleDict, ModuleList } from '../nn/module.js';
import { rowStableProducts } from '../backend/index.js';
import { Linear } from '../nn/linear.js';
import { Embedding } from '../nn/embedding.js';
import { LayerNorm } from '../nn/norms.js';
import { AbsolutePositionalEmbedding, ScaledSinusoidalEmbedding, TokenEmbedding } from '../nn/embedding.js';
import { dropout, tidyObj } from '../nn/functional.js';
import { AttentionLayers, Decoder, type LayersCache } from '../layers/attention-layers.js';
import { OptionError, checkTensor } from '../utils/errors.js';
import { onGpu } from '../backend/index.js';
import { getRng } from '../utils/random.js';
import {
  attentionZLoss,
  dropInterspersedMemory,
  intersperseMemoryTokens,
  nextMems,
  checkSharedInputs,
  putInFront,
  putTokensInFront,
  scaleEmbGradient,
  type MaskedEmbeds,
} from './common.js';
import { checkOptionValues, requireOption, stripUndefined } from '../utils/option-rules.js';

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
  /** Extra embedding tables summed into the token embedding, by name: `{segment: 2}` (ids given as `embedIds`). */
  embedNumTokens: Record<string, number>;
  /** Memory tokens put before every chunk of this many tokens instead of once in front (Decoder only). */
  memoryTokensInterspersedEvery: number | null;
  /** Independent projections to logits (`to_logits.<i>`); read them with `forwardHeads`. */
  numOutputHeads: number;
  /** Run the attention layers again on their own projected output (AlphaFold2's recycling). */
  recycling: boolean;
  /** In training, the number of recycling steps is drawn from 1..trainMaxRecycleSteps. */
  trainMaxRecycleSteps: number;
  /** Default weight of the attention z-loss (`returnAttnZLoss`). */
  attnZLossWeight: number;
  /** Mixture of softmaxes: the output is log-probabilities mixed from mixtureOfSoftmaxK softmaxes. */
  mixtureOfSoftmax: boolean;
  mixtureOfSoftmaxK: number;
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
  embedNumTokens: {},
  memoryTokensInterspersedEvery: null,
  numOutputHeads: 1,
  recycling: false,
  trainMaxRecycleSteps: 4,
  attnZLossWeight: 1e-4,
  mixtureOfSoftmax: false,
  mixtureOfSoftmaxK: 4,
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
  /**
   * Rows of different lengths decoded together (forwardWithState): x is [b, 1], each row's next
   * token, and row i continues `rowCaches[i]` (a cache of that row alone, which gives its position);
   * the state's `rowCaches` include this step. See `rowsUnsupported`.
   */
  rowCaches?: LayersCache[];
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
  /** embedIds: one [b, n] int32 tensor per name of `embedNumTokens` (all of them). */
  embedIds?: Record<string, tf.Tensor>;
  /** Recycling steps (recycling models; required outside training, where it defaults to a random 1..trainMaxRecycleSteps). */
  recycleSteps?: number;
  /**
   * Logits of the last position only (forwardWithState): [b, 1, numTokens], the same numbers as the
   * last position of the whole logits; so are the embeddings returned. A decoding step's prefill
   * needs no others, and with a large vocabulary the others cost most of a long prompt's forward.
   * Ignored where the output is not per position (averagePoolEmbed, CLS tokens).
   */
  lastPositionLogits?: boolean;
  /** Return the attention z-loss (forwardWithState): needs the attention logits, so not with attnFlash. */
  returnAttnZLoss?: boolean;
  /** Weight of the attention z-loss (default: the model's attnZLossWeight). */
  attnZLossWeight?: number;
}

/** What `forwardWithState` returns; the caller owns every tensor (and the cache). */
export interface TransformerState {
  /** logits: [b, n, logitsDim] (absent with returnOnlyEmbed). */
  logits: tf.Tensor;
  /** embeddings: [b, n, dim] after the attention layers. */
  embeddings: tf.Tensor;
  mems?: tf.Tensor[];
  cache?: LayersCache;
  /** With rowCaches: each row's cache including this call. */
  rowCaches?: LayersCache[];
  /** With numOutputHeads > 1: the logits of every head (`logits` is the first). */
  headLogits?: tf.Tensor[];
  /**
   * With returnAttnZLoss, a scalar: the weight times the mean over batch and queries of the sum over
   * heads of (the sum over attention layers of logsumexp of the attention logits)^2.
   */
  attnZLoss?: tf.Tensor;
}

/**
 * Token ids in, logits out: token (+ absolute position) embedding, attention layers, projection to
 * logits, as the reference's TransformerWrapper. Parameters: `token_emb.emb.weight`,
 * `pos_emb.emb.weight` (or `pos_emb.scale`), `post_emb_norm.gamma`, `project_emb`, `attn_layers.*`,
 * `to_logits.weight` (`to_logits.<i>.weight` per output head), `memory_tokens`, `cls_token`,
 * `embeds.<name>_embed.weight`, `recycled_proj.weight`, `to_mixture.0.weight`, `combine_mixture.weight`.
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
  /** embedNumTokens' tables, by name (registered as `embeds.<name>_embed`). */
  embeds: Map<string, Embedding> = new Map();
  recycledProj: Linear | null = null;
  toMixture: ModuleList<Linear> | null = null;
  combineMixture: Linear | null = null;
  toLogitsHeads: ModuleList<Linear> | null = null;

  constructor(options: TransformerWrapperOptions) {
    super();
    const { attnLayers, ...rest } = options;
    checkOptionValues(rest, transformerWrapperDefaults, 'TransformerWrapper');
    requireOption(rest, 'numTokens');
    requireOption(rest, 'maxSeqLen');
    const o: TransformerWrapperOwnOptions = { ...transformerWrapperDefaults, ...stripUndefined(rest) };
    if (!(attnLayers instanceof AttentionLayers))
      throw OptionError.of('attnLayers', 'an AttentionLayers (Encoder, Decoder...)', attnLayers);
    if (o.averagePoolEmbed && o.useClsToken)
      throw new OptionError('averagePoolEmbed', 'false with useClsToken (at most one of them)', 'true');
    const nm = o.numMemoryTokens ?? 0;
    checkOutputOptions(o);
    if (o.memoryTokensInterspersedEvery !== null && nm > 0 && !(attnLayers instanceof Decoder))
      throw new OptionError(
        'memoryTokensInterspersedEvery',
        'a Decoder (causal attention layers)',
        attnLayers.constructor.name,
      );
    const embedNames = checkEmbedNumTokens(o.embedNumTokens);
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
    if (embedNames.length) {
      const tables = this.registerModule('embeds', new ModuleDict<Embedding>());
      for (const name of embedNames)
        this.embeds.set(
          name,
          tables.set(`${name}_embed`, new Embedding(o.embedNumTokens[name]!, embDim, { rng })),
        );
    }
    if (o.postEmbNorm) this.postEmbNorm = this.registerModule('post_emb_norm', new LayerNorm(embDim));
    if (embDim !== dim)
      this.projectEmb = this.registerModule('project_emb', new Linear(embDim, dim, { rng }));
    this.attnLayers = this.registerModule('attn_layers', attnLayers);
    if (o.recycling)
      this.recycledProj = this.registerModule('recycled_proj', new Linear(dim, dim, { bias: false, rng }));
    if (o.useClsToken) {
      this.clsToken = this.registerParameter(
        'cls_token',
        tf.tensor2d(rng.fillNormal(o.numClsTokens * dim, 0, 0.02), [o.numClsTokens, dim]),
      );
    }
    if (o.mixtureOfSoftmax) {
      const k = o.mixtureOfSoftmaxK;
      this.toMixture = this.registerModule(
        'to_mixture',
        new ModuleList([new Linear(dim, dim * k, { bias: false, rng })]),
      );
      this.combineMixture = this.registerModule('combine_mixture', new Linear(dim, k, { bias: false, rng }));
    }
    const logitsDim = o.logitsDim ?? o.numTokens;
    if (!o.returnOnlyEmbed && !o.tieEmbedding) {
      if (o.numOutputHeads > 1) {
        const heads = Array.from(
          { length: o.numOutputHeads },
          () => new Linear(dim, logitsDim, { bias: false, rng }),
        );
        this.toLogitsHeads = this.registerModule('to_logits', new ModuleList(heads));
      } else {
        this.toLogits = this.registerModule('to_logits', new Linear(dim, logitsDim, { bias: false, rng }));
      }
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

  /** Whether KV-cached decoding is possible (no memory tokens, no recycling). */
  get canCacheKv(): boolean {
    return this.numMemoryTokens === 0 && !this.options.recycling && this.attnLayers.canCacheKv;
  }

  /**
   * Why this model cannot decode rows of different lengths together (`rowCaches`), or null when it
   * can: besides what its attention layers need (AttentionLayers.rowsUnsupported), no extra
   * embedding tables, class tokens, pooled or embedding-only outputs.
   */
  get rowsUnsupported(): string | null {
    const o = this.options;
    if (!this.canCacheKv) return 'no key/value cache (memory tokens, recycling or a layer that cannot cache)';
    const why = this.attnLayers.rowsUnsupported;
    if (why) return why;
    if (this.embeds.size > 0) return 'embedNumTokens (ids per row and position)';
    if (this.clsToken) return 'class tokens';
    if (o.averagePoolEmbed) return 'averagePoolEmbed';
    if (o.returnOnlyEmbed) return 'returnOnlyEmbed (no logits)';
    // decoding alone projects the embeddings of the whole window, on the many-row product path
    if (this.projectEmb) return 'embDim different from the layers dim (a projected embedding)';
    return null;
  }

  /** Whether the output is log-probabilities rather than logits (mixture of softmaxes). */
  get outputIsLogProb(): boolean {
    return this.options.mixtureOfSoftmax;
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
    const heads = this.options.numOutputHeads;
    if (!returnEmbeddings && this.toLogitsHeads)
      throw new Error(
        `numOutputHeads: the model has ${heads} output heads; read their logits with forwardHeads`,
      );
    const st = this.run(
      x,
      { ...rest, returnMems: false, returnCache: false, returnAttnZLoss: false },
      !returnEmbeddings,
    );
    if (returnEmbeddings || !st.logits) return st.embeddings;
    st.embeddings.dispose();
    return st.logits;
  }

  /** x: [b, n] int32 -> the logits of every output head (numOutputHeads of them), each [b, n, logitsDim]. */
  forwardHeads(x: tf.Tensor, opts: Omit<TransformerForwardOptions, 'returnEmbeddings'> = {}): tf.Tensor[] {
    if (this.options.returnOnlyEmbed)
      throw new Error('forwardHeads: the model has no output head (returnOnlyEmbed)');
    const st = this.run(x, { ...opts, returnMems: false, returnCache: false, returnAttnZLoss: false }, true);
    st.embeddings.dispose();
    return st.headLogits ?? [st.logits];
  }

  /** x: [b, n] int32 -> logits, embeddings, and with returnMems / returnCache the next mems and cache. */
  forwardWithState(x: tf.Tensor, opts: TransformerForwardOptions = {}): TransformerState {
    // rows decoded together: every row's products as that row's alone
    if (opts.rowCaches) return rowStableProducts(opts.rowCaches.length, () => this.run(x, opts, true));
    return this.run(x, opts, true);
  }

  private validate(x: tf.Tensor, opts: TransformerForwardOptions): void {
    checkTensor('x', x, { rank: 2, dtype: 'int32', desc: 'token ids [batch, seq]' });
    const [b, n] = x.shape as [number, number];
    // on a GPU the read would stall the device every forward: the embedding's gather checks the
    // ids there instead (an id out of range is reported at the next read of a result)
    if (x.size > 0 && !onGpu()) {
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
    checkSharedInputs(opts, b, n, this.embDim);
    if (opts.rowCaches) this.validateRows(b, n, opts);
    if (opts.cache && !this.canCacheKv)
      throw new Error(
        'cache: this model cannot decode with a KV cache (memory tokens, recycling, token shifting or an attention layer that cannot cache)',
      );
    this.validateEmbedIds(b, n, opts.embedIds);
    const o = this.options;
    if (o.memoryTokensInterspersedEvery !== null && this.numMemoryTokens > 0) {
      if (opts.mask)
        throw new Error(
          'mask: not supported with memoryTokensInterspersedEvery (the reference does not mask memory tokens between chunks)',
        );
      if (opts.selfAttnKvMask)
        throw new Error('selfAttnKvMask: not supported with memoryTokensInterspersedEvery');
      if (opts.prependMask) throw new Error('prependMask: not supported with memoryTokensInterspersedEvery');
    }
    const steps = opts.recycleSteps;
    if (steps !== undefined) {
      if (!Number.isInteger(steps) || steps <= 0)
        throw new Error(`recycleSteps: expected a positive integer, got ${steps}`);
      if (!o.recycling && steps !== 1)
        throw new Error(`recycleSteps: expected 1 (or nothing) for a model without recycling, got ${steps}`);
    } else if (o.recycling && !this.training) {
      throw new Error(
        'recycleSteps: expected a positive integer outside training (the model recycles), got undefined',
      );
    }
    if (opts.returnAttnZLoss) {
      const w = opts.attnZLossWeight;
      if (w !== undefined && (typeof w !== 'number' || !Number.isFinite(w)))
        throw new Error(`attnZLossWeight: expected a finite number, got ${w}`);
      if (this.attnLayers.attnOptions.flash || this.attnLayers.crossAttnOptions.flash)
        throw new Error(
          'returnAttnZLoss: needs the attention logits before softmax, which the fused attention (attnFlash) does not form',
        );
    }
  }

  /** rowCaches: one per row of x ([b, 1]), each short of the last absolute position. */
  private validateRows(b: number, n: number, opts: TransformerForwardOptions): void {
    const why = this.rowsUnsupported;
    if (why) throw new Error(`rowCaches: this model cannot decode rows together: ${why}`);
    const rows = opts.rowCaches!;
    if (b !== rows.length || n !== 1)
      throw new Error(
        `x: expected [${rows.length}, 1] (the next token of each row of rowCaches), got [${b}, ${n}]`,
      );
    const extra = (
      ['cache', 'mask', 'prependEmbeds', 'sumEmbeds', 'posOverride', 'seqStartPos'] as const
    ).filter((k) => opts[k] !== undefined);
    if (extra.length) throw new Error(`rowCaches: expected no ${extra.join(', ')} with it`);
    if (this.hasAbsPosEmb)
      rows.forEach((c, i) => {
        if (c.seqLen >= this.maxSeqLen)
          throw new Error(
            `rowCaches[${i}]: expected fewer than maxSeqLen ${this.maxSeqLen} positions (absolute positional embedding), got ${c.seqLen}`,
          );
      });
  }

  /** embedIds: one [b, n] int32 per name of embedNumTokens, each in [0, its size). */
  private validateEmbedIds(b: number, n: number, embedIds: Record<string, tf.Tensor> | undefined): void {
    const names = [...this.embeds.keys()];
    const given = embedIds ? Object.keys(embedIds) : [];
    if (names.length === 0) {
      if (given.length)
        throw new Error(`embedIds: given (${given.join(', ')}), but the model has no embedNumTokens`);
      return;
    }
    const missing = names.filter((k) => !given.includes(k));
    const unknown = given.filter((k) => !this.embeds.has(k));
    if (missing.length || unknown.length)
      throw new Error(
        `embedIds: expected ids for exactly the names of embedNumTokens (${names.join(', ')}), got (${given.join(', ')})`,
      );
    for (const name of names) {
      const ids = embedIds![name]!;
      checkTensor(`embedIds.${name}`, ids, { shape: [b, n], dtype: 'int32' });
      const size = this.embeds.get(name)!.numEmbeddings;
      if (ids.size === 0 || onGpu()) continue;
      const v = ids.dataSync();
      let mn = v[0]!;
      let mx = mn;
      for (let i = 1; i < v.length; i++) {
        if (v[i]! < mn) mn = v[i]!;
        else if (v[i]! > mx) mx = v[i]!;
      }
      if (mn < 0 || mx >= size)
        throw new Error(`embedIds.${name}: expected ids in [0, ${size}), got values in [${mn}, ${mx}]`);
    }
  }

  /**
   * The embedded input of the layers: tokens, positions, extra embeddings, prepended embeddings, CLS
   * and memory tokens. x: [b, n] -> h: [b, memory + memSeq, dim], with the masks widened to match;
   * memSeq: the positions before memory tokens; every: the interspersing period, or null.
   */
  private embed(
    x: tf.Tensor,
    opts: TransformerForwardOptions,
  ): { h: tf.Tensor; mask?: tf.Tensor; kvMask?: tf.Tensor; memSeq: number; every: number | null } {
    const o = this.options;
    const [b, n] = x.shape as [number, number];
    const numMem = this.numMemoryTokens;
    let pos: tf.Tensor | number = 0;
    const po = opts.posOverride;
    if (po && po.dtype === 'float32') pos = po;
    else if (this.posEmb && opts.rowCaches) {
      // each row's next position: the length of its cache
      const rowPos = tf.tensor2d(
        opts.rowCaches.map((c) => c.seqLen),
        [b, 1],
        'int32',
      );
      pos = this.posEmb.forward(1, { pos: rowPos });
    } else if (this.posEmb) pos = this.posEmb.forward(n, { pos: po, seqStartPos: opts.seqStartPos });
    let h: tf.Tensor = this.tokenEmb.forward(x);
    if (pos !== 0) h = tf.add(h, pos);
    for (const [name, ids] of Object.entries(opts.embedIds ?? {}))
      h = tf.add(h, this.embeds.get(name)!.forward(ids));
    if (opts.sumEmbeds) h = tf.add(h, opts.sumEmbeds);
    if (this.postEmbNorm) h = this.postEmbNorm.forward(h);
    // a self-attention key mask covers the tokens; extra positions put in front are visible
    let m: MaskedEmbeds = { h, mask: opts.mask, kvMask: opts.selfAttnKvMask };
    if (opts.prependEmbeds) m = putInFront(m, opts.prependEmbeds, opts.prependMask);
    h = dropout(scaleEmbGradient(m.h, o.embFracGradient), o.embDropout, this.training);
    if (this.projectEmb) h = this.projectEmb.forward(h);
    m = { ...m, h };
    if (this.clsToken) m = putTokensInFront(m, this.clsToken);
    const memSeq = m.h.shape[1]!;
    const every = numMem > 0 ? o.memoryTokensInterspersedEvery : null;
    if (every !== null) m.h = intersperseMemoryTokens(m.h, n, every, this.memoryTokens!);
    else if (numMem > 0) m = putTokensInFront(m, this.memoryTokens!);
    h = m.h;
    const { mask, kvMask } = m;
    return { h, mask, kvMask, memSeq, every };
  }

  /**
   * The layers' output read out: memory tokens dropped, pooled or CLS embeddings, and the logits of
   * every output head (with the mixture of softmaxes). out: [b, memory + memSeq, dim].
   */
  private readout(
    out: tf.Tensor,
    b: number,
    memSeq: number,
    every: number | null,
    opts: TransformerForwardOptions,
    wantLogits: boolean,
  ): { e: tf.Tensor; headLogits: tf.Tensor[] | null } {
    const o = this.options;
    const numMem = this.numMemoryTokens;
    let e = out;
    if (every !== null) {
      e = tf.slice(dropInterspersedMemory(e, numMem, every), [0, 0, 0], [-1, memSeq, -1]);
    } else if (numMem > 0) e = tf.slice(e, [0, numMem, 0], [-1, memSeq, -1]);
    if (o.averagePoolEmbed) {
      if (opts.mask) {
        const m = tf.expandDims(tf.cast(opts.mask, 'float32'), -1);
        e = tf.div(tf.sum(tf.mul(e, m), 1), tf.maximum(tf.sum(m, 1), 1));
      } else e = tf.mean(e, 1);
    }
    if (this.clsToken) {
      e = tf.slice(e, [0, 0, 0], [-1, o.numClsTokens, -1]);
      if (o.numClsTokens === 1) e = tf.squeeze(e, [1]);
    } else if (opts.lastPositionLogits && !o.averagePoolEmbed && e.rank === 3 && e.shape[1]! > 1) {
      e = tf.slice(e, [0, e.shape[1]! - 1, 0], [-1, 1, -1]);
    }
    // mixture of softmaxes: k weights per position, and the embedding expanded to [..., k, dim]
    let mixWeights: tf.Tensor | null = null;
    if (this.toMixture) {
      const k = o.mixtureOfSoftmaxK;
      mixWeights = tf.softmax(this.combineMixture!.forward(e), -1);
      e = tf.reshape(this.toMixture.at(0).forward(e), [...e.shape.slice(0, -1), k, this.dim]);
    }
    let headLogits: tf.Tensor[] | null = null;
    if (wantLogits && !o.returnOnlyEmbed) {
      headLogits = this.projectToLogits(e).map((raw) => {
        let l = raw;
        if (o.sigsoftmaxLogits) l = tf.add(l, tf.log(tf.sigmoid(l)));
        if (mixWeights) {
          // log of the mixture of the k softmaxes: [..., k, v] x [..., k] -> [..., v]
          const mos = tf.sum(tf.mul(tf.softmax(l, -1), tf.expandDims(mixWeights, -1)), -2);
          l = tf.log(tf.maximum(mos, 1e-20));
        }
        if (o.squeezeOutLastDim && l.shape[l.rank - 1] === 1) l = tf.squeeze(l, [-1]);
        return l;
      });
    }
    return { e, headLogits };
  }

  private run(x: tf.Tensor, opts: TransformerForwardOptions, wantLogits: boolean): TransformerState {
    this.validate(x, opts);
    const o = this.options;
    const b = x.shape[0]!;
    const wantMems = !!opts.returnMems;
    let cache: LayersCache | undefined;
    let rowCaches: LayersCache[] | undefined;
    const out = tidyObj(() => {
      const { h, mask, kvMask, memSeq, every } = this.embed(x, opts);
      let mems = opts.mems;
      if (o.shiftMemDown && mems && mems.length) {
        const k = o.shiftMemDown;
        mems = [...mems.slice(k), ...mems.slice(0, k)];
      }
      const layersOpts = {
        mask,
        mems,
        memMasks: opts.memMasks,
        cache: opts.cache,
        cacheAge: opts.cacheAge,
        rowCaches: opts.rowCaches,
        returnCache: opts.returnCache,
        returnHiddens: wantMems || !!opts.returnAttnZLoss,
        seqStartPos: opts.seqStartPos,
        context: opts.context,
        contextMask: opts.contextMask,
        attnMask: opts.attnMask,
        selfAttnKvMask: kvMask,
        condition: opts.condition,
      };
      // recycling: every step but the last runs on the detached, projected output of the one before
      const steps = !o.recycling ? 1 : (opts.recycleSteps ?? getRng().int(0, o.trainMaxRecycleSteps) + 1);
      let res = this.attnLayers.forward(h, steps > 1 ? { ...layersOpts, returnCache: false } : layersOpts);
      for (let i = 1; i < steps; i++) {
        const recycled = this.recycledProj!.forward(stopGradient(res.out));
        const last = i === steps - 1;
        res = this.attnLayers.forward(
          tf.add(h, recycled),
          last ? layersOpts : { ...layersOpts, returnCache: false },
        );
      }
      cache = res.cache;
      rowCaches = res.rowCaches;
      let attnZLoss: tf.Tensor | undefined;
      if (opts.returnAttnZLoss)
        attnZLoss = attentionZLoss(res.attnIntermediates, opts.attnZLossWeight ?? o.attnZLossWeight);
      const { e, headLogits } = this.readout(res.out, b, memSeq, every, opts, wantLogits);
      const logits = headLogits ? headLogits[0]! : null;
      let newMems: tf.Tensor[] | undefined;
      if (wantMems) newMems = nextMems(res.hiddens, mems, o.maxMemLen);
      return {
        logits,
        embeddings: e,
        mems: newMems,
        headLogits: headLogits && headLogits.length > 1 ? headLogits : undefined,
        attnZLoss,
      };
    });
    return {
      logits: out.logits as tf.Tensor,
      embeddings: out.embeddings,
      ...(out.mems ? { mems: out.mems } : {}),
      ...(cache ? { cache } : {}),
      ...(rowCaches ? { rowCaches } : {}),
      ...(out.headLogits ? { headLogits: out.headLogits } : {}),
      ...(out.attnZLoss ? { attnZLoss: out.attnZLoss } : {}),
    };
  }

  /** e: [..., dim] -> one [..., logitsDim] per output head (the token embedding's transpose when tied). */
  private projectToLogits(e: tf.Tensor): tf.Tensor[] {
    if (this.toLogitsHeads) return this.toLogitsHeads.items.map((head) => head.forward(e));
    if (this.toLogits) return [this.toLogits.forward(e)];
    const flat = tf.matMul(tf.reshape(e, [-1, this.dim]), this.tokenEmb.emb.weight, false, true);
    return [tf.reshape(flat, [...e.shape.slice(0, -1), this.numTokens])];
  }
}

/** Checks the output options that exclude each other (as the reference's asserts and failures do). */
function checkOutputOptions(o: TransformerWrapperOwnOptions): void {
  const heads = o.numOutputHeads;
  if (heads > 1 && !o.returnOnlyEmbed) {
    if (o.tieEmbedding) throw new OptionError('numOutputHeads', '1 with tieEmbedding', String(heads));
    if (o.sigsoftmaxLogits) throw new OptionError('numOutputHeads', '1 with sigsoftmaxLogits', String(heads));
  }
  if (o.mixtureOfSoftmax && heads !== 1)
    throw new OptionError('mixtureOfSoftmax', 'numOutputHeads 1 with it', String(heads));
}

/** Checks `embedNumTokens` ({name: number of ids}); returns its names. */
function checkEmbedNumTokens(e: Record<string, number>): string[] {
  for (const name of Object.keys(e))
    if (!/^[A-Za-z0-9_]+$/.test(name))
      throw OptionError.of(`embedNumTokens.${name}`, 'a name of letters, digits and underscores', name);
  return Object.keys(e);
}
