import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import {
  contrastiveDecode,
  FLOAT32_MAX,
  minP,
  resolveFilter,
  topA,
  topK,
  topP,
  XT_TOPK_FILTER,
  XT_TOPP_FILTER,
} from '../../src/generation/filters.js';
import { setFusedKernels } from '../../src/nn/fused.js';

const NEG = -Infinity;

function run(fn: () => tf.Tensor): number[][] {
  const before = tf.memory().numTensors;
  const t = fn();
  const out = t.arraySync() as number[][];
  t.dispose();
  expect(tf.memory().numTensors).toBe(before);
  return out;
}

describe('sampling filters', () => {
  const rows = [
    [1, 3, 2, 0, -1, 5, 4, 0.5, 2.5, -2, 1.5],
    [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
  ];

  it('topK keeps the k largest per row, exactly -inf elsewhere', () => {
    const logits = tf.tensor2d(rows);
    // default fraction 0.1 of 11 rounds up to 2
    const d = run(() => topK(logits));
    expect(d[0]).toEqual([NEG, NEG, NEG, NEG, NEG, 5, 4, NEG, NEG, NEG, NEG]);
    expect(d[1]).toEqual([NEG, NEG, NEG, NEG, NEG, NEG, NEG, NEG, NEG, Math.fround(0.9), 1]);
    const k3 = run(() => topK(logits, { k: 3 }));
    expect(k3[0]).toEqual([NEG, 3, NEG, NEG, NEG, 5, 4, NEG, NEG, NEG, NEG]);
    const big = run(() => topK(logits, { k: 100 }));
    expect(big[0]).toEqual(rows[0]!.map(Math.fround));
    logits.dispose();
  });

  it('topK: the fused kernel, where the backend has one, keeps exactly what the composite keeps', () => {
    const registered = tf.getKernel(XT_TOPK_FILTER, tf.getBackend()) !== undefined;
    expect(registered).toBe(tf.getBackend() === 'torch');
    // ties across the k-th place, NaN, infinities, -0 beside 0, a vocabulary of 1000 with repeated
    // values, and one of 20000 (the kernel's counting path) with repeats, NaN and both zeros
    const small = tf.tensor2d([
      [2, 7, 7, 1, 7, 0, 7, 3],
      [NaN, 1, Infinity, -Infinity, 1, 1, NaN, 0],
      [0, -0, -1, -0, 0, -2, -0, -3],
    ]);
    const large = tf.round(tf.mul(tf.randomNormal([3, 1000], 0, 1, 'float32', 5), 6));
    // (row 0 without ties, rows 1 and 2 rounded to few and to many distinct values)
    const wide = tf.tidy(() => {
      const v = tf.randomNormal([3, 20000], 0, 1, 'float32', 6).arraySync() as number[][];
      v.forEach((row, r) =>
        row.forEach((x, j) => {
          const y = r === 0 ? x : Math.round(x * (r === 1 ? 40 : 4000));
          row[j] = j % 997 === r ? NaN : y === 0 && j % 2 ? -0 : y;
        }),
      );
      return tf.tensor2d(v);
    });
    for (const [logits, k] of [
      [small, 1],
      [small, 3],
      [small, 5],
      [small, 8],
      [large, 100],
      [large, 1],
      [wide, 1],
      [wide, 30],
      [wide, 2000],
      [wide, 10000],
      [wide, 19999],
    ] as const) {
      const fused = run(() => topK(logits, { k }));
      const prev = setFusedKernels(false);
      const composite = run(() => topK(logits, { k }));
      setFusedKernels(prev);
      expect(fused).toEqual(composite);
    }
    tf.dispose([small, large, wide]);
  });

  it('topP keeps the nucleus, always the top token', () => {
    // probabilities 0.5, 0.25, 0.125, 0.125 (logs of them)
    const p = [0.125, 0.5, 0.125, 0.25];
    const logits = tf.tensor2d([p.map(Math.log)]);
    const l = p.map((x) => Math.fround(Math.log(x)));
    // cumulative in sorted order: 0.5, 0.75, 0.875/1.0 -> at 0.6 keep 0.5 and 0.25
    expect(run(() => topP(logits, { thres: 0.6 }))[0]).toEqual([NEG, l[1], NEG, l[3]]);
    // at 0.4 only the top token (its own mass exceeds thres, but the first is never removed)
    expect(run(() => topP(logits, { thres: 0.4 }))[0]).toEqual([NEG, l[1], NEG, NEG]);
    expect(run(() => topP(logits, { thres: 1 }))[0]).toEqual(l);
    expect(() => topP(logits, { thres: 0 })).toThrow(/thres/);
    expect(() => topP(logits, { thres: 1.5 })).toThrow(/thres/);
    logits.dispose();
  });

  it('topP: the fused kernel, where the backend has one, keeps exactly what the composite keeps', () => {
    expect(tf.getKernel(XT_TOPP_FILTER, tf.getBackend()) !== undefined).toBe(tf.getBackend() === 'torch');
    // ties (sorted in index order), a row with NaN (the composite keeps every entry), -0 beside 0,
    // one dominant logit, and rows of 20000 (continuous, and rounded to many ties) at several scales
    const small = tf.tensor2d([
      [2, 7, 7, 1, 7, 0, 7, 3],
      [NaN, 1, Infinity, -Infinity, 1, 1, NaN, 0],
      [0, -0, -1, -0, 0, -2, -0, -3],
      [30, 0, 0, 0, 0, 0, 0, 0],
    ]);
    const wide = tf.tidy(() => {
      const v = tf.randomNormal([4, 20000], 0, 1, 'float32', 7).arraySync() as number[][];
      v.forEach((row, r) => row.forEach((x, j) => (row[j] = r % 2 ? Math.round(x * 8) : x * (r + 1) * 2)));
      return tf.tensor2d(v);
    });
    // the composite's scatterND adds into zeros, so a kept -0 comes back as 0; the kernel keeps the
    // logit's bits, as the reference's scatter does (the same probabilities either way)
    const zeroSign = (rows: number[][]) => rows.map((r) => r.map((x) => (x === 0 ? 0 : x)));
    for (const logits of [small, wide])
      for (const thres of [0.05, 0.5, 0.9, 0.999, 1]) {
        const fused = run(() => topP(logits, { thres }));
        const prev = setFusedKernels(false);
        const composite = run(() => topP(logits, { thres }));
        setFusedKernels(prev);
        expect(zeroSign(fused)).toEqual(zeroSign(composite));
      }
    const kept = run(() => topP(small, { thres: 1 }));
    expect(Object.is(kept[2]![1], -0)).toBe(tf.getBackend() === 'torch');
    tf.dispose([small, wide]);
  });

  it('topA and minP compare probabilities to the maximum', () => {
    const p = [0.6, 0.3, 0.05, 0.04, 0.01];
    const logits = tf.tensor2d([p.map(Math.log)]);
    const l = p.map((x) => Math.fround(Math.log(x)));
    // minP 0.1: limit 0.06 -> keep 0.6, 0.3
    expect(run(() => minP(logits, { minP: 0.1 }))[0]).toEqual([l[0], l[1], NEG, NEG, NEG]);
    // topA defaults: limit 0.6^2 * 0.02 = 0.0072 -> drop only 0.01? no: 0.01 >= 0.0072 keeps all
    expect(run(() => topA(logits))[0]).toEqual(l);
    // pow 1, ratio 0.1: limit 0.06 -> as minP 0.1
    expect(run(() => topA(logits, { minPPow: 1, minPRatio: 0.1 }))[0]).toEqual([l[0], l[1], NEG, NEG, NEG]);
    logits.dispose();
  });

  it('contrastive decoding combines expert and amateur below the alpha cutoff', () => {
    const e = tf.tensor2d([[2, 1, -3]]);
    const a = tf.tensor2d([[1, 2, 0]]);
    // cutoff = log(0.1) + 2 = -0.3026; -3 is below
    const out = run(() => contrastiveDecode(e, a, { alpha: 0.1, beta: 0.5 }));
    expect(out[0]![0]).toBeCloseTo(1.5 * 2 - 0.5 * 1, 6);
    expect(out[0]![1]).toBeCloseTo(1.5 * 1 - 0.5 * 2, 6);
    expect(out[0]![2]).toBe(-FLOAT32_MAX);
    e.dispose();
    a.dispose();
  });

  it('resolves filters by name and rejects unknown names and options', () => {
    const logits = tf.tensor2d([[1, 2, 3, 4]]);
    expect(run(() => resolveFilter('top_k')(logits, { k: 1 }))[0]).toEqual([NEG, NEG, NEG, 4]);
    expect(run(() => resolveFilter('minP')(logits, { min_p: 0.3 }))[0]).toEqual([NEG, NEG, 3, 4]);
    expect(() => resolveFilter('top_z')).toThrow(/filterLogitsFn/);
    expect(() => topK(logits, { q: 1 } as never)).toThrow(/filterKwargs\.q/);
    logits.dispose();
  });
});
