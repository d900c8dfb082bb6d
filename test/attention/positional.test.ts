import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { describe, expect, it } from 'vitest';
import { Attention } from '../../src/attention/attention.js';
import { AlibiPositionalBias, alibiSlopes } from '../../src/attention/alibi.js';
import { DynamicPositionBias } from '../../src/attention/dynamic-position-bias.js';
import { RelativePositionBias, relativePositionBucket } from '../../src/attention/relative-position-bias.js';
import { RotaryEmbedding, applyRotaryPosEmb } from '../../src/attention/rotary.js';
import type { AttentionForwardOptions, AttentionKv, PositionBias } from '../../src/attention/types.js';
import { manualSeed } from '../../src/utils/random.js';
import { expectClose, explicitAttention, randn } from './helpers.js';

function lastRows(t: tf.Tensor, i: number): tf.Tensor {
  const [h, n, j] = t.shape as [number, number, number];
  return tf.slice(t, [0, n - i, 0], [h, i, j]);
}

describe('positional modules', () => {
  it('construction and dispose leave no tensors behind', () => {
    const before = tf.memory().numTensors;
    new RotaryEmbedding(8, { useXpos: true, baseRescaleFactor: 2 }).dispose();
    new RelativePositionBias(2, { heads: 4 }).dispose();
    new DynamicPositionBias(8, { heads: 4, depth: 3, norm: true }).dispose();
    new AlibiPositionalBias(3, { totalHeads: 4 }).dispose();
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe('T5 relative position bias', () => {
  it('buckets: exact near, logarithmic far, direction-aware when bidirectional', () => {
    // causal: keys in the future all fall in bucket 0; the past counts exactly up to numBuckets / 2
    expect(relativePositionBucket(5, true, 32, 128)).toBe(0);
    for (let d = 0; d < 16; d++) expect(relativePositionBucket(-d, true, 32, 128)).toBe(d);
    expect(relativePositionBucket(-1000, true, 32, 128)).toBe(31);
    const far = [16, 20, 40, 80, 127].map((d) => relativePositionBucket(-d, true, 32, 128));
    expect([...far].sort((a, b) => a - b)).toEqual(far);
    // bidirectional: half of the buckets per direction
    expect(relativePositionBucket(-3, false, 32, 128)).toBe(3);
    expect(relativePositionBucket(3, false, 32, 128)).toBe(16 + 3);
    expect(relativePositionBucket(-1000, false, 32, 128)).toBe(15);
    expect(relativePositionBucket(1000, false, 32, 128)).toBe(31);
  });

  it('bias(i, j) is [heads, i, j], scaled, and its last rows equal a shorter query block', () => {
    manualSeed(1);
    const rp = new RelativePositionBias(2, { causal: true, heads: 3, numBuckets: 8, maxDistance: 16 });
    expect(rp.stateDict()['relative_attention_bias.weight']!.shape).toEqual([8, 3]);
    const full = rp.bias(6, 6);
    expect(full.shape).toEqual([3, 6, 6]);
    expectClose(rp.bias(2, 6), lastRows(full, 2), 0, 0);
    // entry [h, r, c] = 2 * weight[bucket(c - r), h]
    const w = rp.stateDict()['relative_attention_bias.weight']!.arraySync() as number[][];
    const f = full.arraySync() as number[][][];
    expect(f[1]![4]![1]).toBeCloseTo(2 * w[relativePositionBucket(1 - 4, true, 8, 16)]![1]!, 6);
    expect(() => rp.bias(3, 2)).toThrow(/^i: expected integers 0 < i <= j/);
    expect(() => new RelativePositionBias(1, { numBuckets: 64, maxDistance: 32 })).toThrow(/^numBuckets: /);
    rp.dispose();
  });
});

describe('ALiBi', () => {
  it('slopes follow the paper: geometric for powers of two, interleaved otherwise', () => {
    expect(alibiSlopes(8)).toEqual([1, 2, 3, 4, 5, 6, 7, 8].map((i) => 2 ** -i));
    expect(alibiSlopes(4)).toEqual([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]);
    expect(alibiSlopes(6)).toEqual([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]);
  });

  it('bias is -|distance| * slope, zero for heads beyond alibiNumHeads, symmetric, not persistent', () => {
    const al = new AlibiPositionalBias(2, { totalHeads: 4 });
    expect(Object.keys(al.stateDict())).toEqual([]);
    expect(al.namedBuffers().map(([n]) => n)).toEqual(['slopes']);
    const b = al.bias(4, 4);
    expect(b.shape).toEqual([4, 4, 4]);
    const a = b.arraySync() as number[][][];
    expect(a[0]![3]![0]).toBeCloseTo(-3 * 2 ** -4, 7);
    expect(a[1]![1]![3]).toBeCloseTo(-2 * 2 ** -8, 9);
    expect(a[0]![0]![3]).toBe(a[0]![3]![0]);
    expect(a[2]!.flat().every((v) => v === 0) && a[3]!.flat().every((v) => v === 0)).toBe(true);
    expectClose(al.bias(1, 4), lastRows(b, 1), 0, 0);
    const custom = al.biasFromPositions(tf.tensor1d([0, 1, 2, 3], 'int32'));
    expectClose(custom, b, 0, 0);
    const batched = al.biasFromPositions(tf.tensor2d([[0, 2, 4, 6]], [1, 4], 'int32'));
    expect(batched.shape).toEqual([1, 4, 4, 4]);
    expect((batched.arraySync() as number[][][][])[0]![0]![3]![0]).toBeCloseTo(-6 * 2 ** -4, 7);
    expect(() => new AlibiPositionalBias(4, { totalHeads: 2 })).toThrow(/^totalHeads: /);
    al.dispose();
  });
});

describe('dynamic position bias', () => {
  it('has the reference parameter names, with and without norm', () => {
    const plain = new DynamicPositionBias(8, { heads: 4, depth: 2 });
    expect(Object.fromEntries(Object.entries(plain.stateDict()).map(([k, v]) => [k, v.shape]))).toEqual({
      'mlp.0.0.weight': [8, 1],
      'mlp.0.0.bias': [8],
      'mlp.1.0.weight': [8, 8],
      'mlp.1.0.bias': [8],
      'mlp.2.weight': [4, 8],
      'mlp.2.bias': [4],
    });
    const normed = new DynamicPositionBias(8, { heads: 4, depth: 2, norm: true });
    expect(Object.keys(normed.stateDict())).toEqual([
      'mlp.0.0.weight',
      'mlp.0.0.bias',
      'mlp.0.1.gamma',
      'mlp.1.0.weight',
      'mlp.1.0.bias',
      'mlp.1.1.weight',
      'mlp.1.1.bias',
      'mlp.2.weight',
      'mlp.2.bias',
    ]);
    plain.dispose();
    normed.dispose();
  });

  it('depends on the distance only; a shorter query block gives the last rows', () => {
    manualSeed(2);
    for (const logDistance of [false, true]) {
      const dp = new DynamicPositionBias(8, { heads: 3, depth: 2, logDistance });
      const b = dp.bias(5, 5);
      expect(b.shape).toEqual([3, 5, 5]);
      const a = b.arraySync() as number[][][];
      expect(a[1]![3]![1]).toBeCloseTo(a[1]![4]![2]!, 6);
      expect(Math.abs(a[1]![3]![1]! - a[1]![1]![3]!)).toBeGreaterThan(1e-6);
      expectClose(dp.bias(2, 5), lastRows(b, 2), 1e-6, 0);
      dp.dispose();
    }
  });
});

describe('rotary embedding', () => {
  it('registers inv_freq (and xpos scale) as persistent buffers of the reference', () => {
    const r = new RotaryEmbedding(8);
    expect(Object.keys(r.stateDict())).toEqual(['inv_freq']);
    const inv = Array.from(r.stateDict()['inv_freq']!.dataSync());
    [0, 2, 4, 6].forEach((k, i) => expect(inv[i]).toBeCloseTo(1 / 10000 ** (k / 8), 7));
    const x = new RotaryEmbedding(8, { useXpos: true });
    expect(Object.keys(x.stateDict())).toEqual(['inv_freq', 'scale']);
    const scale = Array.from(x.stateDict()['scale']!.dataSync());
    expect(scale[1]).toBeCloseTo((2 + 0.4 * 8) / (1.4 * 8), 6);
    const rescaled = new RotaryEmbedding(8, { baseRescaleFactor: 2 });
    const base = 10000 * 2 ** (8 / 6);
    expect(rescaled.stateDict()['inv_freq']!.dataSync()[1]).toBeCloseTo(1 / base ** (2 / 8), 8);
    expect(() => new RotaryEmbedding(8, { interpolationFactor: 0.5 })).toThrow(/^interpolationFactor: /);
    [r, x, rescaled].forEach((m) => m.dispose());
  });

  it('rotated dot products depend only on the relative position (partial rotary keeps the rest)', () => {
    const r = new RotaryEmbedding(4, { interpolationFactor: 2 });
    const { freqs } = r.forwardFromSeqLen(10);
    expect(freqs.shape).toEqual([1, 10, 4]);
    const q = tf.tile(randn([1, 1, 1, 6], 1), [1, 1, 10, 1]);
    const k = tf.tile(randn([1, 1, 1, 6], 2), [1, 1, 10, 1]);
    const qr = applyRotaryPosEmb(q, freqs);
    const kr = applyRotaryPosEmb(k, freqs);
    const dots = tf.matMul(qr, kr, false, true).arraySync() as number[][][][];
    expect(dots[0]![0]![7]![4]).toBeCloseTo(dots[0]![0]![5]![2]!, 4);
    expect(Math.abs(dots[0]![0]![7]![4]! - dots[0]![0]![4]![7]!)).toBeGreaterThan(1e-4);
    // the last two features are not rotated
    expectClose(
      tf.slice(qr, [0, 0, 0, 4], [-1, -1, -1, 2]),
      tf.slice(q, [0, 0, 0, 4], [-1, -1, -1, 2]),
      0,
      0,
    );
    // interpolation halves the angle: position 2 with factor 2 = position 1 without
    const plain = new RotaryEmbedding(4);
    const f1 = plain.forward(tf.tensor1d([1], 'int32')).freqs;
    expectClose(tf.slice(freqs, [0, 2, 0], [1, 1, 4]), f1, 1e-6);
    r.dispose();
    plain.dispose();
  });

  it('xpos scale is centred on the middle position', () => {
    const r = new RotaryEmbedding(4, { useXpos: true, scaleBase: 8 });
    const { xposScale } = r.forward(tf.tensor1d([0, 1, 2, 3, 4], 'int32'));
    const s = xposScale!.arraySync() as number[][][];
    // max position 4 -> centre (4 + 1) // 2 = 2: scale there is 1
    expect(s[0]![2]![0]).toBeCloseTo(1, 7);
    const base = r.stateDict()['scale']!.dataSync()[0]!;
    expect(s[0]![4]![1]).toBeCloseTo(base ** (2 / 8), 6);
    r.dispose();
  });
});

/** Token-by-token cached decoding of x after a prefix; `extra(len)` gives the per-call options for len keys. */
function cachedRun(
  attn: Attention,
  x: tf.Tensor,
  prefix: number,
  extra: (len: number) => AttentionForwardOptions,
): tf.Tensor {
  const [b, n, d] = x.shape as [number, number, number];
  const first = attn.forward(tf.slice(x, [0, 0, 0], [b, prefix, d]), {
    ...extra(prefix),
    returnIntermediates: true,
  });
  let cache: AttentionKv = first.intermediates.cachedKv!;
  const outs = [first.out];
  for (let t = prefix; t < n; t++) {
    const step = attn.forward(tf.slice(x, [0, t, 0], [b, 1, d]), {
      ...extra(t + 1),
      cache,
      returnIntermediates: true,
    });
    cache = step.intermediates.cachedKv!;
    outs.push(step.out);
  }
  return tf.concat(outs, 1);
}

describe('cached decoding with positional schemes equals the uncached pass', () => {
  const heads = 4;
  const dimHead = 8;
  const schemes: [
    string,
    () => { opts: (len: number) => AttentionForwardOptions; module: { dispose(): void } },
  ][] = [
    [
      'rotary',
      () => {
        const r = new RotaryEmbedding(4);
        return { opts: (len) => ({ rotary: r.forwardFromSeqLen(len) }), module: r };
      },
    ],
    [
      'rotary xpos',
      () => {
        const r = new RotaryEmbedding(8, { useXpos: true, scaleBase: 4 });
        return { opts: (len) => ({ rotary: r.forwardFromSeqLen(len) }), module: r };
      },
    ],
    [
      'alibi',
      () => {
        const a = new AlibiPositionalBias(2, { totalHeads: heads });
        return { opts: () => ({ relPos: a as PositionBias }), module: a };
      },
    ],
    [
      'T5',
      () => {
        const rp = new RelativePositionBias(dimHead ** 0.5, {
          causal: true,
          heads,
          numBuckets: 8,
          maxDistance: 16,
        });
        return { opts: () => ({ relPos: rp as PositionBias }), module: rp };
      },
    ],
    [
      'dynamic',
      () => {
        const dp = new DynamicPositionBias(8, { heads, depth: 2, logDistance: true });
        return { opts: () => ({ relPos: dp as PositionBias }), module: dp };
      },
    ],
  ];
  for (const [name, make] of schemes) {
    for (const extraOpts of [{}, { kvHeads: 2, numMemKv: 2 }]) {
      // xpos scales queries by an amount centred on the current length, and the reference leaves
      // memory key/values unscaled: that combination depends on the length by design
      if (name === 'rotary xpos' && 'numMemKv' in extraOpts) continue;
      it(`${name} ${JSON.stringify(extraOpts)}`, () => {
        manualSeed(3);
        const attn = new Attention(16, { heads, dimHead, causal: true, ...extraOpts });
        const { opts, module } = make();
        const x = randn([2, 7, 16], 4);
        const before = tf.memory().numTensors;
        tf.tidy(() => {
          const full = attn.forward(x, opts(7)).out;
          expectClose(cachedRun(attn, x, 3, opts), full, 1e-5, 1e-4);
        });
        expect(tf.memory().numTensors).toBe(before);
        attn.dispose();
        module.dispose();
      });
    }
  }

  it('alibi, flash (composite fused path) and not, equals the attention written out with the bias, cached too', () => {
    manualSeed(5);
    const a = new Attention(16, { heads, dimHead, causal: true });
    const f = new Attention(16, { heads, dimHead, causal: true, flash: true });
    f.loadStateDict(a.stateDict());
    const al = new AlibiPositionalBias(heads);
    const x = randn([1, 6, 16], 6);
    const mask = tf.tensor2d([[false, true, true, true, true, true]]);
    // ALiBi: -|i - j| * slope of the head
    const slopes = alibiSlopes(heads);
    const bias = tf.tensor4d(
      Array.from({ length: heads * 36 }, (_, k) => {
        const [hh, i, j] = [Math.floor(k / 36), Math.floor(k / 6) % 6, k % 6];
        return -Math.abs(i - j) * slopes[hh]!;
      }),
      [1, heads, 6, 6],
    );
    const want = explicitAttention(a.stateDict(), x, mask, heads, heads, dimHead, bias);
    expectClose(f.forward(x, { relPos: al, mask }).out, want, 1e-6, 1e-5);
    expectClose(a.forward(x, { relPos: al, mask }).out, want, 1e-6, 1e-5);
    const wantAll = explicitAttention(a.stateDict(), x, tf.ones([1, 6], 'bool'), heads, heads, dimHead, bias);
    expectClose(
      cachedRun(f, x, 2, () => ({ relPos: al })),
      wantAll,
    );
    [a, f, al].forEach((m) => m.dispose());
  });
});
