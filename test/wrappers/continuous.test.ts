import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { ContinuousTransformerWrapper } from '../../src/wrappers/continuous.js';
import { Decoder, Encoder } from '../../src/layers/attention-layers.js';

const maxDiff = (a: tf.Tensor, b: tf.Tensor): number =>
  tf.tidy(() => tf.max(tf.abs(tf.sub(a, b))).dataSync()[0]!);
const layers = (): Encoder => new Encoder({ dim: 8, depth: 1, heads: 2, attnDimHead: 4 });

describe('ContinuousTransformerWrapper', () => {
  it('names its projections and memory tokens as the reference', () => {
    const m = new ContinuousTransformerWrapper({
      dimIn: 5,
      dimOut: 3,
      maxSeqLen: 6,
      numMemoryTokens: 2,
      attnLayers: layers(),
    });
    const s = Object.fromEntries(m.namedParameters().map(([n, v]) => [n, v.shape]));
    expect(s['memory_tokens']).toEqual([2, 8]);
    expect(s['pos_emb.emb.weight']).toEqual([6, 8]);
    expect(s['project_in.weight']).toEqual([8, 5]);
    expect(s['project_out.weight']).toEqual([3, 8]);
    expect(s['project_in.bias']).toBeUndefined();
    expect(m.namedParameters()[0]![0]).toBe('memory_tokens');
    m.dispose();
    const bare = new ContinuousTransformerWrapper({ maxSeqLen: 0, attnLayers: layers() });
    const names = bare.namedParameters().map(([n]) => n);
    expect(names.some((n) => n.startsWith('pos_emb') || n.startsWith('project_'))).toBe(false);
    bare.dispose();
  });

  it('maps [b, n, dimIn] to [b, n, dimOut] with and without memory tokens, masked', () => {
    const x = tf.randomNormal([2, 4, 5], 0, 1, 'float32', 1);
    const mask = tf.tensor(
      [
        [true, true, true, false],
        [true, true, false, false],
      ],
      [2, 4],
      'bool',
    );
    for (const numMemoryTokens of [0, 2]) {
      const m = new ContinuousTransformerWrapper({
        dimIn: 5,
        dimOut: 3,
        maxSeqLen: 6,
        numMemoryTokens,
        attnLayers: layers(),
      });
      m.eval();
      const y = m.forward(x, { mask });
      expect(y.shape).toEqual([2, 4, 3]);
      const e = m.forward(x, { mask, returnEmbeddings: true });
      expect(e.shape).toEqual([2, 4, 8]);
      // masked-out positions do not influence kept ones
      const x2 = tf.tidy(() => tf.concat([tf.slice(x, [0, 0, 0], [2, 3, 5]), tf.fill([2, 1, 5], 7)], 1));
      const y2 = m.forward(x2, { mask });
      expect(maxDiff(tf.slice(y, [0, 0, 0], [1, 3, 3]), tf.slice(y2, [0, 0, 0], [1, 3, 3]))).toBeLessThan(
        1e-5,
      );
      tf.dispose([y, e, x2, y2]);
      m.dispose();
    }
    tf.dispose([x, mask]);
  });

  it('averagePoolEmbed is the masked mean of the per-position output', () => {
    const plain = new ContinuousTransformerWrapper({ dimIn: 5, maxSeqLen: 6, attnLayers: layers() }).eval();
    const pooled = new ContinuousTransformerWrapper({
      dimIn: 5,
      maxSeqLen: 6,
      averagePoolEmbed: true,
      attnLayers: layers(),
    }).eval();
    pooled.loadStateDict(plain.stateDict());
    const x = tf.randomNormal([2, 4, 5], 0, 1, 'float32', 2);
    const mask = tf.tensor(
      [
        [true, true, true, false],
        [true, false, false, false],
      ],
      [2, 4],
      'bool',
    );
    const full = plain.forward(x, { mask });
    const pool = pooled.forward(x, { mask });
    expect(pool.shape).toEqual([2, 8]);
    const manual = tf.tidy(() => {
      const m = tf.expandDims(tf.cast(mask, 'float32'), -1);
      return tf.div(tf.sum(tf.mul(full, m), 1), tf.sum(m, 1));
    });
    expect(maxDiff(pool, manual)).toBeLessThan(1e-5);
    tf.dispose([x, mask, full, pool, manual]);
    plain.dispose();
    pooled.dispose();
  });

  it('returns the last maxMemLen hidden states as memories', () => {
    const m = new ContinuousTransformerWrapper({
      maxSeqLen: 0,
      maxMemLen: 3,
      attnLayers: new Decoder({ dim: 8, depth: 2, heads: 2, attnDimHead: 4, relPosBias: true }),
    }).eval();
    const x = tf.randomNormal([1, 5, 8], 0, 1, 'float32', 3);
    const before = tf.memory().numTensors;
    const { out, mems } = m.forwardWithState(x, { returnMems: true });
    expect(out.shape).toEqual([1, 5, 8]);
    expect(mems!.length).toBe(2);
    for (const t of mems!) expect(t.shape).toEqual([1, 3, 8]);
    const next = m.forward(x, { mems });
    expect(next.shape).toEqual([1, 5, 8]);
    tf.dispose([out, next, ...mems!]);
    expect(tf.memory().numTensors).toBe(before);
    x.dispose();
    m.dispose();
  });

  it('rejects mismatched inputs, naming the argument', () => {
    const m = new ContinuousTransformerWrapper({ dimIn: 5, dimOut: 3, maxSeqLen: 6, attnLayers: layers() });
    const x = tf.zeros([2, 4, 4]);
    expect(() => m.forward(x)).toThrow(/^x: expected shape \[batch, seq, 5\] \(dimIn\), got \[2, 4, 4\]/);
    const ok = tf.zeros([2, 4, 5]);
    const badMask = tf.ones([2, 3], 'bool');
    expect(() => m.forward(ok, { mask: badMask })).toThrow(/^mask: expected shape \[2, 4\], got \[2, 3\]/);
    const long = tf.zeros([1, 7, 5]);
    expect(() => m.forward(long)).toThrow(/^x: expected a sequence length of at most maxSeqLen 6, got 7/);
    tf.dispose([x, ok, badMask, long]);
    m.dispose();
    expect(() => new ContinuousTransformerWrapper({ dimIn: 0, maxSeqLen: 4, attnLayers: layers() })).toThrow(
      /^dimIn: expected a positive integer, got 0/,
    );
    expect(
      () => new ContinuousTransformerWrapper({ maxSeqLen: 4, embDropout: 2, attnLayers: layers() }),
    ).toThrow(/^embDropout: expected a number in \[0, 1\), got 2/);
  });
});
