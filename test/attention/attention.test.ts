import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { describe, expect, it } from 'vitest';
import { Attention } from '../../src/attention/attention.js';
import { attentionDefaults, type AttentionKv, type AttentionOptions } from '../../src/attention/types.js';
import { manualSeed } from '../../src/utils/random.js';
import { expectClose, randn } from './helpers.js';

function shapes(attn: Attention): Record<string, number[]> {
  return Object.fromEntries(Object.entries(attn.stateDict()).map(([k, v]) => [k, v.shape]));
}

function maxAbs(t: tf.Tensor): number {
  return tf.tidy(() => tf.max(tf.abs(t)).dataSync()[0]!);
}

describe('Attention parameters', () => {
  it('maps [b, n, dim] to [b, n, dim] with the reference parameter names and shapes', () => {
    manualSeed(1);
    const attn = new Attention(16, { heads: 2, dimHead: 4 });
    expect(shapes(attn)).toEqual({
      'to_q.weight': [8, 16],
      'to_k.weight': [8, 16],
      'to_v.weight': [8, 16],
      'to_out.weight': [16, 8],
    });
    const x = randn([2, 5, 16], 2);
    const { out, intermediates } = attn.forward(x);
    expect(out.shape).toEqual([2, 5, 16]);
    expect(intermediates).toEqual({});
    tf.dispose([x, out]);
    attn.dispose();
  });

  it('names and shapes every optional parameter as the reference', () => {
    const attn = new Attention(12, {
      heads: 4,
      dimHead: 6,
      kvHeads: 2,
      valueDimHead: 5,
      dimOut: 10,
      gateValues: true,
      gateValueHeads: true,
      qkNorm: true,
      qkNormDimScale: true,
      preTalkingHeads: true,
      postTalkingHeads: true,
      preScalePostTalkingHeads: true,
      headScale: true,
      numMemKv: 3,
      onAttn: true,
    });
    expect(shapes(attn)).toEqual({
      qk_norm_q_scale: [4, 1, 6],
      qk_norm_k_scale: [2, 1, 6],
      head_scale_params: [1, 4, 1, 1],
      mem_k: [2, 3, 6],
      mem_v: [2, 3, 5],
      'to_q.weight': [24, 12],
      'to_k.weight': [12, 12],
      'to_v.weight': [10, 12],
      'to_v_gate.weight': [20, 12],
      'to_v_gate.bias': [20],
      'to_v_head_gate.weight': [4, 12],
      'to_v_head_gate.bias': [4],
      'attend.pre_softmax_talking_heads.weight': [4, 4, 1, 1],
      'attend.post_softmax_talking_heads.weight': [4, 4, 1, 1],
      'attend.pre_scale_post_talking_heads.weight': [4, 4, 1, 1],
      'to_out.0.weight': [20, 20],
    });
    // reference initialisation: gates weight 0 / bias 10, talking heads identity, scales 1
    const sd = attn.stateDict();
    expect(maxAbs(sd['to_v_gate.weight']!)).toBe(0);
    expect(Array.from(sd['to_v_gate.bias']!.dataSync()).every((v) => v === 10)).toBe(true);
    expect(Array.from(sd['attend.pre_softmax_talking_heads.weight']!.dataSync())).toEqual(
      Array.from(tf.eye(4).dataSync()),
    );
    expect(Array.from(sd['qk_norm_q_scale']!.dataSync()).every((v) => v === 1)).toBe(true);
    const x = randn([2, 3, 12], 3);
    const { out } = attn.forward(x);
    expect(out.shape).toEqual([2, 3, 10]);
    tf.dispose([x, out]);
    attn.dispose();
  });

  it('draws weights from the seeded generator: uniform within 1/sqrt(fan_in), same seed same weights', () => {
    manualSeed(42);
    const a = new Attention(16, { heads: 2, dimHead: 8, numMemKv: 2 });
    manualSeed(42);
    const b = new Attention(16, { heads: 2, dimHead: 8, numMemKv: 2 });
    manualSeed(43);
    const c = new Attention(16, { heads: 2, dimHead: 8, numMemKv: 2 });
    const sa = a.stateDict();
    const sb = b.stateDict();
    const sc = c.stateDict();
    for (const k of Object.keys(sa))
      expect(Array.from(sa[k]!.dataSync())).toEqual(Array.from(sb[k]!.dataSync()));
    expect(Array.from(sa['to_q.weight']!.dataSync())).not.toEqual(Array.from(sc['to_q.weight']!.dataSync()));
    expect(maxAbs(sa['to_q.weight']!)).toBeLessThanOrEqual(1 / Math.sqrt(16));
    expect(maxAbs(sa['to_out.weight']!)).toBeLessThanOrEqual(1 / Math.sqrt(16));
    expect(maxAbs(sa['to_out.weight']!)).toBeGreaterThan(0.5 / Math.sqrt(16));
    // mem_k is standard normal
    expect(maxAbs(sa['mem_k']!)).toBeGreaterThan(0.5);
    [a, b, c].forEach((m) => m.dispose());
  });

  it('zeroInitOutput zeroes to_out', () => {
    const attn = new Attention(8, { heads: 2, dimHead: 4, zeroInitOutput: true });
    expect(maxAbs(attn.stateDict()['to_out.weight']!)).toBe(0);
    attn.dispose();
  });

  it('exports the reference defaults', () => {
    expect(attentionDefaults.dimHead).toBe(64);
    expect(attentionDefaults.heads).toBe(8);
    expect(attentionDefaults.qkNormScale).toBe(10);
    expect(attentionDefaults.logitSoftclampValue).toBe(50);
    expect(attentionDefaults.numMemKv).toBe(0);
  });
});

describe('Attention option and input errors', () => {
  const bad: [Partial<AttentionOptions>, RegExp][] = [
    [{ heads: 0 }, /^heads: expected a positive integer, got 0/],
    [{ dimHead: 2.5 }, /^dimHead: expected a positive integer/],
    [{ kvHeads: 3, heads: 4 }, /^kvHeads: expected a divisor of heads \(4\), got 3/],
    [{ kvHeads: 2, oneKvHead: true }, /^kvHeads: /],
    [{ qkNorm: true, dimHead: 8, qkNormGroups: 3 }, /^qkNormGroups: expected a divisor/],
    [{ qkNorm: true, dimHead: 8, qkNormGroups: 4 }, /^qkNormGroups: expected dimHead \/ qkNormGroups > 2/],
    [{ flash: true, preTalkingHeads: true }, /^flash: expected false with talking heads .*, got true$/],
    [{ flash: true, postTalkingHeads: true }, /^flash: expected false with talking heads .*, got true$/],
    [{ flash: true, sparseTopk: 2 }, /^flash: expected false with sparseTopk attention/],
    [{ flash: true, hard: true }, /^flash: expected false with hard attention/],
    [{ flash: true, sigmoid: true }, /^flash: expected false with sigmoid attention/],
    [{ hard: true, sparseTopk: 2 }, /at most one of sigmoid, hard, l2Distance, sparseTopk/],
    [{ sparseTopk: 0 }, /^sparseTopk: expected a positive integer, got 0/],
    [{ dropout: 1.5 }, /^dropout: expected a number in \[0, 1\), got 1.5/],
    [{ numMemKv: -1 }, /^numMemKv: expected a non-negative integer, got -1/],
    [{ causal: 'yes' as unknown as boolean }, /^causal: expected a boolean, got "yes"/],
    [
      { foo: 1 } as unknown as Partial<AttentionOptions>,
      /^foo: expected an option of Attention, got an unknown option$/,
    ],
  ];
  for (const [opts, re] of bad) {
    it(`rejects ${JSON.stringify(opts)}`, () => {
      expect(() => new Attention(8, { heads: 2, dimHead: 4, ...opts })).toThrow(re);
    });
  }

  it('rejects bad inputs, naming the argument', () => {
    const attn = new Attention(8, { heads: 2, dimHead: 4, causal: true });
    const x = randn([2, 3, 8], 1);
    const before = tf.memory().numTensors;
    expect(() => attn.forward(tf.zeros([3, 8]))).toThrow(/^x: expected \[batch, seq, 8\], got \[3, 8\]/);
    expect(() => attn.forward(tf.zeros([2, 3, 7]))).toThrow(/^x: /);
    expect(() => attn.forward(x, { mask: tf.ones([2, 4], 'bool') })).toThrow(
      /^mask: expected \[2, 3\], got \[2, 4\]/,
    );
    expect(() => attn.forward(x, { mask: tf.ones([2, 3]) })).toThrow(
      /^mask: expected dtype bool, got float32/,
    );
    expect(() => attn.forward(x, { context: tf.zeros([2, 5, 6]) })).toThrow(
      /^context: expected \[2, len, 8\]/,
    );
    expect(() => attn.forward(x, { attnMask: tf.ones([3, 5], 'bool') })).toThrow(
      /^attnMask: expected \[3, 3\]/,
    );
    expect(() => attn.forward(x, { prevAttn: tf.zeros([2, 2, 3, 4]) })).toThrow(
      /^prevAttn: expected \[2, 2, 3, 3\]/,
    );
    expect(() =>
      attn.forward(x, { cache: { k: tf.zeros([2, 2, 1, 5]), v: tf.zeros([2, 2, 1, 4]) } }),
    ).toThrow(/^cache.k: expected \[2, 2, t, 4\]/);
    expect(() => attn.forward(x, { mem: tf.zeros([2, 2, 8]), memMask: tf.ones([2, 3], 'bool') })).toThrow(
      /^memMask: expected \[2, 2\]/,
    );
    expect(() => attn.forward(x, { contextMask: tf.ones([2, 4], 'bool') })).toThrow(
      /^contextMask: expected \[2, 3\]/,
    );
    expect(() => attn.forward(x, { rotary: { freqs: tf.zeros([2, 4]) } })).toThrow(
      /^rotary: expected frequencies for at least 3 positions/,
    );
    // the failed calls leave no intermediate tensors behind: exactly the 13 inputs this test made
    // (2 x, 2 mask, context, attnMask, prevAttn, cache k and v, mem and memMask, contextMask, freqs)
    const created = tf.memory().numTensors - before;
    expect(created).toBe(13);
    tf.dispose(x);
    attn.dispose();
  });

  it('rejects residual attention on the fused path', () => {
    const attn = new Attention(8, { heads: 2, dimHead: 4, flash: true });
    const x = randn([1, 3, 8], 1);
    expect(() => attn.forward(x, { prevAttn: tf.zeros([1, 2, 3, 3]) })).toThrow(
      /^prevAttn: residual attention/,
    );
    attn.dispose();
  });
});

describe('Attention behaviour', () => {
  it('causal attention ignores future tokens', () => {
    manualSeed(3);
    const attn = new Attention(8, { heads: 2, dimHead: 4, causal: true });
    const x = randn([1, 6, 8], 4);
    const x2 = tf.concat([tf.slice(x, [0, 0, 0], [1, 3, 8]), randn([1, 3, 8], 5)], 1);
    const a = attn.forward(x).out;
    const b = attn.forward(x2).out;
    expectClose(tf.slice(a, [0, 0, 0], [1, 3, 8]), tf.slice(b, [0, 0, 0], [1, 3, 8]));
    expect(maxAbs(tf.sub(a, b))).toBeGreaterThan(1e-3);
    attn.dispose();
  });

  it('masked keys are ignored, masked queries output zero', () => {
    manualSeed(4);
    const attn = new Attention(8, { heads: 2, dimHead: 4 });
    const x = randn([1, 4, 8], 5);
    const mask = tf.tensor2d([[true, true, true, false]]);
    const changed = tf.concat([tf.slice(x, [0, 0, 0], [1, 3, 8]), randn([1, 1, 8], 9)], 1);
    const a = attn.forward(x, { mask }).out;
    const b = attn.forward(changed, { mask }).out;
    expectClose(a, b);
    expect(maxAbs(tf.slice(a, [0, 3, 0], [1, 1, 8]))).toBe(0);
    attn.dispose();
  });

  it('cross-attends to a context of another width, honouring contextMask', () => {
    manualSeed(6);
    const attn = new Attention(8, { heads: 2, dimHead: 4, dimContext: 6 });
    const x = randn([2, 3, 8], 1);
    const ctx = randn([2, 5, 6], 2);
    const cmask = tf.tensor2d([
      [true, true, false, true, false],
      [true, true, true, true, true],
    ]);
    const ctx2 = tf.where(tf.expandDims(cmask, -1), ctx, randn([2, 5, 6], 3));
    const a = attn.forward(x, { context: ctx, contextMask: cmask }).out;
    const b = attn.forward(x, { context: ctx2, contextMask: cmask }).out;
    expect(a.shape).toEqual([2, 3, 8]);
    expectClose(a, b);
    attn.dispose();
  });

  it('residual attention adds prevAttn to the logits and returns the pre-softmax attention', () => {
    manualSeed(7);
    const attn = new Attention(8, { heads: 2, dimHead: 4, causal: true });
    const x = randn([1, 3, 8], 1);
    const first = attn.forward(x, { returnIntermediates: true });
    const pre = first.intermediates.preSoftmaxAttn!;
    expect(pre.shape).toEqual([1, 2, 3, 3]);
    expect(first.intermediates.postSoftmaxAttn!.shape).toEqual([1, 2, 3, 3]);
    const zero = attn.forward(x, { prevAttn: tf.zerosLike(pre) }).out;
    expectClose(zero, first.out);
    const second = attn.forward(x, { prevAttn: pre, returnIntermediates: true });
    // unmasked logits doubled
    const p2 = second.intermediates.preSoftmaxAttn!.arraySync() as number[][][][];
    const p1 = pre.arraySync() as number[][][][];
    expect(p2[0]![1]![2]![1]).toBeCloseTo(2 * p1[0]![1]![2]![1]!, 5);
    expect(maxAbs(tf.sub(second.out, first.out))).toBeGreaterThan(1e-4);
    attn.dispose();
  });

  it('sparseTopk keeps k keys per query; hard attention picks one', () => {
    manualSeed(8);
    const x = randn([1, 6, 8], 1);
    const sparse = new Attention(8, { heads: 2, dimHead: 4, sparseTopk: 2 });
    const post = sparse.forward(x, { returnIntermediates: true }).intermediates.postSoftmaxAttn!;
    const nonzero = tf.sum(tf.cast(tf.greater(post, 1e-30), 'int32'), -1);
    expect(Array.from(nonzero.dataSync()).every((v) => v === 2)).toBe(true);
    const hard = new Attention(8, { heads: 2, dimHead: 4, hard: true });
    const hp = hard.forward(x, { returnIntermediates: true }).intermediates.postSoftmaxAttn!;
    expectClose(tf.max(hp, -1), tf.ones([1, 2, 6]), 1e-6, 0);
    sparse.dispose();
    hard.dispose();
  });

  it('straight-through sparse top-k: sparse forward, dense softmax gradient', () => {
    manualSeed(9);
    const plain = new Attention(8, { heads: 2, dimHead: 4, sparseTopk: 2 });
    const st = new Attention(8, { heads: 2, dimHead: 4, sparseTopk: 2, sparseTopkStraightThrough: true });
    const dense = new Attention(8, { heads: 2, dimHead: 4 });
    st.loadStateDict(plain.stateDict());
    dense.loadStateDict(plain.stateDict());
    const x = randn([1, 5, 8], 2);
    const w = randn([1, 5, 8], 3);
    expectClose(st.forward(x).out, plain.forward(x).out, 1e-6);
    // the loss is linear in the output, so d loss / d attention is the same for all three; the query
    // weights' gradient then depends only on the softmax the gradient flows through
    const gradQ = (m: Attention): tf.Tensor => {
      const { value, grads } = tf.variableGrads(
        () => tf.sum(tf.mul(m.forward(x).out, w)) as tf.Scalar,
        [m.toQ.weight],
      );
      value.dispose();
      return grads[m.toQ.weight.name]!;
    };
    const gSt = gradQ(st);
    expectClose(gSt, gradQ(dense), 1e-6, 1e-4);
    expect(maxAbs(tf.sub(gSt, gradQ(plain)))).toBeGreaterThan(1e-4);
    [plain, st, dense].forEach((m) => m.dispose());
  });

  it('dropout acts only in train mode and follows the seed', () => {
    manualSeed(10);
    const attn = new Attention(8, { heads: 2, dimHead: 4, dropout: 0.5 });
    const x = randn([1, 6, 8], 1);
    attn.eval();
    const e1 = attn.forward(x).out;
    const e2 = attn.forward(x).out;
    expectClose(e1, e2, 0, 0);
    attn.train();
    manualSeed(11);
    const t1 = attn.forward(x).out;
    const t2 = attn.forward(x).out;
    manualSeed(11);
    const t1again = attn.forward(x).out;
    expect(maxAbs(tf.sub(t1, t2))).toBeGreaterThan(1e-4);
    expect(maxAbs(tf.sub(t1, e1))).toBeGreaterThan(1e-4);
    expectClose(t1, t1again, 0, 0);
    attn.dispose();
  });

  it('gates, head scale and on-attn change the output as configured', () => {
    manualSeed(12);
    const base = new Attention(8, { heads: 2, dimHead: 4 });
    const gated = new Attention(8, { heads: 2, dimHead: 4, gateValues: true, headScale: true });
    const sd = base.stateDict();
    const shared = Object.fromEntries(
      ['to_q.weight', 'to_k.weight', 'to_v.weight', 'to_out.weight'].map((k) => [k, sd[k]!]),
    );
    gated.loadStateDict(shared, { strict: false });
    const x = randn([1, 4, 8], 1);
    // gate = sigmoid(10) and head scale 1 at init
    expectClose(gated.forward(x).out, tf.mul(base.forward(x).out, 1 / (1 + Math.exp(-10))), 1e-6);
    base.dispose();
    gated.dispose();
  });
});

/** Runs x through attn token by token with a cache, after a prefix of `prefix` tokens. */
function cachedRun(
  attn: Attention,
  x: tf.Tensor,
  prefix: number,
  extra: (start: number, end: number) => Parameters<Attention['forward']>[1] = () => ({}),
): tf.Tensor {
  const [b, n, d] = x.shape as [number, number, number];
  const outs: tf.Tensor[] = [];
  const first = attn.forward(tf.slice(x, [0, 0, 0], [b, prefix, d]), {
    ...extra(0, prefix),
    returnIntermediates: true,
  });
  let cache: AttentionKv = first.intermediates.cachedKv!;
  outs.push(first.out);
  for (let t = prefix; t < n; t++) {
    const step = attn.forward(tf.slice(x, [0, t, 0], [b, 1, d]), {
      ...extra(0, t + 1),
      cache,
      returnIntermediates: true,
    });
    tf.dispose([cache.k, cache.v]);
    cache = step.intermediates.cachedKv!;
    outs.push(step.out);
  }
  tf.dispose([cache.k, cache.v]);
  return tf.concat(outs, 1);
}

describe('Attention key/value cache equals the uncached pass', () => {
  const configs: [string, Partial<AttentionOptions>][] = [
    ['plain', {}],
    ['grouped-query (kvHeads 2)', { kvHeads: 2 }],
    ['one kv head', { oneKvHead: true }],
    ['memory key/values', { numMemKv: 2 }],
    ['qk norm + dim scale + mem kv', { qkNorm: true, qkNormDimScale: true, numMemKv: 2 }],
    ['talking heads', { preTalkingHeads: true, postTalkingHeads: true }],
    ['flash', { flash: true }],
    ['value dim head', { valueDimHead: 6 }],
  ];
  for (const [name, opts] of configs) {
    it(name, () => {
      manualSeed(20);
      const attn = new Attention(8, { heads: 4, dimHead: 4, causal: true, ...opts });
      const x = randn([2, 6, 8], 21);
      const before = tf.memory().numTensors;
      tf.tidy(() => {
        const full = attn.forward(x).out;
        const cached = cachedRun(attn, x, 3);
        expectClose(cached, full);
      });
      expect(tf.memory().numTensors).toBe(before);
      attn.dispose();
    });
  }

  it('returns cached keys/values of shape [b, kvHeads, t, dimHead]', () => {
    const attn = new Attention(8, { heads: 4, dimHead: 4, kvHeads: 2, valueDimHead: 3, causal: true });
    const x = randn([2, 5, 8], 1);
    const { intermediates } = attn.forward(x, { returnIntermediates: true });
    expect(intermediates.cachedKv!.k.shape).toEqual([2, 2, 5, 4]);
    expect(intermediates.cachedKv!.v.shape).toEqual([2, 2, 5, 3]);
    attn.dispose();
  });

  it('with XL memories: cached keys exclude the memories, results equal', () => {
    manualSeed(22);
    const attn = new Attention(8, { heads: 2, dimHead: 4, causal: true });
    const x = randn([1, 5, 8], 1);
    const mem = randn([1, 3, 8], 2);
    // causal with memories: queries sit at key positions mem + t
    const full = attn.forward(x, { mem }).out;
    const first = attn.forward(tf.slice(x, [0, 0, 0], [1, 3, 8]), { mem, returnIntermediates: true });
    expect(first.intermediates.cachedKv!.k.shape).toEqual([1, 2, 3, 4]);
    const step = attn.forward(tf.slice(x, [0, 3, 0], [1, 2, 8]), {
      mem,
      cache: first.intermediates.cachedKv!,
    });
    expectClose(tf.concat([first.out, step.out], 1), full);
    attn.dispose();
  });

  it('cross-attention reuses cached context keys/values', () => {
    manualSeed(23);
    const attn = new Attention(8, { heads: 2, dimHead: 4, dimContext: 6 });
    const x = randn([1, 3, 8], 1);
    const ctx = randn([1, 4, 6], 2);
    const full = attn.forward(x, { context: ctx, returnIntermediates: true });
    const again = attn.forward(tf.slice(x, [0, 2, 0], [1, 1, 8]), {
      context: tf.slice(ctx, [0, 0, 0], [1, 0, 6]),
      cache: full.intermediates.cachedKv!,
    });
    expectClose(again.out, tf.slice(full.out, [0, 2, 0], [1, 1, 8]));
    attn.dispose();
  });
});

describe('Attention memory', () => {
  it('construction and dispose leave no tensors behind, whatever the options', () => {
    const before = tf.memory().numTensors;
    const all: Partial<AttentionOptions>[] = [
      { gateValues: true, gateValueHeads: true, zeroInitOutput: true, onAttn: true },
      { preTalkingHeads: true, postTalkingHeads: true, preScalePostTalkingHeads: true, headScale: true },
      { qkNorm: true, qkNormDimScale: true, numMemKv: 2, kvHeads: 2, learnedValueResidualMix: true },
      { causal: true, useCope: true, copeTalkingHeads: true, dataDependentAlibi: true },
      { causal: true, dataDependentAlibi: true, dataDependentAlibiPerRow: true },
    ];
    for (const opts of all) new Attention(8, { heads: 4, dimHead: 4, ...opts }).dispose();
    expect(tf.memory().numTensors).toBe(before);
  });

  it('leaves no tensors behind, inside and outside tf.tidy', () => {
    manualSeed(30);
    const attn = new Attention(8, {
      heads: 4,
      dimHead: 4,
      causal: true,
      kvHeads: 2,
      numMemKv: 2,
      qkNorm: true,
      preTalkingHeads: true,
      gateValues: true,
      sparseTopk: 3,
      sparseTopkStraightThrough: true,
    });
    const x = randn([2, 5, 8], 1);
    const before = tf.memory().numTensors;
    tf.tidy(() => {
      attn.forward(x, { returnIntermediates: true });
    });
    expect(tf.memory().numTensors).toBe(before);
    const r = attn.forward(x, { returnIntermediates: true });
    const inter = r.intermediates;
    tf.dispose([
      r.out,
      inter.preSoftmaxAttn!,
      inter.postSoftmaxAttn!,
      inter.qkSimilarities!,
      inter.cachedKv!.k,
      inter.cachedKv!.v,
      inter.values!,
    ]);
    expect(tf.memory().numTensors).toBe(before);
    const g = tf.grad((xx: tf.Tensor) => tf.sum(attn.forward(xx).out))(x);
    g.dispose();
    expect(tf.memory().numTensors).toBe(before);
    attn.dispose();
  });
});

describe('further reference options', () => {
  it('l2Distance: logits are -|q - k|^2 * scale, on the fused path too', () => {
    manualSeed(40);
    const a = new Attention(8, { heads: 2, dimHead: 4, l2Distance: true, causal: true });
    const f = new Attention(8, { heads: 2, dimHead: 4, l2Distance: true, causal: true, flash: true });
    f.loadStateDict(a.stateDict());
    const x = randn([1, 4, 8], 1);
    const r = a.forward(x, { returnIntermediates: true });
    const q = tf.transpose(tf.reshape(a.toQ.forward(x), [1, 4, 2, 4]), [0, 2, 1, 3]);
    const k = tf.transpose(tf.reshape(a.toK.forward(x), [1, 4, 2, 4]), [0, 2, 1, 3]);
    const d = tf.sum(tf.square(tf.sub(tf.expandDims(q, 3), tf.expandDims(k, 2))), -1);
    expectClose(r.intermediates.qkSimilarities!, tf.mul(tf.neg(d), 0.5), 1e-5, 1e-4);
    expectClose(f.forward(x).out, r.out, 1e-5, 1e-4);
    a.dispose();
    f.dispose();
  });

  it('selective attention: first query unchanged, later logits reduced, no cache', () => {
    manualSeed(41);
    const plain = new Attention(8, { heads: 2, dimHead: 4, causal: true });
    const sel = new Attention(8, { heads: 2, dimHead: 4, causal: true, selective: true });
    sel.loadStateDict(plain.stateDict());
    expect(sel.canCacheKv).toBe(false);
    expect(plain.canCacheKv).toBe(true);
    expect(() => new Attention(8, { heads: 2, dimHead: 4, selective: true })).toThrow(/^selective: /);
    const x = randn([1, 5, 8], 2);
    const p = plain.forward(x, { returnIntermediates: true }).intermediates.preSoftmaxAttn!;
    const s = sel.forward(x, { returnIntermediates: true }).intermediates.preSoftmaxAttn!;
    const diff = tf.sub(p, s); // the subtracted gate, >= 0
    expect(tf.min(diff).dataSync()[0]).toBeGreaterThanOrEqual(-1e-6);
    expect(maxAbs(tf.slice(diff, [0, 0, 0, 0], [1, 2, 1, 5]))).toBe(0);
    plain.dispose();
    sel.dispose();
  });

  it('laser attends over exp(values) and returns the log', () => {
    manualSeed(42);
    const a = new Attention(8, { heads: 2, dimHead: 4, laser: true });
    const x = randn([1, 3, 8], 3);
    const { out } = a.forward(x);
    expect(out.shape).toEqual([1, 3, 8]);
    expect(Number.isFinite(maxAbs(out))).toBe(true);
    a.dispose();
  });

  it('rotateNumHeads rotates only the last heads', () => {
    manualSeed(43);
    const all = new Attention(8, { heads: 2, dimHead: 4 });
    const some = new Attention(8, { heads: 2, dimHead: 4, rotateNumHeads: 1 });
    some.loadStateDict(all.stateDict());
    const freqs = tf.tile(tf.reshape(tf.range(0, 4, 1, 'float32'), [4, 1]), [1, 4]);
    const x = randn([1, 4, 8], 4);
    const none = all.forward(x, { returnIntermediates: true }).intermediates.qkSimilarities!;
    const part = some.forward(x, { rotary: { freqs }, returnIntermediates: true }).intermediates
      .qkSimilarities!;
    expectClose(tf.slice(part, [0, 0, 0, 0], [1, 1, 4, 4]), tf.slice(none, [0, 0, 0, 0], [1, 1, 4, 4]), 1e-6);
    expect(
      maxAbs(tf.sub(tf.slice(part, [0, 1, 0, 0], [1, 1, 4, 4]), tf.slice(none, [0, 1, 0, 0], [1, 1, 4, 4]))),
    ).toBeGreaterThan(1e-4);
    expect(() => new Attention(8, { heads: 2, dimHead: 4, rotateNumHeads: 3 })).toThrow(/^rotateNumHeads: /);
    all.dispose();
    some.dispose();
  });

  it('value residual: 0.5 mix by default, learned per head with to_value_residual_mix', () => {
    manualSeed(44);
    const a = new Attention(8, { heads: 2, dimHead: 4 });
    const learned = new Attention(8, { heads: 2, dimHead: 4, learnedValueResidualMix: true });
    expect(learned.stateDict()['to_value_residual_mix.0.weight']!.shape).toEqual([2, 8]);
    const x = randn([1, 3, 8], 5);
    const first = a.forward(x, { returnIntermediates: true });
    const values = first.intermediates.values!;
    expect(values.shape).toEqual([1, 2, 3, 4]);
    // mixing a layer's own values with themselves changes nothing
    expectClose(a.forward(x, { valueResidual: values }).out, first.out, 1e-6);
    const other = tf.zerosLike(values);
    // v -> (v + 0) / 2 halves the output (to_out is linear, attention rows sum to 1)
    expectClose(a.forward(x, { valueResidual: other }).out, tf.mul(first.out, 0.5), 1e-6);
    expect(() => a.forward(x, { valueResidual: tf.zeros([1, 2, 4, 4]) })).toThrow(
      /^valueResidual: expected \[1, 2, 3, 4\]/,
    );
    expect(learned.forward(x, { valueResidual: other }).out.shape).toEqual([1, 3, 8]);
    a.dispose();
    learned.dispose();
  });

  it('dataDependentAlibi takes its kwargs in either spelling and rejects others', () => {
    const a = new Attention(8, {
      heads: 2,
      dimHead: 4,
      dataDependentAlibi: true,
      dataDependentAlibiKwargs: { bias_init: 3 } as object,
    });
    expect(Array.from(a.stateDict()['data_dependent_alibi.to_forget_gates.0.bias']!.dataSync())).toEqual([
      3, 3, 3, 3,
    ]);
    expect(
      () =>
        new Attention(8, {
          heads: 2,
          dimHead: 4,
          dataDependentAlibi: true,
          dataDependentAlibiKwargs: { foo: 1 } as object,
        }),
    ).toThrow(/^dataDependentAlibiKwargs: expected \{biasInit\?: number, postLogScale\?: number\}/);
    const x = randn([1, 3, 8], 1);
    expect(() => a.forward(x, { mem: randn([1, 2, 8], 2) })).toThrow(
      /^dataDependentAlibi: expected plain self-attention/,
    );
    a.dispose();
  });

  it('customAttnFn replaces softmax', () => {
    manualSeed(46);
    const x = randn([1, 4, 8], 7);
    const custom = new Attention(8, {
      heads: 2,
      dimHead: 4,
      customAttnFn: (l) => tf.div(tf.exp(l), tf.sum(tf.exp(l), -1, true)),
    });
    const plain = new Attention(8, { heads: 2, dimHead: 4 });
    plain.loadStateDict(custom.stateDict());
    expectClose(custom.forward(x).out, plain.forward(x).out, 1e-6, 1e-5);
    const relu = new Attention(8, { heads: 2, dimHead: 4, customAttnFn: (l) => tf.relu(l) });
    const r = relu.forward(x, { returnIntermediates: true }).intermediates;
    expectClose(r.postSoftmaxAttn!, tf.relu(r.preSoftmaxAttn!), 0, 0);
    expect(() => new Attention(8, { customAttnFn: 3 as unknown as null })).toThrow(
      /^customAttnFn: expected a function/,
    );
    [custom, plain, relu].forEach((m) => m.dispose());
  });

  it('addZeroKv, softclampLogits, sigmoid and maxAttendPast behave as configured', () => {
    manualSeed(45);
    const x = randn([1, 5, 8], 6);
    const zero = new Attention(8, { heads: 2, dimHead: 4, addZeroKv: true });
    const post = zero.forward(x, { returnIntermediates: true }).intermediates.postSoftmaxAttn!;
    expect(post.shape).toEqual([1, 2, 5, 6]);
    const clamp = new Attention(8, { heads: 2, dimHead: 4, softclampLogits: true, logitSoftclampValue: 0.1 });
    const pre = clamp.forward(x, { returnIntermediates: true }).intermediates.preSoftmaxAttn!;
    expect(maxAbs(pre)).toBeLessThanOrEqual(0.1 + 1e-6);
    const sig = new Attention(8, { heads: 2, dimHead: 4, sigmoid: true });
    const sp = sig.forward(x, { returnIntermediates: true }).intermediates;
    expectClose(sp.postSoftmaxAttn!, tf.sigmoid(sp.preSoftmaxAttn!), 1e-7);
    const past = new Attention(8, { heads: 2, dimHead: 4, causal: true, maxAttendPast: 1 });
    const pp = past.forward(x, { returnIntermediates: true }).intermediates.postSoftmaxAttn!;
    const rows = pp.arraySync() as number[][][][];
    expect(rows[0]![0]![4]![2]).toBe(0);
    expect(rows[0]![0]![4]![3]).toBeGreaterThan(0);
    [zero, clamp, sig, past].forEach((m) => m.dispose());
  });
});
