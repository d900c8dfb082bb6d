/**
 * The lean paths (custom gradients, shared rotary tables, one-kernel linear) must give the same
 * numbers, bit for bit, as the plain TF.js formulations they replace: forward and gradients. The
 * fused kernels a backend registers (src/nn/fused.ts) must agree with them to float32 rounding, and
 * the fused rotary kernel bit for bit.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { describe, expect, it } from 'vitest';
import { linear } from '../../src/nn/linear.js';
import { gelu } from '../../src/nn/functional.js';
import { LayerNorm } from '../../src/nn/norms.js';
import {
  RotaryEmbedding,
  applyRotaryPosEmb,
  applyRotaryTables,
  prepareRotary,
} from '../../src/attention/rotary.js';
import { Rng } from '../../src/utils/random.js';
import {
  XT_GELU,
  XT_GELU_GRAD,
  XT_LAYER_NORM,
  XT_LAYER_NORM_GRAD,
  XT_ROTARY,
  backendHasKernel,
  geluBackward,
  layerNormBackward,
  setFusedKernels,
} from '../../src/nn/fused.js';

function rand(shape: number[], seed: number): tf.Tensor {
  const rng = new Rng(seed);
  const size = shape.reduce((a, b) => a * b, 1);
  return tf.tensor(rng.fillNormal(size, 0, 1), shape, 'float32');
}

/** Runs f with the fused kernels on or off, restoring the setting afterwards. */
function withFused<T>(on: boolean, f: () => T): T {
  const prev = setFusedKernels(on);
  try {
    return f();
  } finally {
    setFusedKernels(prev);
  }
}

/** Value and gradients of sum(f(...) * w) as plain arrays (see valueAndGrads). */
function valueAndGradsF(f: (...xs: tf.Tensor[]) => tf.Tensor, xs: tf.Tensor[]): Float32Array[] {
  return tf.tidy(() => {
    const y = f(...xs);
    const w = rand(y.shape, 99);
    const g = tf.grads((...a: tf.Tensor[]) => tf.sum(tf.mul(f(...a), w)))(xs);
    return [y, ...g].map((t) => t.dataSync() as Float32Array);
  });
}

/** Largest |a - b| / (1 + |b|) over matching arrays. */
function maxRelDiff(a: Float32Array[], b: Float32Array[]): number {
  expect(a.map((x) => x.length)).toEqual(b.map((x) => x.length));
  let m = 0;
  a.forEach((x, i) =>
    x.forEach((v, j) => (m = Math.max(m, Math.abs(v - b[i]![j]!) / (1 + Math.abs(b[i]![j]!))))),
  );
  return m;
}

function bits(t: tf.Tensor): number[] {
  return Array.from(new Uint32Array(new Float32Array(t.dataSync()).buffer));
}

/** Value and gradients (w.r.t. every input) of sum(f(...) * w) with a fixed random weighting. */
function valueAndGrads(f: (...xs: tf.Tensor[]) => tf.Tensor, xs: tf.Tensor[]): number[][] {
  return tf.tidy(() => {
    const y = f(...xs);
    const w = rand(y.shape, 99);
    const g = tf.grads((...a: tf.Tensor[]) => tf.sum(tf.mul(f(...a), w)))(xs);
    return [bits(y), ...g.map(bits)];
  });
}

describe('lean paths give the same numbers as the plain formulations', () => {
  it('linear (rank 2, 3 and 4, with and without bias) matches reshape + matMul + add', () => {
    const plain = (x: tf.Tensor, w: tf.Tensor, b?: tf.Tensor): tf.Tensor => {
      const lead = x.shape.slice(0, -1);
      let y = tf.matMul(tf.reshape(x, [-1, w.shape[1]!]), w, false, true);
      if (b) y = tf.add(y, b);
      return tf.reshape(y, [...lead, w.shape[0]!]);
    };
    const w = rand([5, 6], 1);
    const b = rand([5], 2);
    for (const shape of [
      [3, 6],
      [2, 3, 6],
      [2, 2, 3, 6],
    ]) {
      const x = rand(shape, 3);
      expect(valueAndGrads((xx, ww, bb) => linear(xx!, ww!, bb!), [x, w, b])).toEqual(
        valueAndGrads((xx, ww, bb) => plain(xx!, ww!, bb!), [x, w, b]),
      );
      expect(valueAndGrads((xx, ww) => linear(xx!, ww!), [x, w])).toEqual(
        valueAndGrads((xx, ww) => plain(xx!, ww!), [x, w]),
      );
      x.dispose();
    }
    tf.dispose([w, b]);
  });

  it('gelu matches x * 0.5 * (1 + erf(x / sqrt 2)) through the tape', () => {
    const x = rand([2, 3, 8], 4);
    const plain = (t: tf.Tensor): tf.Tensor =>
      tf.mul(tf.mul(t, 0.5), tf.add(1, tf.erf(tf.mul(t, Math.SQRT1_2))));
    withFused(false, () =>
      expect(valueAndGrads((t) => gelu(t!), [x])).toEqual(valueAndGrads((t) => plain(t!), [x])),
    );
    x.dispose();
  });

  it('LayerNorm matches tf.moments-based standardization, gradients included', () => {
    const ln = new LayerNorm(8);
    const x = rand([2, 3, 8], 5);
    const plain = (t: tf.Tensor): tf.Tensor => {
      const { mean, variance } = tf.moments(t, -1, true);
      return tf.mul(tf.mul(tf.sub(t, mean), tf.rsqrt(tf.add(variance, 1e-5))), ln.gamma);
    };
    // x also feeds a second consumer, as the residual stream does
    const wrap = (f: (t: tf.Tensor) => tf.Tensor) => (t: tf.Tensor) => tf.add(f(t), tf.mul(t, 0.3));
    withFused(false, () =>
      expect(valueAndGrads((t) => wrap((u) => ln.forward(u))(t!), [x])).toEqual(
        valueAndGrads((t) => wrap(plain)(t!), [x]),
      ),
    );
    tf.dispose([x]);
    ln.dispose();
  });

  it('rotary tables match applyRotaryPosEmb for queries and keys, full and partial rotation', () => {
    for (const [rotDim, width] of [
      [8, 8],
      [4, 8],
    ] as const) {
      const rotary = new RotaryEmbedding(rotDim);
      const nk = 5;
      const nq = 2;
      const pos = tf.range(0, nk, 1, 'int32');
      const input = rotary.forward(pos);
      const prepared = prepareRotary(input, nq, width);
      expect(prepared.tables).toBeDefined();
      const k = rand([2, 3, nk, width], 6);
      const q = rand([2, 3, nq, width], 7);
      for (const t of [q, k]) {
        const plain = valueAndGrads((u) => applyRotaryPosEmb(u!, input.freqs), [t]);
        for (const fused of [false, true])
          withFused(fused, () =>
            expect(valueAndGrads((u) => applyRotaryTables(u!, prepared.tables!)!, [t])).toEqual(plain),
          );
      }
      // shapes the tables do not cover fall back
      const other = rand([2, 3, 3, width], 8);
      expect(applyRotaryTables(other, prepared.tables!)).toBeNull();
      const t = prepared.tables!;
      tf.dispose([pos, input.freqs, t.cos, t.sin, t.cosQ, t.sinQ, t.swap, k, q, other]);
      rotary.dispose();
    }
  });

  it('prepareRotary leaves xpos inputs alone', () => {
    const rotary = new RotaryEmbedding(8, { useXpos: true });
    const pos = tf.range(0, 4, 1, 'int32');
    const input = rotary.forward(pos);
    expect(prepareRotary(input, 1, 8)).toBe(input);
    tf.dispose([pos, input.freqs, input.xposScale!]);
    rotary.dispose();
  });
});

describe('fused kernels', () => {
  const names = [XT_LAYER_NORM, XT_LAYER_NORM_GRAD, XT_GELU, XT_GELU_GRAD, XT_ROTARY];

  it('are registered by the torch backend (and by no other)', () => {
    const expected = tf.getBackend() === 'torch';
    for (const n of names) expect([n, backendHasKernel(n)]).toEqual([n, expected]);
    withFused(false, () => {
      for (const n of names) expect(backendHasKernel(n)).toBe(false);
    });
  });

  // independent references: the formulas written out with plain ops, differentiated by TF.js's tape
  const plainLayerNorm = (t: tf.Tensor, g: tf.Tensor, offset: number): tf.Tensor => {
    const { mean, variance } = tf.moments(t, -1, true);
    return tf.mul(tf.mul(tf.sub(t, mean), tf.rsqrt(tf.add(variance, 1e-5))), tf.add(g, offset));
  };
  const plainGelu = (t: tf.Tensor): tf.Tensor =>
    tf.mul(tf.mul(t, 0.5), tf.add(1, tf.erf(tf.div(t, Math.SQRT2))));

  it('LayerNorm (plain and unit offset), fused or not, equals its formula to float32 rounding, gradients included', () => {
    for (const unitOffset of [false, true]) {
      const ln = new LayerNorm(32, { unitOffset });
      ln.gamma.assign(rand([32], 11));
      for (const shape of [
        [5, 32],
        [2, 7, 32],
      ]) {
        const x = tf.tidy(() => tf.add(tf.mul(rand(shape, 12), 3), 1.5));
        const f = (t: tf.Tensor, g: tf.Tensor): tf.Tensor => {
          // gamma as an input so that its gradient is checked too
          const saved = ln.gamma;
          (ln as unknown as { gamma: tf.Tensor }).gamma = g;
          try {
            return ln.forward(t);
          } finally {
            (ln as unknown as { gamma: tf.Tensor }).gamma = saved;
          }
        };
        const ref = valueAndGradsF((t, g) => plainLayerNorm(t!, g!, unitOffset ? 1 : 0), [x, ln.gamma]);
        for (const fused of [false, true]) {
          const got = withFused(fused, () => valueAndGradsF((t, g) => f(t!, g!), [x, ln.gamma]));
          expect(maxRelDiff(got, ref), `fused ${fused}`).toBeLessThan(1e-5);
        }
        x.dispose();
      }
      ln.dispose();
    }
  });

  it('GELU, fused or not, equals 0.5 x (1 + erf(x / sqrt 2)) to float32 rounding, gradient included', () => {
    const x = tf.tidy(() => tf.mul(rand([3, 4, 64], 13), 4));
    const ref = valueAndGradsF((t) => plainGelu(t!), [x]);
    for (const fused of [false, true]) {
      const got = withFused(fused, () => valueAndGradsF((t) => gelu(t!), [x]));
      expect(maxRelDiff(got, ref), `fused ${fused}`).toBeLessThan(1e-5);
    }
    x.dispose();
  });

  it('the ordinary-op backward passes of LayerNorm and GELU match the tape of their forward formulas', () => {
    const x = tf.tidy(() => tf.add(rand([4, 16], 14), 0.5));
    const dy = rand([4, 16], 15);
    const gamma = rand([16], 16);
    for (const offset of [0, 1]) {
      const [dx, dg] = layerNormBackward(dy, x, gamma, 1e-5, offset);
      const plain = (t: tf.Tensor, g: tf.Tensor): tf.Tensor => {
        const { mean, variance } = tf.moments(t, -1, true);
        return tf.mul(tf.mul(tf.sub(t, mean), tf.rsqrt(tf.add(variance, 1e-5))), tf.add(g, offset));
      };
      const [rx, rg] = tf.grads((t: tf.Tensor, g: tf.Tensor) => tf.sum(tf.mul(plain(t, g), dy)))([x, gamma]);
      expect(
        maxRelDiff(
          [dx!.dataSync() as Float32Array, dg!.dataSync() as Float32Array],
          [rx!.dataSync() as Float32Array, rg!.dataSync() as Float32Array],
        ),
      ).toBeLessThan(1e-5);
      tf.dispose([dx!, dg!, rx!, rg!]);
    }
    const gx = geluBackward(dy, x);
    const rgx = tf.grad((t: tf.Tensor) =>
      tf.sum(tf.mul(tf.mul(tf.mul(t, 0.5), tf.add(1, tf.erf(tf.mul(t, Math.SQRT1_2)))), dy)),
    )(x);
    expect(maxRelDiff([gx.dataSync() as Float32Array], [rgx.dataSync() as Float32Array])).toBeLessThan(1e-5);
    tf.dispose([x, dy, gamma, gx, rgx]);
  });
});
