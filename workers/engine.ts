/**
 * The service's use of the library (its public API, src/index.ts): building token language models
 * from JSON definitions, tokenizers, the autoregressive wrapper, safetensors I/O, and whether a
 * tensor backend is ready.
 */
import {
  AutoregressiveWrapper,
  backendInfo,
  createTokenizer,
  fromConfig,
  loadSafetensors,
  manualSeed,
  saveSafetensors,
  Trainer,
  TransformerWrapper,
  type Module,
  type Tokenizer,
} from '../src/index.js';
import type { TokenizerName } from '../models/schemas.js';

export { Trainer };
export type { GenerateOptions, StepResult, Tokenizer, TrainerOptions } from '../src/index.js';

/** Whether the engine can serve requests: a tensor backend is chosen. */
export function engineStatus(): {
  ready: boolean;
  backend: string | null;
  device: string | null;
  reason?: string;
} {
  const info = backendInfo();
  const reason = info ? undefined : 'tensor backend not initialised';
  return { ready: !reason, backend: info?.backend ?? null, device: info?.device ?? null, reason };
}

/** The engine cannot serve (no tensor backend): the API answers 503. */
export class EngineUnavailableError extends Error {}

/** A model definition the library rejected, with the library's message (names the field). */
export class DefinitionError extends Error {}

/** A tokenizer by name (the library shares one instance per name). */
export function getTokenizer(name: TokenizerName): Tokenizer {
  return createTokenizer(name);
}

/** A built language model with the sizes the service checks. */
export interface BuiltLm {
  model: TransformerWrapper;
  numTokens: number;
  maxSeqLen: number;
}

/**
 * Builds a model from its JSON definition. Throws DefinitionError with the library's message
 * (`attnLayers.depth: expected a positive integer, got -1`) when the definition is bad, or when the
 * model is not a token language model (the service trains and samples TransformerWrapper decoders).
 */
export function buildModel(config: Record<string, unknown>, seed?: number): BuiltLm {
  if (!backendInfo()) throw new EngineUnavailableError('tensor backend not initialised');
  if (seed !== undefined) manualSeed(seed);
  let built: ReturnType<typeof fromConfig>;
  try {
    built = fromConfig(config);
  } catch (e) {
    throw new DefinitionError((e as Error).message);
  }
  if (!(built instanceof TransformerWrapper)) {
    built.dispose();
    throw new DefinitionError(
      `wrapper: expected a token language model (TransformerWrapper with numTokens and maxSeqLen), got ${built.constructor.name}`,
    );
  }
  return { model: built, numTokens: built.numTokens, maxSeqLen: built.maxSeqLen };
}

/** Wraps a language model for training and sampling. */
export function autoregressive(model: TransformerWrapper): AutoregressiveWrapper {
  return new AutoregressiveWrapper(model);
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
