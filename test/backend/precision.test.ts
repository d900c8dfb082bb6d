import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { describe, expect, it } from 'vitest';
import { useTorchBackend } from './use-torch.js';
import { checkPrecision, withPrecision } from '../../src/backend/precision.js';
import { loadAddon } from '../../src/backend/torch/native.js';
import type { TorchBackend } from '../../src/backend/torch/backend.js';
import { attend } from '../../src/attention/attend.js';
import { AutoregressiveWrapper } from '../../src/generation/autoregressive-wrapper.js';
import { Decoder } from '../../src/layers/attention-layers.js';
import { LayersCache } from '../../src/layers/cache.js';
import { AdamW } from '../../src/train/optimizer.js';
import { Trainer } from '../../src/train/trainer.js';
import { Rng, manualSeed } from '../../src/utils/random.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';

// Mixed precision (bf16) on the torch backend's CPU kernels; CUDA runs the same kernels.

useTorchBackend();

/** float32 -> the nearest bfloat16 (ties to even), as a float32 value */
function bf16(x: number): number {
  const f = new Float32Array([x]);
  const u = new Uint32Array(f.buffer);
  const lsb = (u[0]! >>> 16) & 1;
  u[0] = ((u[0]! + 0x7fff + lsb) >>> 16) << 16;
  return f[0]!;
}

const isBf16 = (x: number): boolean => (new Uint32Array(new Float32Array([x]).buffer)[0]! & 0xffff) === 0;

function randomMatrix(rows: number, cols: number, rng: Rng): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let i = 0; i < out.length; i++) out[i] = rng.random() * 4 - 2;
  return out;
}

describe('bf16 precision on the torch backend', () => {
  it('matrix products take bfloat16 operands, accumulate in float32 and return float32', () => {
    const rng = new Rng(5);
    const [m, k, n] = [12, 96, 20];
    const a = randomMatrix(m, k, rng);
    const b = randomMatrix(k, n, rng);
    const ta = tf.tensor2d(a, [m, k]);
    const tb = tf.tensor2d(b, [k, n]);
    const low = withPrecision('bf16', () => tf.matMul(ta, tb));
    const full = tf.matMul(ta, tb);
    expect(low.dtype).toBe('float32');
    const lo = low.dataSync();
    const hi = full.dataSync();
    let differs = 0;
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let exact = 0;
        let mag = 0;
        for (let p = 0; p < k; p++) {
          exact += bf16(a[i * k + p]!) * bf16(b[p * n + j]!);
          mag += Math.abs(a[i * k + p]! * b[p * n + j]!);
        }
        const got = lo[i * n + j]!;
        // the result is a bfloat16 value: the exact product of the rounded operands, rounded once
        // (half a bfloat16 step), plus float32 accumulation (k steps of 2^-24 of the magnitudes)
        expect(isBf16(got)).toBe(true);
        expect(Math.abs(got - exact)).toBeLessThanOrEqual(Math.abs(exact) * 2 ** -8 + mag * k * 2 ** -24);
        if (got !== hi[i * n + j]) differs++;
      }
    }
    // the float32 product is not what bf16 gives
    expect(differs).toBeGreaterThan((m * n) / 2);
    tf.dispose([ta, tb, low, full]);
  });

  it('keeps results in bfloat16 between products, as autocast does, and float32 where an op needs it', () => {
    const N = loadAddon();
    const rng = new Rng(8);
    const [m, k, n] = [64, 48, 40];
    const a = tf.tensor2d(randomMatrix(m, k, rng), [m, k]);
    const b = tf.tensor2d(randomMatrix(k, n, rng), [k, n]);
    const c = tf.tensor2d(randomMatrix(m, n, rng), [m, n]);
    const before = N.bytes();
    const p = withPrecision('bf16', () => tf.matMul(a, b));
    // the product's storage is bfloat16: two bytes a value (TF.js still sees float32)
    expect(p.dtype).toBe('float32');
    expect(N.bytes() - before).toBe(m * n * 2);
    const pv = p.dataSync();
    const ops = withPrecision('bf16', () => ({
      // bfloat16 times bfloat16 gives bfloat16: each square rounded to 8 significant bits
      square: tf.mul(p, p),
      // with a float32 operand, float32 (type promotion)
      plusFull: tf.add(p, c),
      // a shape op keeps the storage
      reshaped: tf.reshape(p, [n, m]),
      // reductions and normalisation read float32
      softmax: tf.softmax(p),
    }));
    const cv = c.dataSync();
    const sq = ops.square.dataSync();
    const pf = ops.plusFull.dataSync();
    let exactSquares = 0;
    for (let i = 0; i < m * n; i++) {
      expect(isBf16(sq[i]!)).toBe(true);
      expect(sq[i]).toBe(bf16(pv[i]! * pv[i]!));
      if (pv[i]! * pv[i]! === sq[i]) exactSquares++;
      expect(pf[i]).toBe(Math.fround(pv[i]! + cv[i]!));
    }
    // the exact squares of bfloat16 values need 16 bits: most are not bfloat16 values
    expect(exactSquares).toBeLessThan((m * n) / 2);
    expect(Array.from(ops.reshaped.dataSync())).toEqual(Array.from(pv));
    const sm = ops.softmax.dataSync();
    expect(Array.from(sm).filter((x) => !isBf16(x)).length).toBeGreaterThan((m * n) / 2);
    // outside bf16 mode the same product is float32 (and not a bfloat16 value)
    const full = tf.matMul(a, b);
    expect(Array.from(full.dataSync()).filter((x) => !isBf16(x)).length).toBeGreaterThan((m * n) / 2);
    // a bfloat16 result read outside bf16 mode is read as float32
    const later = tf.mul(p, p);
    expect(Array.from(later.dataSync())).toEqual(Array.from(pv, (x) => Math.fround(x * x)));
    tf.dispose([a, b, c, p, full, later, ...Object.values(ops)]);
  });

  it('a variable made from a bfloat16 result takes AdamW updates as a float32 one does', () => {
    const rng = new Rng(9);
    const [m, k, n] = [16, 24, 32];
    const a = tf.tensor2d(randomMatrix(m, k, rng), [m, k]);
    const b = tf.tensor2d(randomMatrix(k, n, rng), [k, n]);
    const init = withPrecision('bf16', () => tf.matMul(a, b));
    const values = init.dataSync().slice();
    // the variable shares the product's bfloat16 storage; its twin holds the same values in float32
    const low = tf.variable(init);
    init.dispose();
    const full = tf.variable(tf.tensor2d(values, [m, n]));
    const g = tf.tensor2d(randomMatrix(m, n, rng), [m, n]);
    const optLow = new AdamW([['w', low]], { learningRate: 0.1, weightDecay: 0.01 });
    const optFull = new AdamW([['w', full]], { learningRate: 0.1, weightDecay: 0.01 });
    const step = (): void => {
      withPrecision('bf16', () => optLow.apply({ w: g }));
      optFull.apply({ w: g });
      expect(Array.from(low.dataSync())).toEqual(Array.from(full.dataSync()));
    };
    // the first step makes the optimizer's moments (and new parameter tensors)
    step();
    // then the variables take new values, one of them bfloat16 again, and the steps after update
    // them in place (the moments exist, JavaScript holds each parameter alone)
    const again = withPrecision('bf16', () => tf.mul(tf.matMul(a, b), 0.5));
    const againValues = again.dataSync().slice();
    low.assign(again);
    again.dispose();
    full.assign(tf.tensor2d(againValues, [m, n]));
    for (let s = 0; s < 2; s++) step();
    expect(Array.from(low.dataSync())).not.toEqual(Array.from(againValues));
    tf.dispose([a, b, low, full, g]);
    optLow.dispose();
    optFull.dispose();
  });

  it("decoding's kept bfloat16 copy of a weight follows the weight's in-place updates", () => {
    const rng = new Rng(21);
    const [n, k] = [64, 96];
    const init = tf.tensor2d(randomMatrix(n, k, rng), [n, k]);
    const w = tf.variable(init);
    // the variable alone holds its data: AdamW updates it in place, as it does model parameters
    init.dispose();
    const xv = randomMatrix(1, k, rng);
    const x = tf.tensor2d(xv, [1, k]);
    // one row times a weight's transpose, as a decoding step's projection
    const product = (): number[] => {
      const y = withPrecision('bf16', () => tf.matMul(x, w, false, true));
      const out = Array.from(y.dataSync());
      y.dispose();
      return out;
    };
    const expected = (wv: Float32Array): number[] =>
      Array.from({ length: n }, (_, j) => {
        let e = 0;
        for (let p = 0; p < k; p++) e += bf16(xv[p]!) * bf16(wv[j * k + p]!);
        return e;
      });
    const near = (got: number[], want: number[]): boolean =>
      got.every((g, j) => Math.abs(g - want[j]!) <= Math.abs(want[j]!) * 2 ** -8 + k * 4 * 2 ** -24 * 4);
    const opt = new AdamW([['w', w]], { learningRate: 0.5, weightDecay: 0 });
    const g = tf.tensor2d(randomMatrix(n, k, rng), [n, k]);
    // the first step makes the optimizer's moments; the later ones update in place
    opt.apply({ w: g });
    const id = (tf.backend() as TorchBackend).id(w);
    const before = product();
    expect(near(product(), expected(w.dataSync() as Float32Array))).toBe(true);
    opt.apply({ w: g });
    expect((tf.backend() as TorchBackend).id(w)).toBe(id);
    const after = product();
    expect(after).not.toEqual(before);
    expect(near(after, expected(w.dataSync() as Float32Array))).toBe(true);
    tf.dispose([w, x, g]);
    opt.dispose();
  });

  it('restores the previous precision after the call, also when it throws', () => {
    const N = loadAddon();
    expect(() =>
      withPrecision('bf16', () => {
        throw new Error('inside');
      }),
    ).toThrow('inside');
    expect(N.setPrecision('fp32')).toBe('fp32');
    const inner = withPrecision('bf16', () => withPrecision('fp32', () => N.setPrecision('fp32')));
    expect(inner).toBe('fp32');
    expect(N.setPrecision('fp32')).toBe('fp32');
  });

  it('rejects unknown precisions and bf16 on a backend without it', async () => {
    expect(() => checkPrecision('fp16')).toThrow('precision: expected one of fp32, bf16, got "fp16"');
    expect(() => checkPrecision(16, 'train.precision')).toThrow(
      'train.precision: expected one of fp32, bf16, got 16',
    );
    expect(() => loadAddon().setPrecision('half')).toThrow(/expected fp32 or bf16, got half/);
    await tf.setBackend('cpu');
    try {
      expect(() => checkPrecision('bf16')).toThrow(/bf16 needs the torch backend.*active backend is cpu/);
      expect(checkPrecision('fp32')).toBe('fp32');
    } finally {
      await tf.setBackend('torch');
    }
  });

  it('causal attention forward and gradients in bf16 stay within bfloat16 error of float32', () => {
    const shape = [2, 2, 80, 16];
    const inputs = (): tf.Tensor[] => [1, 2, 3].map((s) => tf.randomNormal(shape, 0, 1, 'float32', s));
    const dy = tf.randomNormal(shape, 0, 1, 'float32', 4);
    const run = (): tf.Tensor[] => {
      const [q, k, v] = inputs();
      const f = (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor): tf.Tensor => attend(a, b, c, { causal: true });
      return [f(q!, k!, v!), ...tf.grads(f)([q!, k!, v!], dy)];
    };
    const full = tf.tidy(run);
    const low = withPrecision('bf16', () => tf.tidy(run));
    for (let i = 0; i < full.length; i++) {
      const scale = tf.max(tf.abs(full[i]!)).dataSync()[0]!;
      const err = tf.max(tf.abs(tf.sub(full[i]!, low[i]!))).dataSync()[0]!;
      // bfloat16 keeps 8 significant bits: errors of a few 2^-8 of the largest value, never zero
      expect(err).toBeGreaterThan(0);
      expect(err).toBeLessThan(scale * 2 ** -4);
    }
    tf.dispose([...full, ...low, dy]);
  });

  it('a bf16 training run tracks the float32 loss curve', () => {
    const rng = new Rng(11);
    const V = 32;
    // a learnable stream: short random phrases repeated
    const phrases = Array.from({ length: 6 }, () => Array.from({ length: 7 }, () => rng.int(0, V)));
    const train = new Int32Array(6000);
    for (let i = 0; i < train.length;) for (const t of phrases[rng.int(0, phrases.length)]!) train[i++] = t;
    const curve = (precision: 'fp32' | 'bf16'): number[] => {
      manualSeed(3);
      const net = new TransformerWrapper({
        numTokens: V,
        maxSeqLen: 32,
        attnLayers: new Decoder({ dim: 32, depth: 2, heads: 2, attnDimHead: 16, rotaryPosEmb: true }),
      });
      const model = new AutoregressiveWrapper(net);
      const trainer = new Trainer(
        model,
        { train },
        { totalSteps: 40, batchSize: 8, seqLen: 24, learningRate: 3e-3, warmupSteps: 4, seed: 1, precision },
      );
      const losses: number[] = [];
      for (let s = 0; s < 40; s++) losses.push(trainer.step().loss);
      trainer.dispose();
      model.dispose();
      return losses;
    };
    const full = curve('fp32');
    const low = curve('bf16');
    expect(low).not.toEqual(full);
    // stated tolerance: every step's bf16 loss within 1% of the float32 loss (same data and init)
    for (let s = 0; s < full.length; s++) expect(Math.abs(low[s]! - full[s]!)).toBeLessThan(0.01 * full[s]!);
    expect(low.at(-1)!).toBeLessThan(0.6 * low[0]!);
  });

  it("cached bf16 steps read the cache's kept bfloat16 copy: the numbers of converting it whole, across branches", () => {
    manualSeed(6);
    const model = new TransformerWrapper({
      numTokens: 20,
      maxSeqLen: 64,
      attnLayers: new Decoder({ dim: 32, depth: 2, heads: 2, attnDimHead: 16, rotaryPosEmb: true }),
    });
    model.eval();
    const ids = (xs: number[]): tf.Tensor => tf.tensor2d([xs], [1, xs.length], 'int32');
    // the same cache in new tensors: no buffer of the addon's, so its keys and values are converted whole
    const copied = (c: LayersCache): LayersCache =>
      new LayersCache(
        c.kvs.map((kv) => ({ k: tf.clone(kv.k), v: tf.clone(kv.v) })),
        c.seqLen,
        c.selfAttn,
        c.rotary,
      );
    withPrecision('bf16', () =>
      tf.tidy(() => {
        const seq = [1, 5, 7, 3, 2, 9, 11, 4];
        let cache = model.forwardWithState(ids(seq), { returnCache: true }).cache!;
        let branchPoint: { seq: number[]; cache: LayersCache } | null = null;
        const step = (from: LayersCache, tokens: number[]): { logits: number[]; cache: LayersCache } => {
          const alone = copied(from);
          const fresh = model.forwardWithState(ids(tokens), { cache: alone, returnCache: true });
          const kept = model.forwardWithState(ids(tokens), { cache: from, returnCache: true });
          const logits = Array.from(kept.logits.dataSync());
          expect(logits).toEqual(Array.from(fresh.logits.dataSync()));
          // and what the whole sequence's pass (no cache, the composite ops) gives, within bfloat16 error
          const whole = model.forward(ids(tokens));
          const last = Array.from(tf.slice(whole, [0, tokens.length - 1, 0], [1, 1, -1]).dataSync());
          const scale = Math.max(...last.map(Math.abs));
          const err = Math.max(...last.map((x, i) => Math.abs(x - logits[i]!)));
          expect(err).toBeLessThan(scale * 2 ** -5);
          alone.dispose();
          fresh.cache!.dispose();
          return { logits, cache: kept.cache! };
        };
        for (let s = 0; s < 12; s++) {
          seq.push((s * 7 + 3) % 20);
          const next = step(cache, seq);
          if (cache !== branchPoint?.cache) cache.dispose();
          if (s === 5) branchPoint = { seq: [...seq], cache: next.cache };
          cache = next.cache;
        }
        // a second continuation of a cache the first one extended in place
        const branch = [...branchPoint!.seq];
        let other = branchPoint!.cache;
        for (let s = 0; s < 4; s++) {
          branch.push((s * 5 + 1) % 20);
          const next = step(other, branch);
          if (other !== branchPoint!.cache) other.dispose();
          other = next.cache;
        }
        for (const c of [cache, other, branchPoint!.cache]) c.dispose();
      }),
    );
    model.dispose();
  });

  it('generation takes a precision per call and leaves the setting as it was', async () => {
    manualSeed(4);
    const net = new TransformerWrapper({
      numTokens: 40,
      maxSeqLen: 64,
      attnLayers: new Decoder({ dim: 32, depth: 2, heads: 2, attnDimHead: 16, rotaryPosEmb: true }),
    });
    const model = new AutoregressiveWrapper(net);
    const out = await model.generate([[1, 2, 3, 4]], 12, { temperature: 0, precision: 'bf16' });
    expect(out.shape).toEqual([1, 12]);
    out.dispose();
    expect(loadAddon().setPrecision('fp32')).toBe('fp32');
    await expect(model.generate([[1, 2]], 4, { precision: 'fp8' as 'fp32' })).rejects.toThrow(
      'precision: expected one of fp32, bf16, got "fp8"',
    );
    model.dispose();
  });
});

describe('sampling where the probabilities live', () => {
  it('the tensor walk picks what the sequential walk picks', () => {
    const N = loadAddon();
    const backend = tf.backend() as TorchBackend;
    const rng = new Rng(9);
    const rows = 64;
    const v = 50;
    const p = new Float32Array(rows * v);
    for (let i = 0; i < rows; i++) {
      for (let j = 0; j < v; j++) {
        const r = rng.random();
        // zeros, negatives and NaN carry no mass; one row has none at all
        p[i * v + j] = i === 7 ? 0 : r < 0.3 ? 0 : r < 0.35 ? -r : r < 0.37 ? NaN : r;
      }
    }
    const probs = tf.tensor2d(p, [rows, v]);
    const draws = new Float64Array(rows);
    for (let i = 0; i < rows; i++) draws[i] = i === 3 ? 0 : i === 5 ? 1 - 2 ** -53 : rng.random();
    const id = backend.id(probs);
    const take = (tensorWalk: boolean): number[] => {
      const out = N.sampleRows(id, draws, tensorWalk);
      const values = Array.from(N.toData(out));
      N.free(out);
      return values;
    };
    const sequential = take(false);
    const tensor = take(true);
    expect(sequential[7]).toBe(-1);
    expect(tensor).toEqual(sequential);
    probs.dispose();
  });
});
