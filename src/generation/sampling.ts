/**
 * Drawing the next token from last-position logits: greedy (temperature 0) or a seeded draw from
 * softmax(filter(logits) / temperature).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Rng } from '../utils/random.js';
import type { FilterFn, FilterKwargs } from './filters.js';

/** Index of the largest logit per row (the first on ties, as torch.argmax). logits: [b, v]. */
export function argmaxRows(logits: tf.Tensor): number[] {
  const [b, v] = logits.shape as [number, number];
  const d = logits.dataSync();
  const out: number[] = [];
  for (let i = 0; i < b; i++) {
    let best = 0;
    let bv = d[i * v]!;
    for (let j = 1; j < v; j++) {
      const x = d[i * v + j]!;
      if (x > bv) {
        bv = x;
        best = j;
      }
    }
    out.push(best);
  }
  return out;
}

/** One draw per row from the categorical distributions `probs` ([b, v], rows need not sum to 1). */
export function multinomialRows(probs: tf.Tensor, rng: Rng): number[] {
  const [b, v] = probs.shape as [number, number];
  const data = probs.dataSync();
  const out: number[] = [];
  for (let i = 0; i < b; i++) {
    let total = 0;
    for (let j = 0; j < v; j++) {
      const p = data[i * v + j]!;
      if (p > 0) total += p;
    }
    const u = rng.random() * total;
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
  rng: Rng;
}

/** The next token of every row. logits: [b, v] -> b ids. */
export function sampleNext(logits: tf.Tensor, o: SampleOptions): number[] {
  if (o.temperature === 0) return argmaxRows(logits);
  const probs = tf.tidy(() => {
    const filtered = o.filter ? o.filter(logits, o.filterKwargs ?? {}) : logits;
    return tf.softmax(tf.div(filtered, o.temperature), -1);
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
