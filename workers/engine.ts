/**
 * The service's view of the library: the few entry points it calls (fromConfig, createTokenizer,
 * Trainer, AutoregressiveWrapper and its generateStream, safetensors I/O), looked up at run time so
 * the service can report which are missing instead of failing to start.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as lib from '../src/index.js';
import { backendInfo, loadSafetensors, saveSafetensors, type Module } from '../src/index.js';
import type { TokenizerName } from '../models/schemas.js';

/** A language model: token ids [b, n] int32 → logits [b, n, numTokens]. */
export interface LanguageModel extends Module {
  forward(x: tf.Tensor, opts?: Record<string, unknown>): tf.Tensor;
}

export interface Tokenizer {
  readonly name: string;
  readonly vocabSize: number;
  encode(text: string): number[];
  decode(ids: number[]): string;
  readonly eosTokenId?: number;
}

export interface StepResult {
  step: number;
  loss: number;
  learningRate: number;
  tokensPerSecond: number;
  gradNorm?: number;
}

export interface TrainerOptions {
  totalSteps: number;
  batchSize: number;
  seqLen: number;
  learningRate: number;
  warmupSteps?: number;
  weightDecay?: number;
  gradClip?: number;
  gradAccumulation?: number;
  evalEvery?: number;
  seed?: number;
}

export interface TrainerLike {
  step(): StepResult | Promise<StepResult>;
  evaluate(): { loss: number; perplexity: number } | Promise<{ loss: number; perplexity: number }>;
  saveCheckpoint(dir: string): Promise<unknown>;
  readonly stepCount: number;
  dispose(): void;
}

export type TrainData = { train: Int32Array; val?: Int32Array };

export interface TrainerClass {
  new (model: Module, data: TrainData, options: TrainerOptions): TrainerLike;
  resume(model: Module, data: TrainData, options: TrainerOptions, dir: string): Promise<TrainerLike>;
}

/** Options the service passes to generateStream (contract names). */
export interface StreamOptions {
  temperature?: number;
  filterLogitsFn?: string | ((logits: tf.Tensor, kwargs?: Record<string, number | undefined>) => tf.Tensor);
  filterKwargs?: Record<string, number | undefined>;
  eosToken?: number;
  cacheKv?: boolean;
  seed?: number;
  signal?: AbortSignal;
}

export interface ArWrapper extends Module {
  generateStream(
    prompts: tf.Tensor,
    seqLen: number,
    opts?: StreamOptions,
  ): AsyncIterable<{ index: number; tokens: number[] }>;
}

export interface ArWrapperClass {
  new (net: Module, options?: Record<string, unknown>): ArWrapper;
}

interface Library {
  fromConfig(json: unknown): unknown;
  createTokenizer(name: TokenizerName): Tokenizer;
  Trainer: TrainerClass;
  AutoregressiveWrapper: ArWrapperClass;
  manualSeed?: (seed: number) => void;
}

const REQUIRED = ['fromConfig', 'createTokenizer', 'Trainer', 'AutoregressiveWrapper'] as const;

// Entry points found in their own modules while the public index does not export them yet.
const extra: Record<string, unknown> = {};
const MODULE_OF: Record<string, string> = {
  fromConfig: '../src/io/config.js',
  createTokenizer: '../src/io/tokenizer.js',
  Trainer: '../src/train/trainer.js',
  AutoregressiveWrapper: '../src/generation/autoregressive-wrapper.js',
};

function exportsOf(): Record<string, unknown> {
  return { ...extra, ...(lib as unknown as Record<string, unknown>) };
}

/**
 * Resolves the library entry points (from the public index, else from their modules). Call once
 * before serving; cheap afterwards.
 */
export async function loadEngine(): Promise<void> {
  const exported = lib as unknown as Record<string, unknown>;
  for (const name of REQUIRED) {
    if (exported[name] !== undefined || extra[name] !== undefined) continue;
    try {
      const mod = (await import(MODULE_OF[name]!)) as Record<string, unknown>;
      if (mod[name] !== undefined) extra[name] = mod[name];
    } catch {
      // not written yet: reported by engineStatus()
    }
  }
}

/** Library entry points the service needs that the library does not provide (yet). */
export function missingEngineParts(): string[] {
  const exported = exportsOf();
  const missing: string[] = REQUIRED.filter((k) => exported[k] === undefined);
  const ar = exported.AutoregressiveWrapper as { prototype?: Record<string, unknown> } | undefined;
  if (ar && typeof ar.prototype?.generateStream !== 'function')
    missing.push('AutoregressiveWrapper.generateStream');
  return missing;
}

/** Whether the engine can serve requests: a backend is chosen and the library parts exist. */
export function engineStatus(): {
  ready: boolean;
  backend: string | null;
  device: string | null;
  reason?: string;
} {
  const info = backendInfo();
  const missing = missingEngineParts();
  const reason = !info
    ? 'tensor backend not initialised'
    : missing.length
      ? `library lacks ${missing.join(', ')}`
      : undefined;
  return { ready: !reason, backend: info?.backend ?? null, device: info?.device ?? null, reason };
}

function library(): Library {
  const missing = missingEngineParts();
  if (missing.length) throw new EngineUnavailableError(`the library lacks ${missing.join(', ')}`);
  return exportsOf() as unknown as Library;
}

/** The engine cannot serve (library parts missing): the API answers 503. */
export class EngineUnavailableError extends Error {}

/** A model definition the library rejected, with the library's message (names the field). */
export class DefinitionError extends Error {}

const tokenizers = new Map<string, Tokenizer>();

/** A tokenizer by name, created once per process. */
export function getTokenizer(name: TokenizerName): Tokenizer {
  let t = tokenizers.get(name);
  if (!t) {
    t = library().createTokenizer(name);
    tokenizers.set(name, t);
  }
  return t;
}

function readNumber(obj: Record<string, unknown>, ...keys: string[]): number | undefined {
  for (const k of keys) {
    const v = obj[k];
    if (typeof v === 'number') return v;
  }
  return undefined;
}

/** A built language model with the sizes the service checks. */
export interface BuiltLm {
  model: LanguageModel;
  numTokens: number;
  maxSeqLen: number;
}

/**
 * Builds a model from its JSON definition. Throws DefinitionError with the library's message
 * (`attnLayers.depth: expected a positive integer, got -1`) when the definition is bad, or when the
 * model is not a token language model (the service trains and samples TransformerWrapper decoders).
 */
export function buildModel(config: Record<string, unknown>, seed?: number): BuiltLm {
  const l = library();
  if (seed !== undefined && l.manualSeed) l.manualSeed(seed);
  let built: unknown;
  try {
    built = l.fromConfig(config);
  } catch (e) {
    throw new DefinitionError((e as Error).message);
  }
  const model = unwrapModel(built);
  const m = model as unknown as Record<string, unknown>;
  const numTokens = readNumber(m, 'numTokens') ?? readNumber(config, 'numTokens', 'num_tokens');
  const maxSeqLen = readNumber(m, 'maxSeqLen') ?? readNumber(config, 'maxSeqLen', 'max_seq_len');
  if (numTokens === undefined || maxSeqLen === undefined || typeof model.forward !== 'function') {
    model.dispose();
    throw new DefinitionError(
      'wrapper: expected a token language model (TransformerWrapper with numTokens and maxSeqLen)',
    );
  }
  return { model, numTokens, maxSeqLen };
}

function unwrapModel(built: unknown): LanguageModel {
  if (built && typeof built === 'object') {
    const b = built as Record<string, unknown>;
    if (typeof b.stateDict === 'function') return built as LanguageModel;
    for (const k of ['model', 'wrapper', 'module']) {
      const inner = b[k] as Record<string, unknown> | undefined;
      if (inner && typeof inner.stateDict === 'function') return inner as unknown as LanguageModel;
    }
  }
  throw new DefinitionError('wrapper: fromConfig did not return a model');
}

/** Wraps a language model for training and sampling. */
export function autoregressive(model: LanguageModel): ArWrapper {
  return new (library().AutoregressiveWrapper)(model);
}

export function trainerClass(): TrainerClass {
  return library().Trainer;
}

/** Serialises a module's state dict to safetensors bytes. */
export function weightsToBytes(model: Module, metadata: Record<string, string> = {}): Uint8Array {
  return saveSafetensors(model.stateDict(), metadata);
}

/**
 * Loads safetensors bytes into a module strictly. Throws an Error listing missing, unexpected and
 * mis-shaped keys; the module is unchanged then.
 */
export function loadWeights(model: Module, bytes: Uint8Array, source = 'weights'): void {
  const { tensors: raw } = loadSafetensors(bytes, source);
  let tensors = raw;
  // Checkpoints of an AutoregressiveWrapper (ours and the reference's) prefix every key with `net.`.
  const names = Object.keys(raw);
  const own = Object.keys(model.stateDict());
  if (names.length && names.every((k) => k.startsWith('net.')) && !own.some((k) => k.startsWith('net.'))) {
    tensors = Object.fromEntries(names.map((k) => [k.slice(4), raw[k]!]));
  }
  try {
    model.loadStateDict(tensors, { strict: true });
  } finally {
    for (const t of Object.values(tensors)) t.dispose();
  }
}
