import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { describe, expect, it } from 'vitest';
import { Attention } from '../../src/attention/attention.js';
import { manualSeed } from '../../src/utils/random.js';
import { expectClose, randn } from './helpers.js';

describe('Attention basics', () => {
  it('maps [b, n, dim] to [b, n, dim] with reference parameter names and shapes', () => {
    manualSeed(1);
    const attn = new Attention(16, { heads: 2, dimHead: 4 });
    expect(Object.fromEntries(Object.entries(attn.stateDict()).map(([k, v]) => [k, v.shape]))).toEqual({
      'to_q.weight': [8, 16],
      'to_k.weight': [8, 16],
      'to_v.weight': [8, 16],
      'to_out.weight': [16, 8],
    });
    const x = randn([2, 5, 16], 2);
    const { out } = attn.forward(x);
    expect(out.shape).toEqual([2, 5, 16]);
    tf.dispose([x, out]);
    attn.dispose();
  });

  it('causal attention ignores future tokens', () => {
    manualSeed(3);
    const attn = new Attention(8, { heads: 2, dimHead: 4, causal: true });
    const x = randn([1, 6, 8], 4);
    const x2 = tf.concat([tf.slice(x, [0, 0, 0], [1, 3, 8]), randn([1, 3, 8], 5)], 1);
    const a = attn.forward(x).out;
    const b = attn.forward(x2).out;
    expectClose(tf.slice(a, [0, 0, 0], [1, 3, 8]), tf.slice(b, [0, 0, 0], [1, 3, 8]));
    expect(tf.max(tf.abs(tf.sub(a, b))).dataSync()[0]).toBeGreaterThan(1e-3);
    attn.dispose();
  });

  it('cached generation equals the uncached pass', () => {
    manualSeed(5);
    const attn = new Attention(8, { heads: 2, dimHead: 4, causal: true });
    const x = randn([2, 5, 8], 6);
    const full = attn.forward(x).out;
    const first = attn.forward(tf.slice(x, [0, 0, 0], [2, 3, 8]), { returnIntermediates: true });
    let cache = first.intermediates.cachedKv!;
    const outs = [first.out];
    for (let t = 3; t < 5; t++) {
      const step = attn.forward(tf.slice(x, [0, t, 0], [2, 1, 8]), { cache, returnIntermediates: true });
      tf.dispose([cache.k, cache.v]);
      cache = step.intermediates.cachedKv!;
      outs.push(step.out);
    }
    expectClose(tf.concat(outs, 1), full);
    attn.dispose();
  });
});
