export { Attention } from './attention.js';
export { GRU, FoldAxially, MultiheadRMSNorm } from './hybrid.js';
export type { HybridModule, HybridModuleOption, GruSpec, GruOptions } from './hybrid.js';
export {
  Attend,
  HeadMix,
  attend,
  attendBackward,
  hasFusedAttentionKernel,
  selectiveAttn,
  XT_ATTENTION_KERNEL,
} from './attend.js';
export type { AttendFnOptions, AttendModuleOptions, AttendResult } from './attend.js';
export { RotaryEmbedding, rotaryEmbeddingDefaults, applyRotaryPosEmb, rotateHalf } from './rotary.js';
export type { RotaryEmbeddingOptions } from './rotary.js';
export { attentionDefaults, isBackendKv } from './types.js';
export type {
  AttentionOptions,
  AttentionForwardOptions,
  AttentionIntermediates,
  AttentionKv,
  BackendKv,
  KvEntry,
  PositionBias,
  RotaryInput,
} from './types.js';
export {
  RelativePositionBias,
  relativePositionBiasDefaults,
  relativePositionBucket,
} from './relative-position-bias.js';
export type { RelativePositionBiasOptions } from './relative-position-bias.js';
export { DynamicPositionBias, dynamicPositionBiasDefaults } from './dynamic-position-bias.js';
export type { DynamicPositionBiasOptions } from './dynamic-position-bias.js';
export { AlibiPositionalBias, alibiSlopes } from './alibi.js';
export { CoPE, copeDefaults } from './cope.js';
export type { CoPEOptions } from './cope.js';
export { DataDependentAlibi, PerRowDataDependentAlibi } from './data-dependent-alibi.js';
export type { DataDependentAlibiKwargs } from './data-dependent-alibi.js';
