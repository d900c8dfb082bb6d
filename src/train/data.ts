/**
 * Training data: token streams as Int32Array, split into train/validation, and batches of random
 * windows drawn with a seeded generator (same seed, same batches; resumable from a position).
 */
import * as tf from '@tensorflow/tfjs-core';
import { Rng } from '../utils/random.js';
import type { Tokenizer } from '../io/tokenizer.js';

/** Encodes text into a token stream. */
export function tokenizeText(text: string, tokenizer: Tokenizer): Int32Array {
  return Int32Array.from(tokenizer.encode(text));
}

/**
 * Splits a token stream into a training head and a validation tail (`valFraction` of the tokens).
 * The arrays share memory with `tokens`.
 */
export function splitTokens(tokens: Int32Array, valFraction = 0.1): { train: Int32Array; val: Int32Array } {
  if (!(tokens instanceof Int32Array))
    throw new Error(`tokens: expected an Int32Array, got ${typeof tokens}`);
  if (!(valFraction >= 0 && valFraction < 1)) {
    throw new Error(`valFraction: expected a number in [0, 1), got ${valFraction}`);
  }
  const nVal = Math.floor(tokens.length * valFraction);
  const cut = tokens.length - nVal;
  return { train: tokens.subarray(0, cut), val: tokens.subarray(cut) };
}

/** Where a `WindowSampler` stands, so a resumed run draws the same batches. */
export interface SamplerState {
  seed: number;
  /** batches drawn so far */
  drawn: number;
}

/**
 * Draws batches of `batchSize` windows of `seqLen + 1` consecutive tokens (inputs plus the shifted
 * targets), each window starting at a uniform random offset.
 */
export class WindowSampler {
  private rng: Rng;
  private drawnCount = 0;

  constructor(
    readonly tokens: Int32Array,
    readonly batchSize: number,
    readonly seqLen: number,
    readonly seed = 0,
    name = 'tokens',
  ) {
    if (!Number.isInteger(batchSize) || batchSize < 1) {
      throw new Error(`batchSize: expected a positive integer, got ${batchSize}`);
    }
    if (!Number.isInteger(seqLen) || seqLen < 1)
      throw new Error(`seqLen: expected a positive integer, got ${seqLen}`);
    if (tokens.length < seqLen + 1) {
      throw new Error(`${name}: expected at least seqLen + 1 = ${seqLen + 1} tokens, got ${tokens.length}`);
    }
    this.rng = new Rng(seed);
  }

  get drawn(): number {
    return this.drawnCount;
  }

  /** Start offsets of the next batch (advances the generator). */
  nextOffsets(): number[] {
    const span = this.tokens.length - (this.seqLen + 1) + 1;
    const out: number[] = [];
    for (let i = 0; i < this.batchSize; i++) out.push(this.rng.int(0, span));
    this.drawnCount++;
    return out;
  }

  /** The next batch: [batchSize, seqLen + 1] int32 (caller disposes). */
  next(): tf.Tensor2D {
    const offsets = this.nextOffsets();
    const w = this.seqLen + 1;
    const buf = new Int32Array(this.batchSize * w);
    offsets.forEach((o, i) => buf.set(this.tokens.subarray(o, o + w), i * w));
    return tf.tensor2d(buf, [this.batchSize, w], 'int32');
  }

  state(): SamplerState {
    return { seed: this.seed, drawn: this.drawnCount };
  }

  /** Moves to `state` by replaying the generator from its seed. */
  restore(state: SamplerState): void {
    if (state.seed !== this.seed) throw new Error(`state.seed: expected ${this.seed}, got ${state.seed}`);
    if (!Number.isInteger(state.drawn) || state.drawn < 0) {
      throw new Error(`state.drawn: expected a non-negative integer, got ${state.drawn}`);
    }
    this.rng = new Rng(this.seed);
    this.drawnCount = 0;
    while (this.drawnCount < state.drawn) this.nextOffsets();
  }
}

/**
 * Consecutive non-overlapping windows over a stream, for evaluation: up to `maxBatches` batches of
 * [batchSize, seqLen + 1] (the last may be smaller). Deterministic; caller disposes.
 */
export function* sequentialBatches(
  tokens: Int32Array,
  batchSize: number,
  seqLen: number,
  maxBatches = Infinity,
): Generator<tf.Tensor2D> {
  const w = seqLen + 1;
  const windows = Math.floor((tokens.length - 1) / seqLen);
  let made = 0;
  for (let start = 0; start < windows && made < maxBatches; start += batchSize, made++) {
    const rows = Math.min(batchSize, windows - start);
    const buf = new Int32Array(rows * w);
    for (let r = 0; r < rows; r++) {
      const o = (start + r) * seqLen;
      buf.set(tokens.subarray(o, o + w), r * w);
    }
    yield tf.tensor2d(buf, [rows, w], 'int32');
  }
}
