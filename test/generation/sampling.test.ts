import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import {
  argmaxRows,
  divideByTemperature,
  multinomialRows,
  XT_SAMPLE_ROWS,
} from '../../src/generation/sampling.js';
import { Rng } from '../../src/utils/random.js';

// The sampler walks each row's cumulative mass (positive entries only, in double precision) up to
// draw * total; where the backend registers XtSampleRows the walk runs there. Both must pick what
// the walk written out here picks.

function walk(row: Float32Array, u: number): number {
  let total = 0;
  for (const p of row) if (p > 0) total += p;
  const target = u * total;
  let acc = 0;
  let pick = -1;
  for (let j = 0; j < row.length; j++) {
    if (!(row[j]! > 0)) continue;
    acc += row[j]!;
    pick = j;
    if (acc > target) break;
  }
  return pick;
}

describe('sampling rows', () => {
  it('has the native draw exactly on the torch backend', () => {
    expect(tf.getKernel(XT_SAMPLE_ROWS, tf.getBackend()) !== undefined).toBe(tf.getBackend() === 'torch');
  });

  it('draws what the cumulative walk picks, skipping zero, negative and NaN entries', () => {
    const rng = new Rng(21);
    const b = 6;
    const v = 97;
    const data = Float32Array.from({ length: b * v }, () => {
      const r = rng.random();
      return r < 0.3 ? 0 : r < 0.35 ? -r : r < 0.37 ? NaN : rng.random() ** 4;
    });
    const probs = tf.tensor2d(data, [b, v]);
    for (let trial = 0; trial < 20; trial++) {
      const seed = 100 + trial;
      const got = multinomialRows(probs, new Rng(seed));
      const draws = new Rng(seed);
      const want = Array.from({ length: b }, (_, i) =>
        walk(data.subarray(i * v, (i + 1) * v), draws.random()),
      );
      expect(got).toEqual(want);
    }
    probs.dispose();
  });

  it('divides by the temperature, and at 1 runs no op (x / 1 is x, -0 and NaN included)', () => {
    const x = tf.tensor2d([[-0, 1.5, NaN, -Infinity, 3]]);
    expect(divideByTemperature(x, 1)).toBe(x);
    const scaled = divideByTemperature(x, 0.5);
    expect(Array.from(scaled.dataSync())).toEqual([-0, 3, NaN, -Infinity, 6]);
    expect(Object.is(scaled.dataSync()[0], -0)).toBe(true);
    tf.dispose([x, scaled]);
  });

  it('names a row with no mass left, and argmax takes the first of equal maxima', () => {
    const probs = tf.tensor2d([0.2, 0.8, 0, 0, -1, 0], [2, 3]);
    expect(() => multinomialRows(probs, new Rng(1))).toThrow(/every token was filtered out/);
    const logits = tf.tensor2d([1, 3, 3, -2, -5, -2], [2, 3]);
    expect(argmaxRows(logits)).toEqual([1, 0]);
    tf.dispose([probs, logits]);
  });
});
