import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { ViTransformerWrapper } from '../../src/wrappers/vit.js';
import { Encoder } from '../../src/layers/attention-layers.js';
import { manualSeed } from '../../src/utils/random.js';

const enc = (): Encoder => new Encoder({ dim: 8, depth: 1, heads: 2, attnDimHead: 4 });
const shapes = (m: ViTransformerWrapper): Record<string, number[]> =>
  Object.fromEntries(m.namedParameters().map(([n, v]) => [n, v.shape]));

describe('ViTransformerWrapper', () => {
  it('names and shapes its parameters as the reference state_dict', () => {
    const m = new ViTransformerWrapper({ imageSize: 8, patchSize: 4, numClasses: 5, attnLayers: enc() });
    const s = shapes(m);
    expect(s['pos_embedding']).toEqual([1, 4, 8]);
    expect(s['patch_to_embedding.0.gamma']).toEqual([48]);
    expect(s['patch_to_embedding.1.weight']).toEqual([8, 48]);
    expect(s['patch_to_embedding.1.bias']).toEqual([8]);
    expect(s['patch_to_embedding.2.gamma']).toEqual([8]);
    expect(s['mlp_head.weight']).toEqual([5, 8]);
    expect(s['mlp_head.bias']).toEqual([5]);
    expect(Object.keys(s).some((k) => k.startsWith('attn_layers.layers.'))).toBe(true);
    expect(s['post_emb_norm.gamma']).toBeUndefined();
    m.dispose();
    const r = new ViTransformerWrapper({
      imageSize: 8,
      patchSize: 4,
      channels: 1,
      numRegisterTokens: 2,
      postEmbNorm: true,
      attnLayers: enc(),
    });
    const s2 = shapes(r);
    expect(s2['register_tokens']).toEqual([2, 8]);
    expect(s2['post_emb_norm.gamma']).toEqual([8]);
    expect(s2['patch_to_embedding.0.gamma']).toEqual([16]);
    expect(s2['mlp_head.weight']).toBeUndefined();
    r.dispose();
  });

  it('returns logits or embeddings and frees its intermediates', () => {
    manualSeed(1);
    const m = new ViTransformerWrapper({
      imageSize: 8,
      patchSize: 4,
      numClasses: 5,
      attnLayers: enc(),
    }).eval();
    const img = tf.randomNormal([2, 3, 8, 8], 0, 1, 'float32', 3);
    m.forward(img).dispose(); // warm-up: backends may cache constants on first use
    const before = tf.memory().numTensors;
    const logits = m.forward(img);
    const emb = m.forward(img, { returnEmbeddings: true });
    expect(logits.shape).toEqual([2, 5]);
    expect(emb.shape).toEqual([2, 4, 8]);
    // logits are the head applied to the mean embedding
    const manual = tf.tidy(() => m.mlpHead!.forward(tf.mean(emb, 1)));
    const diff = tf.tidy(() => tf.max(tf.abs(tf.sub(manual, logits))).dataSync()[0]!);
    expect(diff).toBeLessThan(1e-5);
    tf.dispose([logits, emb, manual]);
    expect(tf.memory().numTensors).toBe(before);
    const both = m.forwardWithEmbeddings(img);
    expect(both.logits.shape).toEqual([2, 5]);
    tf.dispose([both.logits, both.embeddings, img]);
    m.dispose();
  });

  it('keeps the output shape with register tokens; dropout only acts in training', () => {
    const m = new ViTransformerWrapper({
      imageSize: 8,
      patchSize: 4,
      numRegisterTokens: 3,
      embDropout: 0.5,
      attnLayers: enc(),
    });
    const img = tf.randomNormal([1, 3, 8, 8], 0, 1, 'float32', 4);
    m.eval();
    const a = m.forward(img, { returnEmbeddings: true });
    const b = m.forward(img, { returnEmbeddings: true });
    expect(a.shape).toEqual([1, 4, 8]);
    // without numClasses the head is the identity (as the reference): the mean embedding
    const pooled = m.forward(img);
    expect(pooled.shape).toEqual([1, 8]);
    const err = tf.tidy(() => tf.max(tf.abs(tf.sub(tf.mean(a, 1), pooled))).dataSync()[0]!);
    expect(err).toBeLessThan(1e-6);
    pooled.dispose();
    expect(Array.from(a.dataSync())).toEqual(Array.from(b.dataSync()));
    m.train();
    const c = m.forward(img);
    const d = m.forward(img);
    expect(Array.from(c.dataSync())).not.toEqual(Array.from(d.dataSync()));
    tf.dispose([a, b, c, d, img]);
    m.dispose();
  });

  it('rejects bad images and options, naming the argument', () => {
    const m = new ViTransformerWrapper({ imageSize: 8, patchSize: 4, numClasses: 5, attnLayers: enc() });
    const bad =
      (shape: number[]): (() => void) =>
      () => {
        const t = tf.zeros(shape);
        try {
          m.forward(t).dispose();
        } finally {
          t.dispose();
        }
      };
    expect(bad([2, 3, 9, 9])).toThrow(
      /^img: expected height and width divisible by patchSize 4, got shape \[2, 3, 9, 9\]/,
    );
    expect(bad([2, 3, 12, 12])).toThrow(/^img: expected at most 4 patches/);
    expect(bad([2, 1, 8, 8])).toThrow(/^img: expected 3 channels/);
    expect(bad([3, 8, 8])).toThrow(/^img: expected shape \[batch, 3, 8, 8\], got \[3, 8, 8\]/);
    m.dispose();
    expect(() => new ViTransformerWrapper({ imageSize: 10, patchSize: 4, attnLayers: enc() })).toThrow(
      /^imageSize: expected a multiple of patchSize 4, got 10/,
    );
    expect(() => new ViTransformerWrapper({ imageSize: 8, patchSize: 0, attnLayers: enc() })).toThrow(
      /^patchSize: expected a positive integer, got 0/,
    );
    expect(
      () => new ViTransformerWrapper({ imageSize: 8, patchSize: 4, numClasses: -1, attnLayers: enc() }),
    ).toThrow(/^numClasses: expected a positive integer, got -1/);
  });
});
