import * as tf from '@tensorflow/tfjs-core';
import { Module, ModuleDict } from '../nn/module.js';
import { Linear } from '../nn/linear.js';
import { Embedding, AbsolutePositionalEmbedding, ScaledSinusoidalEmbedding } from '../nn/embedding.js';
import { LayerNorm } from '../nn/norms.js';
import { dropout, tidyObj } from '../nn/functional.js';
import { AttentionLayers, Decoder } from '../layers/attention-layers.js';
import { OptionError, checkTensor } from '../utils/errors.js';
import { getRng } from '../utils/random.js';
import {
  attentionZLoss,
  dropInterspersedMemory,
  intersperseMemoryTokens,
  fmt,
  nextMems,
  checkSharedInputs,
  putInFront,
  putTokensInFront,
  scaleEmbGradient,
  type MaskedEmbeds,
} from './common.js';
import { RULES, checkOptionValues, requireOption, stripUndefined } from '../utils/option-rules.js';

/** Options of `MultiInputTransformerWrapper` (camelCase of the reference's keyword names). */
export interface MultiInputTransformerWrapperOwnOptions {
  /** The inputs by name, with their number of ids: `{note: 128, velocity: 32}` (one embedding and one output head each). */
  numTokens: Record<string, number>;
  maxSeqLen: number;
  embDim: number | null;
  maxMemLen: number;
  shiftMemDown: number;
  embDropout: number;
  postEmbNorm: boolean;
  numMemoryTokens: number | null;
  /** Memory tokens put before every chunk of this many tokens instead of once in front (Decoder only). */
  memoryTokensInterspersedEvery: number | null;
  returnOnlyEmbed: boolean;
  useAbsPosEmb: boolean;
  scaledSinuPosEmb: boolean;
  embFracGradient: number;
  /** Default weight of the attention z-loss (`returnAttnZLoss`). */
  attnZLossWeight: number;
}

export interface MultiInputTransformerWrapperOptions extends Partial<MultiInputTransformerWrapperOwnOptions> {
  numTokens: Record<string, number>;
  maxSeqLen: number;
  attnLayers: AttentionLayers;
}

export const multiInputTransformerWrapperDefaults: MultiInputTransformerWrapperOwnOptions = {
  numTokens: {},
  maxSeqLen: 0,
  embDim: null,
  maxMemLen: 0,
  shiftMemDown: 0,
  embDropout: 0,
  postEmbNorm: false,
  numMemoryTokens: null,
  memoryTokensInterspersedEvery: null,
  returnOnlyEmbed: false,
  useAbsPosEmb: true,
  scaledSinuPosEmb: false,
  embFracGradient: 1,
  attnZLossWeight: 1e-4,
};

/** Per-call options of `MultiInputTransformerWrapper.forward` / `forwardWithState`. */
export interface MultiInputForwardOptions {
  /** mask: [b, n] bool, true = keep. */
  mask?: tf.Tensor;
  /** mems: one [b, m, dim] per self-attention layer (XL recurrence); memMasks: one [b, m] bool each. */
  mems?: tf.Tensor[];
  memMasks?: tf.Tensor[];
  /** Return the next mems (forwardWithState). */
  returnMems?: boolean;
  /** posOverride: [n] (or [b, n]) int32 positions, or [b, n, embDim] float embeddings (the reference's `pos`). */
  posOverride?: tf.Tensor;
  /** prependEmbeds: [b, p, embDim] put before the tokens; prependMask: [b, p] bool. */
  prependEmbeds?: tf.Tensor;
  prependMask?: tf.Tensor;
  /** sumEmbeds: [b, n, embDim] added to the embeddings (self-conditioning). */
  sumEmbeds?: tf.Tensor;
  /** seqStartPos: [b] int32 first real position of left-padded rows. */
  seqStartPos?: tf.Tensor;
  /** Passed to the attention layers. */
  context?: tf.Tensor;
  contextMask?: tf.Tensor;
  attnMask?: tf.Tensor;
  selfAttnKvMask?: tf.Tensor;
  condition?: tf.Tensor;
  /** Return the attention z-loss (forwardWithState): needs the attention logits, so not with attnFlash. */
  returnAttnZLoss?: boolean;
  /** Weight of the attention z-loss (default: the model's attnZLossWeight). */
  attnZLossWeight?: number;
}

/** What `forwardWithState` returns; the caller owns every tensor. */
export interface MultiInputState {
  /** logits by input name, [b, n, numTokens[name]] each (empty with returnOnlyEmbed). */
  logits: Record<string, tf.Tensor>;
  /** embeddings: [b, n, dim] after the attention layers. */
  embeddings: tf.Tensor;
  mems?: tf.Tensor[];
  /** With returnAttnZLoss, a scalar (see TransformerState.attnZLoss). */
  attnZLoss?: tf.Tensor;
}

/**
 * Several token inputs at each position (the reference's `multi_input.MultiInputTransformerWrapper`):
 * the embeddings of every input are summed (with the absolute position), run through the attention
 * layers, and projected to logits once per input. x: `{name: [b, n] int32}` -> `{name: [b, n, numTokens[name]]}`.
 * Parameters: `embeds.<name>_embed.weight`, `pos_emb.emb.weight` (or `pos_emb.scale`),
 * `post_emb_norm.gamma`, `project_emb.*`, `attn_layers.*`, `to_logits.<name>.weight`, `memory_tokens`.
 */
export class MultiInputTransformerWrapper extends Module {
  readonly options: MultiInputTransformerWrapperOwnOptions;
  readonly names: string[];
  readonly maxSeqLen: number;
  readonly dim: number;
  readonly embDim: number;
  readonly numMemoryTokens: number;
  embeds: ModuleDict<Embedding>;
  posEmb: AbsolutePositionalEmbedding | ScaledSinusoidalEmbedding | null = null;
  postEmbNorm: LayerNorm | null = null;
  projectEmb: Linear | null = null;
  attnLayers: AttentionLayers;
  toLogits: ModuleDict<Linear> | null = null;
  memoryTokens: tf.Variable | null = null;

  constructor(options: MultiInputTransformerWrapperOptions) {
    super();
    const { attnLayers, ...rest } = options;
    // numTokens is an object of vocabulary sizes here: checkNumTokens checks it
    const { numTokens: _numTokens, ...scalars } = rest;
    checkOptionValues(scalars, multiInputTransformerWrapperDefaults, 'MultiInputTransformerWrapper');
    requireOption(rest, 'maxSeqLen');
    const o: MultiInputTransformerWrapperOwnOptions = {
      ...multiInputTransformerWrapperDefaults,
      ...stripUndefined(rest),
    };
    if (!(attnLayers instanceof AttentionLayers))
      throw OptionError.of('attnLayers', 'an AttentionLayers (Encoder, Decoder...)', attnLayers);
    this.names = checkNumTokens(o.numTokens);
    const nm = o.numMemoryTokens ?? 0;
    if (o.memoryTokensInterspersedEvery !== null && nm > 0 && !(attnLayers instanceof Decoder))
      throw new OptionError(
        'memoryTokensInterspersedEvery',
        'a Decoder (causal attention layers)',
        attnLayers.constructor.name,
      );
    this.options = { ...o, numTokens: { ...o.numTokens } };
    this.maxSeqLen = o.maxSeqLen;
    const dim = attnLayers.dim;
    const embDim = o.embDim ?? dim;
    this.dim = dim;
    this.embDim = embDim;
    this.numMemoryTokens = nm;
    const rng = getRng();
    const noAbs = o.maxSeqLen === 0 || !(o.useAbsPosEmb && !attnLayers.disableAbsPosEmb);
    if (!noAbs)
      this.posEmb = this.registerModule(
        'pos_emb',
        o.scaledSinuPosEmb
          ? new ScaledSinusoidalEmbedding(embDim)
          : new AbsolutePositionalEmbedding(embDim, o.maxSeqLen, { rng }),
      );
    this.embeds = this.registerModule('embeds', new ModuleDict<Embedding>());
    for (const name of this.names)
      this.embeds.set(`${name}_embed`, new Embedding(o.numTokens[name]!, embDim, { rng }));
    if (o.postEmbNorm) this.postEmbNorm = this.registerModule('post_emb_norm', new LayerNorm(embDim));
    if (embDim !== dim)
      this.projectEmb = this.registerModule('project_emb', new Linear(embDim, dim, { rng }));
    this.attnLayers = this.registerModule('attn_layers', attnLayers);
    if (!o.returnOnlyEmbed) {
      this.toLogits = this.registerModule('to_logits', new ModuleDict<Linear>());
      for (const name of this.names)
        this.toLogits.set(name, new Linear(dim, o.numTokens[name]!, { bias: false, rng }));
    }
    if (nm > 0)
      this.memoryTokens = this.registerParameter(
        'memory_tokens',
        tf.tensor2d(rng.fillNormal(nm * dim, 0, 1), [nm, dim]),
      );
  }

  /**
   * x: `{name: [b, n] int32}` (every input) -> logits by name, `{name: [b, n, numTokens[name]]}`.
   * With returnOnlyEmbed, use `forwardEmbeddings`.
   */
  forward(x: Record<string, tf.Tensor>, opts: MultiInputForwardOptions = {}): Record<string, tf.Tensor> {
    if (!this.toLogits)
      throw new Error('forward: the model has no output heads (returnOnlyEmbed); use forwardEmbeddings');
    const st = this.run(x, { ...opts, returnMems: false, returnAttnZLoss: false }, true);
    st.embeddings.dispose();
    return st.logits;
  }

  /** x: `{name: [b, n] int32}` -> the embeddings after the attention layers, [b, n, dim]. */
  forwardEmbeddings(x: Record<string, tf.Tensor>, opts: MultiInputForwardOptions = {}): tf.Tensor {
    return this.run(x, { ...opts, returnMems: false, returnAttnZLoss: false }, false).embeddings;
  }

  /** Logits by name, the embeddings, with returnMems the next mems and with returnAttnZLoss the z-loss. */
  forwardWithState(x: Record<string, tf.Tensor>, opts: MultiInputForwardOptions = {}): MultiInputState {
    return this.run(x, opts, true);
  }

  /** Checks the inputs (every name, one shape, ids in range) and the call's tensors; returns [b, n]. */
  private validate(x: Record<string, tf.Tensor>, opts: MultiInputForwardOptions): [number, number] {
    if (typeof x !== 'object' || x === null || x instanceof tf.Tensor)
      throw new Error(
        `x: expected an object of [batch, seq] int32 ids by input name (${this.names.join(', ')}), got ${fmt(x)}`,
      );
    const given = Object.keys(x);
    if (given.length !== this.names.length || !this.names.every((k) => given.includes(k)))
      throw new Error(
        `x: expected ids for exactly the inputs (${this.names.join(', ')}), got (${given.join(', ')})`,
      );
    const first = x[this.names[0]!]!;
    checkTensor(`x.${this.names[0]}`, first, { rank: 2, dtype: 'int32', desc: 'token ids [batch, seq]' });
    const [b, n] = first.shape as [number, number];
    for (const name of this.names) {
      const ids = x[name]!;
      checkTensor(`x.${name}`, ids, { shape: [b, n], dtype: 'int32' });
      const size = this.options.numTokens[name]!;
      const v = ids.dataSync();
      for (let i = 0; i < v.length; i++)
        if (v[i]! < 0 || v[i]! >= size)
          throw new Error(`x.${name}: expected ids in [0, ${size}), got ${v[i]}`);
    }
    const external = opts.posOverride?.dtype === 'float32';
    if (
      this.posEmb instanceof AbsolutePositionalEmbedding &&
      !external &&
      !opts.posOverride &&
      n > this.maxSeqLen
    )
      throw new Error(`x: expected a sequence length of at most maxSeqLen ${this.maxSeqLen}, got ${n}`);
    if (external) checkTensor('posOverride', opts.posOverride, { shape: [b, n, this.embDim] });
    checkSharedInputs(opts, b, n, this.embDim);
    if (this.options.memoryTokensInterspersedEvery !== null && this.numMemoryTokens > 0) {
      for (const k of ['mask', 'selfAttnKvMask', 'prependMask'] as const)
        if (opts[k]) throw new Error(`${k}: not supported with memoryTokensInterspersedEvery`);
    }
    if (opts.returnAttnZLoss) {
      const w = opts.attnZLossWeight;
      if (w !== undefined && (typeof w !== 'number' || !Number.isFinite(w)))
        throw new Error(`attnZLossWeight: expected a finite number, got ${fmt(w)}`);
      if (this.attnLayers.attnOptions.flash || this.attnLayers.crossAttnOptions.flash)
        throw new Error(
          'returnAttnZLoss: needs the attention logits before softmax, which attnFlash does not form',
        );
    }
    return [b, n];
  }

  private run(
    x: Record<string, tf.Tensor>,
    opts: MultiInputForwardOptions,
    wantLogits: boolean,
  ): MultiInputState {
    const [, n] = this.validate(x, opts);
    const o = this.options;
    const numMem = this.numMemoryTokens;
    const training = this.training;
    return tidyObj(() => {
      let h: tf.Tensor = tf.addN(
        this.names.map((name) => this.embeds.get(`${name}_embed`)!.forward(x[name]!)),
      );
      const po = opts.posOverride;
      if (po && po.dtype === 'float32') h = tf.add(h, po);
      else if (this.posEmb) h = tf.add(h, this.posEmb.forward(n, { pos: po, seqStartPos: opts.seqStartPos }));
      if (opts.sumEmbeds) h = tf.add(h, opts.sumEmbeds);
      if (this.postEmbNorm) h = this.postEmbNorm.forward(h);
      let m: MaskedEmbeds = { h, mask: opts.mask, kvMask: opts.selfAttnKvMask };
      if (opts.prependEmbeds) m = putInFront(m, opts.prependEmbeds, opts.prependMask);
      h = dropout(scaleEmbGradient(m.h, o.embFracGradient), o.embDropout, training);
      if (this.projectEmb) h = this.projectEmb.forward(h);
      const seq = h.shape[1]!;
      const every = numMem > 0 ? o.memoryTokensInterspersedEvery : null;
      m = { ...m, h };
      if (every !== null) m.h = intersperseMemoryTokens(h, n, every, this.memoryTokens!);
      else if (numMem > 0) m = putTokensInFront(m, this.memoryTokens!);
      h = m.h;
      const { mask, kvMask } = m;
      let mems = opts.mems;
      if (o.shiftMemDown && mems && mems.length)
        mems = [...mems.slice(o.shiftMemDown), ...mems.slice(0, o.shiftMemDown)];
      const res = this.attnLayers.forward(h, {
        mask,
        mems,
        memMasks: opts.memMasks,
        returnHiddens: !!opts.returnMems || !!opts.returnAttnZLoss,
        seqStartPos: opts.seqStartPos,
        context: opts.context,
        contextMask: opts.contextMask,
        attnMask: opts.attnMask,
        selfAttnKvMask: kvMask,
        condition: opts.condition,
      });
      res.cache?.dispose();
      // with memory tokens, the reference keeps the first n positions after them (prepended ones included)
      let e = res.out;
      if (every !== null) e = tf.slice(dropInterspersedMemory(e, numMem, every), [0, 0, 0], [-1, n, -1]);
      else if (numMem > 0) e = tf.slice(e, [0, numMem, 0], [-1, Math.min(n, seq), -1]);
      const attnZLoss = opts.returnAttnZLoss
        ? attentionZLoss(res.attnIntermediates, opts.attnZLossWeight ?? o.attnZLossWeight)
        : undefined;
      const logits: Record<string, tf.Tensor> = {};
      if (wantLogits && this.toLogits)
        for (const name of this.names) logits[name] = this.toLogits.get(name)!.forward(e);
      let newMems: tf.Tensor[] | undefined;
      if (opts.returnMems) newMems = nextMems(res.hiddens, mems, o.maxMemLen);
      return {
        logits,
        embeddings: e,
        ...(newMems ? { mems: newMems } : {}),
        ...(attnZLoss ? { attnZLoss } : {}),
      };
    });
  }
}

/** Checks `numTokens` ({name: number of ids}, at least one); returns its names. */
function checkNumTokens(v: unknown): string[] {
  if (typeof v !== 'object' || v === null || Array.isArray(v) || Object.keys(v).length === 0)
    throw OptionError.of('numTokens', 'an object of positive integers by input name (at least one)', v);
  for (const [name, size] of Object.entries(v)) {
    if (!/^[A-Za-z0-9_]+$/.test(name))
      throw OptionError.of(`numTokens.${name}`, 'a name of letters, digits and underscores', name);
    if (!RULES.posInt.test(size)) throw OptionError.of(`numTokens.${name}`, RULES.posInt.expected, size);
  }
  return Object.keys(v);
}
