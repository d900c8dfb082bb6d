import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { XValTransformerWrapper } from '../../src/wrappers/xval.js';
import { Decoder } from '../../src/layers/attention-layers.js';

const maxDiff = (a: tf.Tensor, b: tf.Tensor): number =>
  tf.tidy(() => tf.max(tf.abs(tf.sub(a, b))).dataSync()[0]!);
const layers = (): Decoder => new Decoder({ dim: 8, depth: 1, heads: 2, attnDimHead: 4 });

describe('XValTransformerWrapper', () => {
  it('names its heads as the reference', () => {
    const m = new XValTransformerWrapper({
      numTokens: 6,
      maxSeqLen: 8,
      numericalTokenId: 5,
      attnLayers: layers(),
    });
    const s = Object.fromEntries(m.namedParameters().map(([n, v]) => [n, v.shape]));
    expect(s['token_emb.emb.weight']).toEqual([6, 8]);
    expect(s['pos_emb.emb.weight']).toEqual([8, 8]);
    expect(s['to_logits.weight']).toEqual([6, 8]);
    expect(s['to_logits.bias']).toEqual([6]);
    expect(s['to_numerical_output.0.weight']).toEqual([1, 8]);
    expect(s['to_numerical_output.0.bias']).toEqual([1]);
    m.dispose();
    const tied = new XValTransformerWrapper({
      numTokens: 6,
      maxSeqLen: 8,
      numericalTokenId: 5,
      tieEmbedding: true,
      attnLayers: layers(),
    });
    expect(tied.namedParameters().some(([n]) => n.startsWith('to_logits'))).toBe(false);
    tied.dispose();
  });

  it('scales only the numerical token embeddings by their numbers', () => {
    const m = new XValTransformerWrapper({
      numTokens: 6,
      maxSeqLen: 8,
      numericalTokenId: 5,
      attnLayers: layers(),
    }).eval();
    const ids = tf.tensor([[1, 5, 2, 5]], [1, 4], 'int32');
    const nums = tf.tensor([[0, 2.5, 0, -1]]);
    const otherAtText = tf.tensor([[9, 2.5, 9, -1]]);
    const otherAtNumber = tf.tensor([[0, 0.5, 0, -1]]);
    const a = m.forward(ids, nums);
    const b = m.forward(ids, otherAtText);
    const c = m.forward(ids, otherAtNumber);
    expect(a.logits.shape).toEqual([1, 4, 6]);
    expect(a.numerical.shape).toEqual([1, 4]);
    expect(maxDiff(a.logits, b.logits)).toBe(0);
    expect(maxDiff(a.numerical, b.numerical)).toBe(0);
    expect(maxDiff(a.logits, c.logits)).toBeGreaterThan(1e-4);
    tf.dispose([
      ids,
      nums,
      otherAtText,
      otherAtNumber,
      a.logits,
      a.numerical,
      b.logits,
      b.numerical,
      c.logits,
      c.numerical,
    ]);
    m.dispose();
  });

  it('rejects mismatched inputs and options, naming the argument', () => {
    const m = new XValTransformerWrapper({
      numTokens: 6,
      maxSeqLen: 8,
      numericalTokenId: 5,
      attnLayers: layers(),
    });
    const ids = tf.tensor([[1, 5, 2]], [1, 3], 'int32');
    const nums = tf.zeros([1, 4]);
    expect(() => m.forward(ids, nums)).toThrow(/^nums: expected the shape of ids \[1, 3\], got \[1, 4\]/);
    const fids = tf.zeros([1, 4]);
    expect(() => m.forward(fids, nums)).toThrow(/^ids: expected dtype int32, got float32/);
    tf.dispose([ids, nums, fids]);
    m.dispose();
    expect(
      () =>
        new XValTransformerWrapper({ numTokens: 6, maxSeqLen: 8, numericalTokenId: 6, attnLayers: layers() }),
    ).toThrow(/^numericalTokenId: expected a token id below numTokens 6, got 6/);
    expect(
      () =>
        new XValTransformerWrapper({
          numTokens: 6,
          maxSeqLen: 8,
          numericalTokenId: 1,
          embDim: 4,
          attnLayers: layers(),
        }),
    ).toThrow(/^embDim: /);
  });
});
