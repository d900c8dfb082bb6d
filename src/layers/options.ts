import type { AttentionOptions } from '../attention/types.js';
import type { FeedForwardOptions } from '../nn/feedforward.js';

/**
 * Options of `AttentionLayers`: the reference's keyword arguments in camelCase. Attention options
 * are passed with an `attn` prefix (`attnFlash`, `attnDimHead`), feedforward options with `ff`
 * (`ffGlu`, `ffMult`) and cross-attention-only overrides with `crossAttn`, as in the reference.
 */
export interface AttentionLayersOwnOptions {
  dim: number;
  depth: number | null;
  heads: number;
  causal: boolean;
  crossAttend: boolean;
  onlyCross: boolean;
  useScalenorm: boolean;
  useRmsnorm: boolean;
  useSimpleRmsnorm: boolean;
  /** Norm gammas stored minus one (weight decay friendly), as the reference's default. */
  normAddUnitOffset: boolean;
  alibiPosBias: boolean;
  alibiNumHeads: number | null;
  relPosBias: boolean;
  relPosNumBuckets: number;
  relPosMaxDistance: number;
  dynamicPosBias: boolean;
  dynamicPosBiasLogDistance: boolean;
  dynamicPosBiasMlpDepth: number;
  dynamicPosBiasNorm: boolean;
  rotaryPosEmb: boolean;
  rotaryEmbDim: number | null;
  rotaryXpos: boolean;
  rotaryInterpolationFactor: number;
  rotaryXposScaleBase: number;
  rotaryBaseRescaleFactor: number;
  weightTieLayers: boolean;
  /** Layer types in order: 'a' self-attention, 'c' cross-attention, 'f' feedforward. */
  customLayers: string[] | null;
  /** Indices into the layers, in the order they run (layers may repeat). */
  layersExecuteOrder: number[] | null;
  sandwichCoef: number | null;
  parRatio: number | null;
  residualAttn: boolean;
  crossResidualAttn: boolean;
  macaron: boolean;
  preNorm: boolean;
  /** Accepted for compatibility; the reference 2.0.1 ignores it (pre-norm stacks keep `final_norm`). */
  preNormHasFinalNorm: boolean;
  gateResidual: boolean;
  scaleResidual: boolean;
  scaleResidualConstant: number;
  /** Token shift amount, for every layer or one per layer. */
  shiftTokens: number | number[];
  sandwichNorm: boolean;
  /** ResiDual (arXiv 2304.14802): post-LN stream plus a pre-LN stream normed at the end. */
  resiDual: boolean;
  /** Scale of the branch outputs accumulated in ResiDual's pre-LN stream, in (0, 1]. */
  resiDualScale: number;
  softclampOutput: boolean;
  softclampOutputValue: number;
  zeroInitBranchOutput: boolean;
  /** Probability of skipping each layer in training (stochastic depth); one number or one per layer. */
  layerDropout: number | number[];
  crossAttnTokensDropout: number;
  disableAbsPosEmb: boolean | null;
  useLayerscale: boolean;
  layerscaleInitValue: number;
  /** U-Net style skips: latter-half blocks concatenate an earlier block's input (`skip_combines`). */
  unetSkips: boolean;
  /** Adds a projection of the stack's input to every layer's branch input (DEQ-style reinjection). */
  reinjectInput: boolean;
  /** Gates the reinjected input by a learned sigmoid of the input. */
  learnedReinjectInputGate: boolean;
  /**
   * Value residual learning (ResFormer): every later self-attention (cross-attention) layer mixes the
   * values of the first self-attention (cross-attention) layer into its own.
   */
  addValueResidual: boolean;
  /** With `addValueResidual`, learn the mix per token and head (`to_value_residual_mix`) in self-attention layers after the first; else 0.5. */
  learnedValueResidualMix: boolean;
  /** Hyper-connections (arXiv 2409.19606): number of residual streams (1 = a plain residual). */
  numResidualStreams: number;
  /** Norms whose gain comes from a `condition` passed to forward (AdaptiveLayerNorm / AdaptiveRMSNorm). */
  useAdaptiveLayernorm: boolean;
  useAdaptiveRmsnorm: boolean;
  /** DiT ada-LN-zero: branch outputs gated by sigmoid(Linear(condition)). */
  useAdaptiveLayerscale: boolean;
  /** Feature size of `condition` (default dim). */
  dimCondition: number | null;
  /** Passes the condition through Linear + SiLU (`adaptive_mlp`) first. */
  adaptiveConditionMlp: boolean;
  adaptiveConditionMlpExpansion: number;
  /**
   * With hyper-connections (numResidualStreams > 1): each self-attention layer mixes three inputs
   * from the streams, one each for its queries, keys and values.
   */
  qkvReceiveDiffResiduals: boolean;
  /** Extra arguments of the relative position scheme: `slopes` (one per ALiBi head) for alibiPosBias. */
  relPosKwargs: RelPosKwargs;
  /** Extra arguments of every layer's residual: `tanh` (default true) of the hyper-connections. */
  residualFnKwargs: ResidualFnKwargs;
}

/** The reference's `rel_pos_kwargs`: ALiBi's custom slopes (the only argument the stack leaves free). */
export interface RelPosKwargs {
  slopes?: number[];
}

/** The reference's `residual_fn_kwargs`: whether hyper-connections squash their dynamic weights with tanh. */
export interface ResidualFnKwargs {
  tanh?: boolean;
}

/** The options of `T` under a camelCase prefix (`attn` + `dimHead` -> `attnDimHead`), all optional. */
export type Prefixed<P extends string, T> = { [K in keyof T as `${P}${Capitalize<string & K>}`]?: T[K] };

/** Everything `AttentionLayers` accepts. */
export type AttentionLayersOptions = Partial<AttentionLayersOwnOptions> &
  Prefixed<'attn', AttentionOptions> &
  Prefixed<'ff', FeedForwardOptions> &
  Prefixed<'crossAttn', AttentionOptions>;

/** The reference's defaults (dim has none: it must be given). */
export const attentionLayersDefaults: AttentionLayersOwnOptions = {
  dim: 0,
  depth: null,
  heads: 8,
  causal: false,
  crossAttend: false,
  onlyCross: false,
  useScalenorm: false,
  useRmsnorm: false,
  useSimpleRmsnorm: false,
  normAddUnitOffset: true,
  alibiPosBias: false,
  alibiNumHeads: null,
  relPosBias: false,
  relPosNumBuckets: 32,
  relPosMaxDistance: 128,
  dynamicPosBias: false,
  dynamicPosBiasLogDistance: false,
  dynamicPosBiasMlpDepth: 2,
  dynamicPosBiasNorm: false,
  rotaryPosEmb: false,
  rotaryEmbDim: null,
  rotaryXpos: false,
  rotaryInterpolationFactor: 1,
  rotaryXposScaleBase: 512,
  rotaryBaseRescaleFactor: 1,
  weightTieLayers: false,
  customLayers: null,
  layersExecuteOrder: null,
  sandwichCoef: null,
  parRatio: null,
  residualAttn: false,
  crossResidualAttn: false,
  macaron: false,
  preNorm: true,
  preNormHasFinalNorm: true,
  gateResidual: false,
  scaleResidual: false,
  scaleResidualConstant: 1,
  shiftTokens: 0,
  sandwichNorm: false,
  resiDual: false,
  resiDualScale: 1,
  softclampOutput: false,
  softclampOutputValue: 30,
  zeroInitBranchOutput: false,
  layerDropout: 0,
  crossAttnTokensDropout: 0,
  disableAbsPosEmb: null,
  useLayerscale: false,
  layerscaleInitValue: 0,
  unetSkips: false,
  reinjectInput: false,
  learnedReinjectInputGate: false,
  addValueResidual: false,
  learnedValueResidualMix: true,
  numResidualStreams: 1,
  useAdaptiveLayernorm: false,
  useAdaptiveRmsnorm: false,
  useAdaptiveLayerscale: false,
  dimCondition: null,
  adaptiveConditionMlp: false,
  adaptiveConditionMlpExpansion: 4,
  qkvReceiveDiffResiduals: false,
  relPosKwargs: {},
  residualFnKwargs: {},
};
