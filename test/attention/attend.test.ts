import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Attention } from '../../src/attention/attention.js';
import {
  XT_ATTENTION_KERNEL,
  attend,
  attendBackward,
  hasFusedAttentionKernel,
} from '../../src/attention/attend.js';
import { manualSeed } from '../../src/utils/random.js';
import { expectClose, explicitAttention, randn } from './helpers.js';

interface TensorInfoLike {
  dataId: object;
  shape: number[];
  dtype: tf.DataType;
}
interface BackendLike {
  readSync(dataId: object): tf.TypedArray | Uint8Array;
  makeTensorInfo(shape: number[], dtype: tf.DataType, values: Float32Array): TensorInfoLike;
}

/**
 * A plain-JavaScript implementation of the documented XtAttention kernel contract, standing in for a
 * native backend kernel: softmax((q k^T) * scale, masked) v, zero rows where the mask leaves no key.
 */
let kernelCalls = 0;
function fakeKernel(args: {
  inputs: Record<string, TensorInfoLike>;
  backend: unknown;
  attrs?: Record<string, unknown>;
}): TensorInfoLike {
  kernelCalls++;
  const backend = args.backend as BackendLike;
  const { q, k, v, mask } = args.inputs as Record<string, TensorInfoLike>;
  const scale = args.attrs!['scale'] as number;
  const causal = args.attrs!['causal'] as boolean;
  const [b, h, i, d] = q!.shape as [number, number, number, number];
  const j = k!.shape[2]!;
  const dv = v!.shape[3]!;
  const Q = backend.readSync(q!.dataId);
  const K = backend.readSync(k!.dataId);
  const V = backend.readSync(v!.dataId);
  const M = mask ? backend.readSync(mask.dataId) : null;
  const ms = mask ? mask.shape : null;
  const out = new Float32Array(b * h * i * dv);
  const logits = new Float64Array(j);
  for (let bi = 0; bi < b; bi++)
    for (let hi = 0; hi < h; hi++)
      for (let r = 0; r < i; r++) {
        let any = !M;
        let mx = -Infinity;
        for (let c = 0; c < j; c++) {
          let keep = true;
          if (M && ms) {
            const idx =
              ((ms[0] === 1 ? 0 : bi) * ms[1]! + (ms[1] === 1 ? 0 : hi)) * ms[2]! * ms[3]! +
              (ms[2] === 1 ? 0 : r) * ms[3]! +
              c;
            keep = M[idx] !== 0;
            if (keep) any = true;
          }
          if (causal && c > j - i + r) keep = false;
          let s = 0;
          for (let e = 0; e < d; e++)
            s += Q[((bi * h + hi) * i + r) * d + e]! * K[((bi * h + hi) * j + c) * d + e]!;
          logits[c] = keep ? s * scale : -3.4028234663852886e38;
          mx = Math.max(mx, logits[c]!);
        }
        if (!any) continue;
        let z = 0;
        for (let c = 0; c < j; c++) z += Math.exp(logits[c]! - mx);
        for (let c = 0; c < j; c++) {
          const p = Math.exp(logits[c]! - mx) / z;
          for (let e = 0; e < dv; e++)
            out[((bi * h + hi) * i + r) * dv + e]! += p * V[((bi * h + hi) * j + c) * dv + e]!;
        }
      }
  return backend.makeTensorInfo([b, h, i, dv], 'float32', out);
}

function qkv(seed: number, b = 2, h = 4, kvh = 2, i = 5, j = 5, d = 8): [tf.Tensor, tf.Tensor, tf.Tensor] {
  return [randn([b, h, i, d], seed), randn([b, kvh, j, d], seed + 1), randn([b, kvh, j, d], seed + 2)];
}

function gradsOf(
  useKernel: boolean,
  opts: Parameters<typeof attend>[3],
  q: tf.Tensor,
  k: tf.Tensor,
  v: tf.Tensor,
) {
  const w = randn([q.shape[0]!, q.shape[1]!, q.shape[2]!, v.shape[3]!], 99);
  const f = (a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) =>
    tf.sum(tf.mul(attend(a, b, c, { ...opts, useKernel }), w));
  const grads = tf.grads(f)([q, k, v]);
  return grads;
}

describe('attend (fused path) without a registered kernel', () => {
  it('flash and non-flash attention both equal the attention written out from the weights; gradients agree', () => {
    // the pure cpu backend has no fused kernel; native backends may (then this checks their kernel)
    if (tf.getBackend() === 'cpu') expect(hasFusedAttentionKernel()).toBe(false);
    const tol = hasFusedAttentionKernel() ? 1e-5 : 0;
    manualSeed(1);
    const a = new Attention(16, { heads: 4, dimHead: 4, kvHeads: 2, causal: true });
    const f = new Attention(16, { heads: 4, dimHead: 4, kvHeads: 2, causal: true, flash: true });
    f.loadStateDict(a.stateDict());
    const x = randn([2, 6, 16], 2);
    const mask = tf.tensor2d([
      [true, true, false, true, true, true],
      [false, false, true, true, true, true],
    ]);
    const want = explicitAttention(a.stateDict(), x, mask, 4, 2, 4);
    expectClose(a.forward(x, { mask }).out, want, 1e-5, 1e-4);
    expectClose(f.forward(x, { mask }).out, want, 1e-5, 1e-4);
    const loss = (m: Attention) => () => tf.sum(tf.square(m.forward(x, { mask }).out)) as tf.Scalar;
    const ga = tf.variableGrads(loss(a));
    const gf = tf.variableGrads(loss(f));
    for (const [name, v] of a.namedParameters()) {
      const fv = new Map(f.namedParameters()).get(name)!;
      expectClose(gf.grads[fv.name]!, ga.grads[v.name]!, tol, tol * 10);
    }
    a.dispose();
    f.dispose();
  });

  it('rejects bad shapes, naming the argument', () => {
    const [q, k, v] = qkv(1);
    expect(() => attend(tf.zeros([2, 4, 8]), k, v)).toThrow(/^q: expected \[batch, heads, i, dimHead\]/);
    expect(() => attend(q, tf.zeros([2, 3, 5, 8]), v)).toThrow(/^k: expected \[2, a divisor of 4, j, 8\]/);
    expect(() => attend(q, k, tf.zeros([2, 2, 4, 8]))).toThrow(/^v: expected \[2, 2, 5, dv\]/);
    expect(() => attend(q, k, v, { mask: tf.ones([2, 4], 'bool') })).toThrow(/^mask: expected \[2, 5\]/);
    expect(() => attend(q, k, v, { mask: tf.ones([2, 5]) })).toThrow(/^mask: expected dtype bool/);
    expect(() => attend(q, k, v, { attnBias: tf.zeros([4, 5, 4]) })).toThrow(
      /^attnBias: expected \[4, 5, 5\]/,
    );
  });
});

describe('attend with a registered XtAttention kernel', () => {
  // a backend with its own kernel is tested as it is; otherwise the JavaScript stand-in is registered
  let fake = false;
  const counted = (n: number): void => {
    if (fake) expect(kernelCalls).toBe(n);
  };
  beforeAll(() => {
    if (hasFusedAttentionKernel()) return;
    fake = true;
    tf.registerKernel({
      kernelName: XT_ATTENTION_KERNEL,
      backendName: tf.getBackend(),
      kernelFunc: fakeKernel as unknown as tf.KernelFunc,
    });
  });
  afterAll(() => {
    if (fake) tf.unregisterKernel(XT_ATTENTION_KERNEL, tf.getBackend());
  });

  const cases: [string, Parameters<typeof attend>[3], number, number][] = [
    ['plain', {}, 5, 5],
    ['causal', { causal: true }, 5, 5],
    ['causal, keys beyond queries (cached)', { causal: true }, 2, 6],
    ['key padding with an empty row', { causal: true }, 4, 4],
    ['scale', { scale: 0.3 }, 3, 5],
  ];
  for (const [name, opts, i, j] of cases) {
    it(`${name}: dispatches the kernel, same values and gradients as the composite`, () => {
      const [q, k, v] = qkv(10, 2, 4, 2, i, j);
      const o = { ...opts };
      if (name.startsWith('key padding'))
        o.mask = tf.tensor2d([
          [false, false, false, false],
          [true, false, true, true],
        ]);
      expect(hasFusedAttentionKernel()).toBe(true);
      const calls = kernelCalls;
      const fused = attend(q, k, v, o);
      counted(calls + 1);
      const composite = attend(q, k, v, { ...o, useKernel: false });
      counted(calls + 1);
      expectClose(fused, composite, 1e-5, 1e-4);
      const gk = gradsOf(true, o, q, k, v);
      const gc = gradsOf(false, o, q, k, v);
      for (let n = 0; n < 3; n++) expectClose(gk[n]!, gc[n]!, 1e-5, 1e-4);
      if (o.mask)
        expect(
          tf.tidy(() => tf.max(tf.abs(tf.slice(fused, [0, 0, 0, 0], [1, -1, -1, -1]))).dataSync()[0]),
        ).toBe(0);
    });
  }

  it('uses a registered XtAttention gradient config when there is one', () => {
    const mine = !tf.getGradient(XT_ATTENTION_KERNEL);
    let gradCalls = 0;
    if (mine) {
      // a stand-in for a native backward kernel: the composite path's gradient
      tf.registerGradient({
        kernelName: XT_ATTENTION_KERNEL,
        inputsToSave: ['q', 'k', 'v', 'mask'],
        gradFunc: (dy, saved, attrs) => {
          gradCalls++;
          const [q, k, v, mask] = saved as tf.Tensor[];
          const a = attrs as unknown as { scale: number; causal: boolean };
          const [dq, dk, dv] = attendBackward(dy as tf.Tensor, q!, k!, v!, { ...a, mask });
          return { q: () => dq!, k: () => dk!, v: () => dv! };
        },
      });
    }
    try {
      const [q, k, v] = qkv(30, 1, 2, 2, 3, 3, 4);
      const o = { causal: true, mask: tf.tensor2d([[true, false, true]]) };
      const gk = gradsOf(true, o, q, k, v);
      const gc = gradsOf(false, o, q, k, v);
      for (let n = 0; n < 3; n++) expectClose(gk[n]!, gc[n]!, 1e-5, 1e-4);
      if (mine) expect(gradCalls).toBe(1);
    } finally {
      if (mine) tf.unregisterGradient(XT_ATTENTION_KERNEL);
    }
  });

  it('falls back to the composite path with an additive bias, and leaks nothing', () => {
    const [q, k, v] = qkv(20);
    const bias = randn([4, 5, 5], 3);
    const calls = kernelCalls;
    const before = tf.memory().numTensors;
    tf.tidy(() => {
      attend(q, k, v, { attnBias: bias, causal: true });
      tf.grads((a: tf.Tensor) => tf.sum(attend(a, k, v, { causal: true })))([q]);
    });
    expect(tf.memory().numTensors).toBe(before);
    counted(calls + 1);
  });

  it('a flash Attention layer uses the kernel and matches the non-flash layer, gradients included', () => {
    manualSeed(4);
    const a = new Attention(16, { heads: 4, dimHead: 4, causal: true, numMemKv: 2 });
    const f = new Attention(16, { heads: 4, dimHead: 4, causal: true, numMemKv: 2, flash: true });
    f.loadStateDict(a.stateDict());
    const x = randn([2, 5, 16], 5);
    const calls = kernelCalls;
    expectClose(f.forward(x).out, a.forward(x).out, 1e-5, 1e-4);
    counted(calls + 1);
    const loss = (m: Attention) => () => tf.sum(tf.square(m.forward(x).out)) as tf.Scalar;
    const ga = tf.variableGrads(loss(a));
    const gf = tf.variableGrads(loss(f));
    const fByName = new Map(f.namedParameters());
    for (const [name, v] of a.namedParameters())
      expectClose(gf.grads[fByName.get(name)!.name]!, ga.grads[v.name]!, 1e-5, 1e-4);
    a.dispose();
    f.dispose();
  });
});
