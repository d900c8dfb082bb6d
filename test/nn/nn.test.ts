import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { describe, expect, it } from 'vitest';
import { Linear } from '../../src/nn/linear.js';
import {
  Embedding,
  TokenEmbedding,
  AbsolutePositionalEmbedding,
  ScaledSinusoidalEmbedding,
  embeddingLookup,
} from '../../src/nn/embedding.js';
import { LayerNorm, RMSNorm, ScaleNorm, SimpleRMSNorm } from '../../src/nn/norms.js';
import { FeedForward } from '../../src/nn/feedforward.js';
import { GRUGating, Residual } from '../../src/nn/residual.js';
import { LayerScale, Scale, ShiftTokens, shiftTokens } from '../../src/nn/branch.js';
import { dropout, gelu } from '../../src/nn/functional.js';
import { Rng, manualSeed } from '../../src/utils/random.js';

function maxDiff(a: tf.Tensor, b: tf.Tensor | number[]): number {
  return tf.tidy(
    () => tf.max(tf.abs(tf.sub(a, b instanceof tf.Tensor ? b : tf.tensor(b, a.shape)))).dataSync()[0]!,
  );
}

describe('Linear', () => {
  it('has torch shapes and init bounds, and computes x W^T + b', () => {
    manualSeed(0);
    const l = new Linear(4, 3);
    expect(l.weight.shape).toEqual([3, 4]);
    expect(l.bias!.shape).toEqual([3]);
    const w = l.weight.dataSync();
    expect(Math.max(...w.map(Math.abs))).toBeLessThanOrEqual(0.5);
    l.weight.assign(tf.tensor2d([1, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1], [3, 4]));
    l.bias!.assign(tf.tensor1d([0, 1, 2]));
    const x = tf.tensor3d([1, 2, 3, 4], [1, 1, 4]);
    const y = l.forward(x);
    expect(y.shape).toEqual([1, 1, 3]);
    expect(Array.from(y.dataSync())).toEqual([1, 3, 12]);
    expect(new Linear(4, 3, { bias: false }).namedParameters().map(([k]) => k)).toEqual(['weight']);
    expect(() => l.forward(tf.zeros([2, 5]))).toThrow(/^x: expected last dimension 4/);
    expect(() => new Linear(0, 3)).toThrow(/^inFeatures:/);
    tf.dispose([x, y]);
    l.dispose();
  });
});

describe('embeddings', () => {
  it('token embedding uses kaiming-normal std and l2norm when asked', () => {
    manualSeed(1);
    const e = new TokenEmbedding(64, 200);
    const std = tf.tidy(() => tf.sqrt(tf.moments(e.emb.weight).variance).dataSync()[0]!);
    expect(Math.abs(std - Math.sqrt(2 / 64))).toBeLessThan(0.01);
    const l2 = new TokenEmbedding(8, 10, { l2normEmbed: true });
    const ids = tf.tensor2d([[1, 2, 3]], [1, 3], 'int32');
    const out = l2.forward(ids);
    const norms = tf.tidy(() => tf.sqrt(tf.sum(tf.square(out), -1)));
    expect(maxDiff(norms, [1, 1, 1])).toBeLessThan(1e-5);
    tf.dispose([ids, out, norms]);
    e.dispose();
    l2.dispose();
  });

  it('absolute positions scale by dim^-0.5 and check the length', () => {
    manualSeed(2);
    const p = new AbsolutePositionalEmbedding(4, 5);
    const out = p.forward(3);
    const expected = tf.tidy(() => tf.mul(tf.slice(p.emb.weight, [0, 0], [3, 4]), 0.5));
    expect(maxDiff(out, expected)).toBeLessThan(1e-7);
    expect(() => p.forward(6)).toThrow(/maxSeqLen 5/);
    tf.dispose([out, expected]);
    p.dispose();
  });

  it('scaled sinusoidal: sin/cos halves with inv_freq not persistent', () => {
    const s = new ScaledSinusoidalEmbedding(4);
    expect(Object.keys(s.stateDict())).toEqual(['scale']);
    const out = s.forward(2);
    // position 1: freqs 1, 0.01
    const e = [0, 0, 1, 1, Math.sin(1), Math.sin(0.01), Math.cos(1), Math.cos(0.01)].map((v) => v * 0.5);
    expect(maxDiff(out, e)).toBeLessThan(1e-6);
    out.dispose();
    s.dispose();
  });

  it('lookup gradients agree between gather and the one-hot path (backends without UnsortedSegmentSum)', () => {
    const w = tf.variable(tf.randomNormal([5, 3], 0, 1, 'float32', 1));
    const ids = tf.tensor2d(
      [
        [1, 1, 4],
        [0, 2, 1],
      ],
      [2, 3],
      'int32',
    );
    const dy = tf.randomNormal([2, 3, 3], 0, 1, 'float32', 2);
    const grad = (viaOneHot?: boolean) =>
      tf.variableGrads(() => tf.sum(tf.mul(embeddingLookup(w, ids, viaOneHot), dy)) as tf.Scalar, [w]);
    const a = grad(); // the backend's own path (gather where UnsortedSegmentSum exists)
    const b = grad(true);
    expect(maxDiff(a.grads[w.name]!, b.grads[w.name]!)).toBeLessThan(1e-6);
    // row 3 is never looked up: zero gradient; row 1 is used three times
    const g = b.grads[w.name]!.arraySync() as number[][];
    expect(g[3]).toEqual([0, 0, 0]);
    const rows = dy.arraySync() as number[][][];
    const expected1 = [0, 1, 2].map((k) => rows[0]![0]![k]! + rows[0]![1]![k]! + rows[1]![2]![k]!);
    expect(maxDiff(tf.tensor1d(g[1]!), expected1)).toBeLessThan(1e-5);
    tf.dispose([w, ids, dy, a.value, b.value, a.grads[w.name]!, b.grads[w.name]!]);
  });

  it('Embedding casts ids and has N(0, 1) init', () => {
    manualSeed(3);
    const e = new Embedding(500, 20);
    const std = tf.tidy(() => tf.sqrt(tf.moments(e.weight).variance).dataSync()[0]!);
    expect(Math.abs(std - 1)).toBeLessThan(0.05);
    e.dispose();
  });
});

describe('norms', () => {
  const x = tf.tensor2d([1, 2, 3, 6, -1, 0, 1, 4], [2, 4]);
  it('LayerNorm normalises with eps 1e-5 and gamma (unit offset stores gamma - 1)', () => {
    const ln = new LayerNorm(4);
    const off = new LayerNorm(4, { unitOffset: true });
    expect(Array.from(off.gamma.dataSync())).toEqual([0, 0, 0, 0]);
    const a = ln.forward(x);
    const b = off.forward(x);
    const row = [1, 2, 3, 6];
    const mean = 3;
    const v = row.reduce((s, r) => s + (r - mean) ** 2, 0) / 4;
    const exp0 = row.map((r) => (r - mean) / Math.sqrt(v + 1e-5));
    expect(maxDiff(tf.slice(a, [0, 0], [1, 4]), exp0)).toBeLessThan(1e-5);
    expect(maxDiff(a, b)).toBeLessThan(1e-7);
    tf.dispose([a, b]);
  });
  it('RMSNorm, ScaleNorm, SimpleRMSNorm: normalize * sqrt(dim) * g', () => {
    const r = new RMSNorm(4);
    const s = new ScaleNorm(4);
    const sr = new SimpleRMSNorm(4);
    expect(r.g.shape).toEqual([4]);
    expect(s.g.shape).toEqual([1]);
    expect(sr.namedParameters()).toEqual([]);
    r.g.assign(tf.tensor1d([1, 2, 1, 1]));
    const row = [1, 2, 3, 6];
    const n = Math.sqrt(row.reduce((a, v) => a + v * v, 0));
    const exp = row.map((v) => (v / n) * 2);
    const out = sr.forward(x);
    expect(maxDiff(tf.slice(out, [0, 0], [1, 4]), exp)).toBeLessThan(1e-6);
    const outR = r.forward(x);
    expect(
      maxDiff(
        tf.slice(outR, [0, 0], [1, 4]),
        exp.map((v, i) => v * [1, 2, 1, 1][i]!),
      ),
    ).toBeLessThan(1e-6);
    const outS = s.forward(x);
    expect(maxDiff(outS, out)).toBeLessThan(1e-6);
    tf.dispose([out, outR, outS]);
  });
});

describe('FeedForward', () => {
  it('parameter names follow the reference Sequential indices', () => {
    const names = (o: ConstructorParameters<typeof FeedForward>[1]) =>
      new FeedForward(8, o).namedParameters().map(([k]) => k);
    expect(names({})).toEqual(['ff.0.0.weight', 'ff.0.0.bias', 'ff.2.weight', 'ff.2.bias']);
    expect(names({ glu: true })).toEqual(['ff.0.proj.weight', 'ff.0.proj.bias', 'ff.2.weight', 'ff.2.bias']);
    expect(names({ postActLn: true, noBias: true })).toEqual(['ff.0.0.weight', 'ff.1.gamma', 'ff.3.weight']);
    expect(names({ glu: true, gluMultBias: true, mult: 2 })).toContain('ff.0.mult_bias');
    expect(new FeedForward(8, { mult: 2, dimOut: 3 }).namedParameters().map(([, v]) => v.shape)).toEqual([
      [16, 8],
      [16],
      [3, 16],
      [3],
    ]);
    expect(() => new FeedForward(8, { bogus: 1 } as never)).toThrow(/^bogus:/);
  });

  it('dropout is active only in training', () => {
    manualSeed(4);
    const ff = new FeedForward(8, { dropout: 0.5 });
    const x = tf.randomNormal([2, 3, 8], 0, 1, 'float32', 1);
    ff.eval();
    const a = ff.forward(x);
    const b = ff.forward(x);
    expect(maxDiff(a, b)).toBe(0);
    ff.train();
    const c = ff.forward(x);
    const d = ff.forward(x);
    expect(maxDiff(c, d)).toBeGreaterThan(0);
    tf.dispose([x, a, b, c, d]);
    ff.dispose();
  });
});

describe('residuals and branch wrappers', () => {
  it('Residual scales the residual, GRUGating mixes through a GRU cell', () => {
    const r = new Residual(3, { scaleResidual: true, scaleResidualConstant: 2 });
    r.residualScale!.assign(tf.tensor1d([1, 2, 3]));
    const out = r.forward(tf.ones([1, 1, 3]), tf.ones([1, 1, 3]));
    expect(Array.from(out.dataSync())).toEqual([3, 5, 7]);
    const g = new GRUGating(3);
    expect(g.namedParameters().map(([k, v]) => `${k}:${v.shape}`)).toEqual([
      'gru.weight_ih:9,3',
      'gru.weight_hh:9,3',
      'gru.bias_ih:9',
      'gru.bias_hh:9',
    ]);
    // zero weights: r = z = 0.5, n = 0 -> h' = 0.5 * h
    for (const v of g.parameters()) v.assign(tf.zerosLike(v));
    const h = tf.tensor3d([2, 4, 6], [1, 1, 3]);
    const gout = g.forward(tf.ones([1, 1, 3]), h);
    expect(maxDiff(gout, [1, 2, 3])).toBeLessThan(1e-6);
    tf.dispose([out, h, gout]);
  });

  it('shiftTokens shifts feature segments along the sequence, zeroing masked tokens', () => {
    // x: [1, 3, 4], features split in 2 segments of 2 (shifts 0 and 1)
    const x = tf.tensor3d([1, 1, 10, 10, 2, 2, 20, 20, 3, 3, 30, 30], [1, 3, 4]);
    const out = shiftTokens(x, [0, 1]);
    expect(Array.from(out.dataSync())).toEqual([1, 1, 0, 0, 2, 2, 10, 10, 3, 3, 20, 20]);
    const back = shiftTokens(x, [-1, 0]);
    expect(Array.from(back.dataSync())).toEqual([2, 2, 10, 10, 3, 3, 20, 20, 0, 0, 30, 30]);
    const mask = tf.tensor2d([[true, false, true]], [1, 3], 'bool');
    const masked = shiftTokens(x, [0, 1], mask);
    expect(Array.from(masked.dataSync())).toEqual([1, 1, 0, 0, 2, 2, 10, 10, 3, 3, 0, 0]);
    tf.dispose([x, out, back, mask, masked]);
  });

  it('Scale, LayerScale and ShiftTokens wrap a branch under `fn`', () => {
    const ff = new FeedForward(4);
    const wrapped = new LayerScale(new ShiftTokens([0, 1], new Scale(0.5, ff)), 4, 0, true);
    const names = wrapped.namedParameters().map(([k]) => k);
    expect(names).toContain('fn.fn.fn.ff.0.0.weight');
    expect(names).toContain('gamma');
    const x = tf.randomNormal([1, 3, 4], 0, 1, 'float32', 2);
    const plain = ff.forward(shiftTokens(x, [0, 1]));
    const out = wrapped.forward(x) as tf.Tensor;
    // gamma stored as -1 with unit offset: overall scale 0 * 0.5
    expect(maxDiff(out, tf.zerosLike(out))).toBe(0);
    wrapped.gamma.assign(tf.fill([4], 1));
    const out2 = wrapped.forward(x) as tf.Tensor;
    expect(maxDiff(out2, tf.mul(plain, 0.5 * 2))).toBeLessThan(1e-6);
    tf.dispose([x, plain, out, out2]);
  });
});

describe('functional', () => {
  it('gelu is the exact erf form', () => {
    const x = tf.tensor1d([-1, 0, 1, 2]);
    // torch.nn.functional.gelu values
    expect(maxDiff(gelu(x), [-0.15865525, 0, 0.8413447, 1.9544997])).toBeLessThan(1e-5);
    x.dispose();
  });

  it('dropout is seeded, inverted and a no-op outside training', () => {
    const x = tf.ones([1000]);
    expect(dropout(x, 0.5, false)).toBe(x);
    const a = dropout(x, 0.25, true, new Rng(1));
    const b = dropout(x, 0.25, true, new Rng(1));
    const c = dropout(x, 0.25, true, new Rng(2));
    expect(maxDiff(a, b)).toBe(0);
    expect(maxDiff(a, c)).toBeGreaterThan(0);
    const vals = a.dataSync();
    const zeros = vals.filter((v) => v === 0).length;
    expect(zeros).toBeGreaterThan(180);
    expect(zeros).toBeLessThan(320);
    expect(vals.every((v) => v === 0 || Math.abs(v - 1 / 0.75) < 1e-6)).toBe(true);
    tf.dispose([x, a, b, c]);
  });
});
