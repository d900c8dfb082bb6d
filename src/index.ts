/**
 * x-transformers for TypeScript: the library's public API.
 */
export { initBackend, backendInfo, BACKENDS, rowStableProducts, smallOps } from './backend/index.js';
export type { BackendName, BackendInfo } from './backend/index.js';
export { PRECISIONS, checkPrecision, withPrecision } from './backend/precision.js';
export type { Precision } from './backend/precision.js';
export { Module, ModuleDict, ModuleList } from './nn/module.js';
export type { LoadStateDictOptions, LoadStateDictResult } from './nn/module.js';
export { Rng, manualSeed, getRng } from './utils/random.js';
export { parseSafetensors, loadSafetensors, saveSafetensors, rawToTensor } from './io/safetensors.js';
export type { SafetensorsDtype, RawTensor, SafetensorsFile } from './io/safetensors.js';
export * from './attention/index.js';
export { ViTransformerWrapper, viTransformerWrapperDefaults } from './wrappers/vit.js';
export type { ViTransformerWrapperOptions, ViTForwardOptions } from './wrappers/vit.js';
export { ContinuousTransformerWrapper, continuousTransformerWrapperDefaults } from './wrappers/continuous.js';
export type { ContinuousTransformerWrapperOptions, ContinuousForwardOptions } from './wrappers/continuous.js';
export { XValTransformerWrapper, xValTransformerWrapperDefaults } from './wrappers/xval.js';
export type { XValTransformerWrapperOptions, XValForwardOptions, XValOutput } from './wrappers/xval.js';
export { XTransformer, xTransformerDefaults } from './wrappers/xtransformer.js';
export { NeoMLP, neoMLPDefaults } from './wrappers/neo-mlp.js';
export type { NeoMLPOptions, NeoMLPEncoderOptions, NeoMLPOutput } from './wrappers/neo-mlp.js';
export {
  MultiInputTransformerWrapper,
  multiInputTransformerWrapperDefaults,
} from './wrappers/multi-input.js';
export type {
  MultiInputTransformerWrapperOptions,
  MultiInputTransformerWrapperOwnOptions,
  MultiInputForwardOptions,
  MultiInputState,
} from './wrappers/multi-input.js';
export type { XTransformerOptions, XTransformerForwardOptions } from './wrappers/xtransformer.js';
export { fromConfig, toConfig, camelKey, snakeKey, WRAPPERS, LAYERS_TYPES } from './io/config.js';
export { OptionError } from './utils/errors.js';
export type {
  ModelConfig,
  LayersConfig,
  BuiltModel,
  WrapperName,
  LayersType,
  JsonValue,
} from './io/config.js';
export { Linear, linear } from './nn/linear.js';
export type { LinearOptions } from './nn/linear.js';
export {
  Embedding,
  TokenEmbedding,
  AbsolutePositionalEmbedding,
  ScaledSinusoidalEmbedding,
  embeddingLookup,
} from './nn/embedding.js';
export type { PositionOptions } from './nn/embedding.js';
export {
  LayerNorm,
  RMSNorm,
  ScaleNorm,
  SimpleRMSNorm,
  AdaptiveLayerNorm,
  AdaptiveRMSNorm,
  makeNorm,
} from './nn/norms.js';
export type { Norm, NormKind, NormOptions } from './nn/norms.js';
export { FeedForward, GLU, feedForwardDefaults } from './nn/feedforward.js';
export type { FeedForwardOptions } from './nn/feedforward.js';
export { Residual, GRUGating, GRUCell, HyperConnection } from './nn/residual.js';
export type { ResidualFn, ResidualOptions, PreparedResidual } from './nn/residual.js';
export { Scale, LayerScale, AdaptiveLayerScale, ShiftTokens, shiftTokens } from './nn/branch.js';
export type { BranchOut, Callable } from './nn/branch.js';
export { dropout, gelu, l2norm, normalize } from './nn/functional.js';
export {
  AttentionLayers,
  Encoder,
  Decoder,
  CrossAttender,
  PrefixDecoder,
  LayersCache,
} from './layers/attention-layers.js';
export type {
  LayersForwardOptions,
  LayersOutput,
  PrefixDecoderForwardOptions,
} from './layers/attention-layers.js';
export { attentionLayersDefaults } from './layers/options.js';
export type {
  AttentionLayersOptions,
  AttentionLayersOwnOptions,
  RelPosKwargs,
  ResidualFnKwargs,
} from './layers/options.js';
export { TransformerWrapper, transformerWrapperDefaults } from './wrappers/transformer-wrapper.js';
export type {
  TransformerWrapperOptions,
  TransformerWrapperOwnOptions,
  TransformerForwardOptions,
  TransformerState,
} from './wrappers/transformer-wrapper.js';
export { AutoregressiveWrapper, autoregressiveWrapperDefaults } from './generation/autoregressive-wrapper.js';
export { crossEntropy, crossEntropyRows } from './nn/losses.js';
export type {
  AutoregressiveWrapperOptions,
  AutoregressiveForwardOptions,
} from './generation/autoregressive-wrapper.js';
export {
  topK,
  topP,
  topA,
  minP,
  contrastiveDecode,
  resolveFilter,
  normalizeFilterKwargs,
  FILTER_LOGITS_FN,
  topKDefaults,
  topPDefaults,
  topADefaults,
  minPDefaults,
  contrastiveDecodeDefaults,
} from './generation/filters.js';
export type {
  FilterFn,
  FilterName,
  FilterKwargs,
  TopKOptions,
  TopPOptions,
  TopAOptions,
  MinPOptions,
  ContrastiveDecodeOptions,
} from './generation/filters.js';
export { decode, decodeStream } from './generation/generate.js';
export { BatchDecoder } from './generation/batch-decoder.js';
export type { BatchSequenceOptions, BatchToken, BatchModel } from './generation/batch-decoder.js';
export type {
  GenerateOptions,
  GenerateStep,
  Prompts,
  DecodingNet,
  DecodeCache,
  AmateurModel,
} from './generation/generate.js';
export { sampleNext, argmaxRows, multinomialRows } from './generation/sampling.js';
export {
  XLAutoregressiveWrapper,
  xlAutoregressiveWrapperDefaults,
} from './generation/xl-autoregressive-wrapper.js';
export type {
  XLAutoregressiveWrapperOptions,
  XLGenerateOptions,
} from './generation/xl-autoregressive-wrapper.js';
export {
  ContinuousAutoregressiveWrapper,
  continuousAutoregressiveWrapperDefaults,
} from './generation/continuous-autoregressive-wrapper.js';
export type { ContinuousAutoregressiveWrapperOptions } from './generation/continuous-autoregressive-wrapper.js';
export {
  NonAutoregressiveWrapper,
  nonAutoregressiveWrapperDefaults,
  NAR_SCHEDULES,
  maskCounts,
  linspace01,
} from './generation/nonautoregressive-wrapper.js';
export type {
  NonAutoregressiveWrapperOptions,
  NARForwardOptions,
  NARTrainNoise,
  NARLosses,
  NARGenerateOptions,
  ScheduleFn,
  ScheduleName as NARScheduleName,
} from './generation/nonautoregressive-wrapper.js';
export {
  XValAutoregressiveWrapper,
  xvalAutoregressiveWrapperDefaults,
} from './generation/xval-autoregressive-wrapper.js';
export type {
  XValAutoregressiveWrapperOptions,
  XValGenerateOptions,
  XValGenerateResult,
} from './generation/xval-autoregressive-wrapper.js';
export { createTokenizer, ByteTokenizer, BpeTokenizer, TOKENIZER_NAMES } from './io/tokenizer.js';
export type { Tokenizer, TokenizerName } from './io/tokenizer.js';
export { tokenizeText, splitTokens, WindowSampler, sequentialBatches } from './train/data.js';
export type { SamplerState } from './train/data.js';
export { AdamW, adamWDefaults, defaultDecayFilter, clipByGlobalNorm, globalNorm } from './train/optimizer.js';
export type { AdamWOptions } from './train/optimizer.js';
export { learningRateAt } from './train/schedule.js';
export type { ScheduleName, ScheduleOptions } from './train/schedule.js';
export { Trainer, trainerDefaults } from './train/trainer.js';
export { DPO, dpoDefaults } from './train/dpo.js';
export type { DPOOptions, DPOForwardOptions } from './train/dpo.js';
export type {
  TrainerOptions,
  StepResult,
  EvalResult,
  CheckpointInfo,
  RunCallbacks,
  LossModel,
} from './train/trainer.js';
export { ensureGradients } from './train/gradients.js';
export { variableGradsLean } from './train/backprop.js';
