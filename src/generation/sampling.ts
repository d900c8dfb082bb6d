/**
 * Drawing the next token from last-position logits: greedy (temperature 0) or a seeded draw from
 * softmax(filter(logits) / temperature).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Rng } from '../utils/random.js';
import { backendHasKernel } from '../nn/fused.js';
import type { FilterFn, FilterKwargs } from './filters.js';

/**
 * A kernel a backend may register to draw on its own side, so that only the picked ids are read:
 *   XtSampleRows  inputs {probs: float32 [b, v]}, attrs {draws: Float64Array [b], uniform in [0, 1)}
 *                 output int32 [b]: what `multinomialRows` picks for those draws (-1: no mass)
 */
export const XT_SAMPLE_ROWS = 'XtSampleRows';

/**
 * Index of the largest logit per row (the first on ties, as torch.argmax). logits: [b, v]. Runs
 * on the backend, so that only the b ids cross to JavaScript.
 */
export function argmaxRows(logits: tf.Tensor): number[] {
  const ids = tf.argMax(logits, -1);
  try {
    return Array.from(ids.dataSync());
  } finally {
    ids.dispose();
  }
}

/**
 * One draw per row from the categorical distributions `probs` ([b, v], rows need not sum to 1);
 * `rng` is one generator for every row (drawn in row order), or one per row.
 */
export function multinomialRows(probs: tf.Tensor, rng: Rng | Rng[]): number[] {
  const [b, v] = probs.shape as [number, number];
  if (Array.isArray(rng) && rng.length !== b)
    throw new Error(`rng: expected ${b} generators (one per row), got ${rng.length}`);
  const rngOf = (i: number): Rng => (Array.isArray(rng) ? rng[i]! : rng);
  if (backendHasKernel(XT_SAMPLE_ROWS)) {
    const draws = new Float64Array(b);
    for (let i = 0; i < b; i++) draws[i] = rngOf(i).random();
    const ids = tf
      .engine()
      .runKernel(XT_SAMPLE_ROWS, { probs }, { draws } as unknown as tf.NamedAttrMap) as tf.Tensor;
    const picked = Array.from(ids.dataSync());
    ids.dispose();
    if (picked.some((p) => p < 0))
      throw new Error('sample: every token was filtered out (no probability mass left)');
    return picked;
  }
  const data = probs.dataSync();
  const out: number[] = [];
  for (let i = 0; i < b; i++) {
    let total = 0;
    for (let j = 0; j < v; j++) {
      const p = data[i * v + j]!;
      if (p > 0) total += p;
    }
    const u = rngOf(i).random() * total;
    let acc = 0;
    let pick = -1;
    for (let j = 0; j < v; j++) {
      const p = data[i * v + j]!;
      if (!(p > 0)) continue;
      acc += p;
      pick = j;
      if (acc > u) break;
    }
    if (pick < 0) throw new Error('sample: every token was filtered out (no probability mass left)');
    out.push(pick);
  }
  return out;
}

export interface SampleOptions {
  /** 0 = greedy */
  temperature: number;
  /** applied before the temperature; none = keep all */
  filter?: FilterFn;
  filterKwargs?: FilterKwargs;
  /** one generator for every row, or one per row */
  rng: Rng | Rng[];
}

/**
 * logits / temperature; at temperature 1 the logits themselves (x / 1 is x, bit for bit, NaN and
 * -0 included), which spares a vocabulary-sized op per step at the most common temperature.
 */
export function divideByTemperature(logits: tf.Tensor, temperature: number): tf.Tensor {
  return temperature === 1 ? logits : tf.div(logits, temperature);
}

/** The next token of every row. logits: [b, v] -> b ids. */
export function sampleNext(logits: tf.Tensor, o: SampleOptions): number[] {
  if (o.temperature === 0) return argmaxRows(logits);
  const probs = tf.tidy(() => {
    const filtered = o.filter ? o.filter(logits, o.filterKwargs ?? {}) : logits;
    return tf.softmax(divideByTemperature(filtered, o.temperature), -1);
  });
  try {
    return multinomialRows(probs, o.rng);
  } finally {
    probs.dispose();
  }
}

/** Checks a temperature: a finite number >= 0. */
export function checkTemperature(t: unknown): number {
  if (typeof t !== 'number' || !(t >= 0) || !Number.isFinite(t)) {
    throw new Error(`temperature: expected a finite number >= 0, got ${String(t)}`);
  }
  return t;
}
