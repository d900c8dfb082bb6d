import type * as tf from '@tensorflow/tfjs-core';
import type { DataDependentAlibiKwargs } from './data-dependent-alibi.js';
import type { HybridModuleOption } from './hybrid.js';

/**
 * Options of `Attention`: the reference Attention's keyword arguments in camelCase
 * (x-transformers 2.0.1). Defaults are in `attentionDefaults`.
 */
export interface AttentionOptions {
  /** Dimension of each head (`dim_head`). */
  dimHead: number;
  /** Feature size of `context` for cross-attention (`dim_context`; default: `dim`). */
  dimContext: number | null;
  heads: number;
  /** Causal (autoregressive) masking, right-aligned when keys outnumber queries. */
  causal: boolean;
  /** Fused scaled-dot-product path (`attend` with `flash: true`); same numbers as the composite. */
  flash: boolean;
  /** 1x1 convolution across heads on the logits before softmax (initialised to identity). */
  preTalkingHeads: boolean;
  /** 1x1 convolution across heads on the attention after softmax (initialised to identity). */
  postTalkingHeads: boolean;
  /** Heads mixed pre-softmax, then used to scale the post-softmax attention. */
  preScalePostTalkingHeads: boolean;
  /** Learned per-head output scale `head_scale_params` [1, heads, 1, 1]. */
  headScale: boolean;
  /** Keep only the top k logits of each row before softmax. */
  sparseTopk: number | null;
  /** Sparse top-k forward, dense softmax gradient. */
  sparseTopkStraightThrough: boolean;
  /** Learned memory key/values `mem_k`, `mem_v` [kvHeads, numMemKv, dimHead] prepended to keys. */
  numMemKv: number;
  /** Dropout on the attention matrix (train mode only). */
  dropout: number;
  /** Attention on attention: `to_out` is Linear(outDim, 2 * dimOut) followed by GLU. */
  onAttn: boolean;
  /** Per-head sigmoid gate of the output from x (`to_v_head_gate`). */
  gateValueHeads: boolean;
  /** With `gateValues`, gate by SiLU instead of sigmoid. */
  swigluValues: boolean;
  /** AlphaFold2 gating of the aggregated values (`to_v_gate`, weight 0, bias 10). */
  gateValues: boolean;
  /** Initialise `to_out` to zero. */
  zeroInitOutput: boolean;
  /** One-hot (argmax) attention with a straight-through softmax gradient. */
  hard: boolean;
  /** Mask keys further than this many positions in the past. */
  maxAttendPast: number | null;
  /** Cosine-similarity attention: l2-normalised queries and keys, scaled by `qkNormScale`. */
  qkNorm: boolean;
  qkNormGroups: number;
  qkNormScale: number;
  /** Learned per-dimension scales `qk_norm_q_scale` [heads, 1, dimHead], `qk_norm_k_scale` [kvHeads, 1, dimHead]. */
  qkNormDimScale: boolean;
  /** Negative squared euclidean distance logits instead of dot products. */
  l2Distance: boolean;
  /** Sigmoid instead of softmax. */
  sigmoid: boolean;
  /** Selective attention (causal only; no key/value cache). */
  selective: boolean;
  /** LASER: attend over exp(values) (soft-clamped first) and take the log of the result. */
  laser: boolean;
  laserSoftclampValue: number;
  /** Rotary on only the last this-many heads (default all). */
  rotateNumHeads: number | null;
  /** Contextual position encoding (causal only). */
  useCope: boolean;
  copeMaxPos: number;
  copeSoftOnehotPos: boolean;
  copeTalkingHeads: boolean;
  /** Data-dependent ALiBi (Forgetting Transformer) bias from x (self-attention without cache or memories). */
  dataDependentAlibi: boolean;
  /** The per-row variant, from small query/key projections. */
  dataDependentAlibiPerRow: boolean;
  dataDependentAlibiPerRowDimHead: number;
  dataDependentAlibiKwargs: DataDependentAlibiKwargs;
  /** With a `valueResidual` input, mix it in per token and head through `to_value_residual_mix` (else 0.5). */
  learnedValueResidualMix: boolean;
  /** Multi-query attention: a single key/value head (same as `kvHeads: 1`). */
  oneKvHead: boolean;
  /** Grouped-query attention: number of key/value heads (divides `heads`; default `heads`). */
  kvHeads: number | null;
  /** Dimension of each value head (default `dimHead`). */
  valueDimHead: number | null;
  /** Output feature size (default `dim`). */
  dimOut: number | null;
  /** Prepend a zero key/value the queries may attend to. */
  addZeroKv: boolean;
  /** tanh soft-clamp of the logits to +-logitSoftclampValue. */
  softclampLogits: boolean;
  logitSoftclampValue: number;
  /** Replaces softmax: logits [b, h, i, j] -> attention weights [b, h, i, j] (code only, not JSON). */
  customAttnFn: ((logits: tf.Tensor) => tf.Tensor) | null;
  /** Accepted for compatibility with the reference; has no effect here. */
  onnxable: boolean;
  /**
   * Queries, keys and values from three different inputs (hyper-connections' views): the forward's
   * x is then [3, b, n, dim] (self-attention only; set by AttentionLayers' qkvReceiveDiffResiduals).
   */
  qkvReceiveDiffResiduals: boolean;
  /** Multi-head latent attention: queries from a latent `to_latent_q` [dimLatentQ, dim]. */
  useLatentQ: boolean;
  dimLatentQ: number | null;
  /**
   * Multi-head latent attention: keys and values from one latent `to_latent_kv` [dimLatentKv, dim];
   * the key/value cache holds the latents (see `AttentionKv`).
   */
  useLatentKv: boolean;
  dimLatentKv: number | null;
  /**
   * Decoupled rotary of multi-head latent attention: this many key heads come straight from the
   * input (`to_rotateable_k`), the others from the latents, and rotary turns only these heads.
   */
  latentRopeSubheads: number | null;
  /**
   * A module run on x beside attention (Hymba): its output [b, n, heads * dimHead] and the attention's
   * are each normalised per head (`hybrid_norms`) and averaged. Needs `hybridFoldAxialDim`. A spec
   * (`{type: 'gru', ...}`, JSON), a factory or a module (see `HybridModule` in hybrid.ts).
   */
  hybridModule: HybridModuleOption | null;
  /** The name under which the hybrid module's forward receives the mask (non-causal attention). */
  hybridMaskKwarg: string | null;
  /** Fold the sequence by this factor before the hybrid module (1: no folding). */
  hybridFoldAxialDim: number | null;
}

/** The reference's defaults. */
export const attentionDefaults: AttentionOptions = {
  dimHead: 64,
  dimContext: null,
  heads: 8,
  causal: false,
  flash: false,
  preTalkingHeads: false,
  postTalkingHeads: false,
  preScalePostTalkingHeads: false,
  headScale: false,
  sparseTopk: null,
  sparseTopkStraightThrough: false,
  numMemKv: 0,
  dropout: 0,
  onAttn: false,
  gateValueHeads: false,
  swigluValues: false,
  gateValues: false,
  zeroInitOutput: false,
  hard: false,
  maxAttendPast: null,
  qkNorm: false,
  qkNormGroups: 1,
  qkNormScale: 10,
  qkNormDimScale: false,
  l2Distance: false,
  sigmoid: false,
  selective: false,
  laser: false,
  laserSoftclampValue: 15,
  rotateNumHeads: null,
  learnedValueResidualMix: false,
  useCope: false,
  copeMaxPos: 16,
  copeSoftOnehotPos: false,
  copeTalkingHeads: false,
  dataDependentAlibi: false,
  dataDependentAlibiPerRow: false,
  dataDependentAlibiPerRowDimHead: 8,
  dataDependentAlibiKwargs: {},
  oneKvHead: false,
  kvHeads: null,
  valueDimHead: null,
  dimOut: null,
  addZeroKv: false,
  softclampLogits: false,
  logitSoftclampValue: 50,
  customAttnFn: null,
  onnxable: false,
  qkvReceiveDiffResiduals: false,
  useLatentQ: false,
  dimLatentQ: null,
  useLatentKv: false,
  dimLatentKv: null,
  latentRopeSubheads: null,
  hybridModule: null,
  hybridMaskKwarg: null,
  hybridFoldAxialDim: null,
};

/**
 * Cached keys and values of one attention layer. k: [b, kvHeads, t, dimHead], v: [b, kvHeads, t,
 * valueDimHead]. With latent key/values (`useLatentKv`) the cache holds what the reference caches,
 * the latents: k: [b, 1, t, dimLatentKv], and v: the rotary key sub-heads [b, latentRopeSubheads, t,
 * dimHead] (or the same latents without sub-heads). Either way batch is axis 0 and time axis 2.
 */
export interface AttentionKv {
  /** Keys as the reference caches them: projected (and qk-normalised), before rotary. */
  k: tf.Tensor;
  v: tf.Tensor;
}

/**
 * One cached layer's keys and values held by the backend under its own ids, outside TF.js: what a
 * batched decoding step (`Attention.decodeRows`) reads and returns, so that a step makes no TF.js
 * tensor per row and layer. Shapes as the tensors' would be.
 */
export interface BackendKv {
  k: number;
  v: number;
  kShape: number[];
  vShape: number[];
}

/** A cached layer's entry as a kernel takes it: the tensors, or the backend's ids. */
export type KvEntry = AttentionKv | BackendKv;

export function isBackendKv(e: KvEntry): e is BackendKv {
  return typeof (e as BackendKv).k === 'number';
}

/**
 * A relative position scheme that yields an additive attention bias.
 * `bias(i, j)`: [heads, i, j] for the last i query positions against j key positions (queries
 * occupy key positions j - i .. j - 1).
 */
export interface PositionBias {
  bias(i: number, j: number): tf.Tensor;
  /** Optional custom positions (ALiBi): pos: [n] or [b, n] -> [heads, n, n] or [b, heads, n, n]. */
  biasFromPositions?(posI: tf.Tensor, posJ?: tf.Tensor): tf.Tensor;
}

/**
 * Rotary frequencies for the key positions (as `RotaryEmbedding.forward` returns them).
 * freqs: [n_k, rotDim] or [b|1, n_k, rotDim]; queries use the last n_q rows, keys the last n_k.
 * xposScale: same shape as freqs (xpos), or absent.
 */
export interface RotaryInput {
  freqs: tf.Tensor;
  xposScale?: tf.Tensor | null;
  /**
   * Optional tables from `prepareRotary`, shared by every layer of one forward pass (without xpos):
   * cos / sin of freqs for the keys ([1|b, 1, n_k, width]) and for the last `queryLen` positions
   * ([1|b, 1, queryLen, width]); sin carries rotateHalf's signs, and features past rotDim up to
   * `width` hold cos 1 and sin 0 (passed through unchanged).
   */
  tables?: RotaryTables;
}

/** cos / sin tables of a `RotaryInput` (see `prepareRotary`). */
export interface RotaryTables {
  width: number;
  queryLen: number;
  cos: tf.Tensor;
  sin: tf.Tensor;
  cosQ: tf.Tensor;
  sinQ: tf.Tensor;
  /** int32 [width]: the feature order with each pair swapped (1, 0, 3, 2, ...). */
  swap: tf.Tensor;
}

/** Per-call options of `Attention.forward`. */
export interface AttentionForwardOptions {
  /** context: [b, m, dimContext] for cross-attention. */
  context?: tf.Tensor;
  /** mask: [b, n] bool, true = keep (queries; also keys for self-attention). */
  mask?: tf.Tensor;
  /** contextMask: [b, m] bool key mask (cross-attention, or a self-attention key mask). */
  contextMask?: tf.Tensor;
  /** attnMask: [i, j], [h, i, j] or [b|1, h|1, i, j] bool, true = may attend. */
  attnMask?: tf.Tensor;
  /** Relative position scheme (T5, dynamic, ALiBi). */
  relPos?: PositionBias;
  /** attnBias: additive bias [h, i, j] or [b, h, i, j] (instead of relPos). */
  attnBias?: tf.Tensor;
  /** Custom positions for ALiBi: [n] or [b, n]. */
  pos?: tf.Tensor;
  /** Rotary embedding for the (key) positions. */
  rotary?: RotaryInput;
  /** Rotary embedding for the context positions (cross-attention). */
  contextRotary?: RotaryInput;
  /** prevAttn: [b, h, i, j] pre-softmax attention of the previous layer (residual attention). */
  prevAttn?: tf.Tensor;
  /** mem: [b, m, dim] XL memories, prepended to the keys/values. */
  mem?: tf.Tensor;
  /** memMask: [b, m] bool. */
  memMask?: tf.Tensor;
  /** valueResidual: [b, kvHeads, n_k, valueDimHead] values of the first layer (value residual learning). */
  valueResidual?: tf.Tensor;
  /** Keys/values of earlier steps; this call's are appended. */
  cache?: AttentionKv;
  /** Fill `intermediates` (attention matrices, cachedKv). */
  returnIntermediates?: boolean;
  /**
   * The caller keeps this call's keys and values as a cache and needs neither a gradient nor the
   * attention matrices (a prompt's prefill, a chunk after a cache): in eval mode the call may run as
   * one fused kernel (XtCachedAttention) with the same numbers.
   */
  cacheStep?: boolean;
}

/** What `Attention.forward` returns besides its output. The caller owns (and disposes) these tensors. */
export interface AttentionIntermediates {
  /** [b, h, i, j] logits after bias and masking, before softmax (absent on the fused path). */
  preSoftmaxAttn?: tf.Tensor;
  /** [b, h, i, j] attention after softmax, before dropout (absent on the fused path). */
  postSoftmaxAttn?: tf.Tensor;
  /** [b, h, i, j] scaled q.k logits (+ prevAttn), before talking heads, bias and masking. */
  qkSimilarities?: tf.Tensor;
  /** [b, kvHeads, n_k, valueDimHead] this call's projected values, before any value residual mix. */
  values?: tf.Tensor;
  /** Keys/values including this call's, to pass as `cache` next time. */
  cachedKv?: AttentionKv;
}
