import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { XTransformer } from '../../src/wrappers/xtransformer.js';
import { ensureGradients } from '../../src/train/gradients.js';

const base = {
  dim: 8,
  encNumTokens: 10,
  encDepth: 1,
  encHeads: 2,
  encAttnDimHead: 4,
  encMaxSeqLen: 8,
  decNumTokens: 10,
  decDepth: 1,
  decHeads: 2,
  decAttnDimHead: 4,
  decMaxSeqLen: 8,
};

describe('XTransformer', () => {
  it('names its parameters as the reference (encoder., decoder.net.) and ties token embeddings', () => {
    const m = new XTransformer(base);
    const names = m.namedParameters().map(([n]) => n);
    expect(names).toContain('encoder.token_emb.emb.weight');
    expect(names).toContain('decoder.net.token_emb.emb.weight');
    expect(names).toContain('decoder.net.to_logits.weight');
    expect(names.some((n) => n.startsWith('encoder.to_logits'))).toBe(false);
    // the decoder cross-attends: its blocks are a, c, f
    expect(names).toContain('decoder.net.attn_layers.layers.1.1.to_k.weight');
    m.dispose();

    const tied = new XTransformer({ ...base, tieTokenEmb: true });
    const tnames = tied.namedParameters().map(([n]) => n);
    expect(tnames).toContain('encoder.token_emb.emb.weight');
    expect(tnames).not.toContain('decoder.net.token_emb.emb.weight');
    const sd = tied.stateDict();
    expect(sd['decoder.net.token_emb.emb.weight']).toBe(sd['encoder.token_emb.emb.weight']);
    tied.dispose();
  });

  it('returns the decoder loss, with gradients reaching the tied embedding', async () => {
    await ensureGradients();
    const m = new XTransformer({ ...base, tieTokenEmb: true }).eval();
    const src = tf.tensor([[1, 2, 3, 4]], [1, 4], 'int32');
    const tgt = tf.tensor([[5, 6, 7, 8, 9]], [1, 5], 'int32');
    const mask = tf.tensor([[true, true, true, false]], [1, 4], 'bool');
    const pre = tf.randomNormal([1, 2, 8], 0, 1, 'float32', 1);
    const loss = m.forward(src, tgt, { mask, srcPrependEmbeds: pre });
    expect(loss.shape).toEqual([]);
    expect(Number.isFinite(loss.dataSync()[0])).toBe(true);
    const emb = m.encoder.tokenEmb.emb.weight;
    const { value, grads } = tf.variableGrads(() => m.forward(src, tgt, { mask }), [emb]);
    const g = grads[emb.name]!;
    expect(tf.tidy(() => tf.sum(tf.abs(g)).dataSync()[0]!)).toBeGreaterThan(0);
    tf.dispose([loss, value, g, src, tgt, mask, pre]);
    m.dispose();
  });

  it('drops context tokens only in training with crossAttnTokensDropout', () => {
    const m = new XTransformer({ ...base, crossAttnTokensDropout: 0.5 });
    const src = tf.tensor([[1, 2, 3, 4, 5, 6]], [1, 6], 'int32');
    m.eval();
    const e = m.encode(src);
    expect(e.context.shape).toEqual([1, 6, 8]);
    m.train();
    const t = m.encode(src);
    expect(t.context.shape).toEqual([1, 3, 8]);
    tf.dispose([e.context, t.context, src]);
    m.dispose();
  });

  it('generates tokens cross-attending to the source', () => {
    const m = new XTransformer(base);
    const src = tf.tensor([[1, 2, 3]], [1, 3], 'int32');
    const start = tf.tensor([[1]], [1, 1], 'int32');
    const out = m.generate(src, start, 4, { temperature: 0 });
    expect(out.shape).toEqual([1, 4]);
    expect(out.dtype).toBe('int32');
    tf.dispose([out, src, start]);
    m.dispose();
  });

  it('rejects bad inputs and options, naming them', () => {
    const m = new XTransformer(base);
    const src = tf.tensor([[1, 2, 3]], [1, 3], 'int32');
    const tgt = tf.tensor([[1, 2, 3]], [1, 3], 'int32');
    const badMask = tf.ones([1, 4], 'bool');
    const badPre = tf.zeros([1, 2, 5]);
    expect(() => m.forward(src, tgt, { mask: badMask })).toThrow(
      /^mask: expected shape \[1, 3\], got \[1, 4\]/,
    );
    expect(() => m.forward(src, tgt, { srcPrependEmbeds: badPre })).toThrow(
      /^srcPrependEmbeds: expected shape \[1, \*, 8\]/,
    );
    const flat = tf.tensor([1, 2, 3], [3], 'int32');
    expect(() => m.forward(flat, tgt)).toThrow(/^src: expected token ids of shape \[batch, seq\]/);
    tf.dispose([src, tgt, badMask, badPre, flat]);
    m.dispose();
    expect(() => new XTransformer({ ...base, encDepth: -1 })).toThrow(
      /^encDepth: expected a positive integer, got -1/,
    );
    expect(() => new XTransformer({ ...base, decHeads: 0 })).toThrow(
      /^decHeads: expected a positive integer/,
    );
    expect(() => new XTransformer({ ...base, encDim: 4 } as never)).toThrow(/^encDim: /);
    expect(() => new XTransformer({ ...base, depth: 2 } as never)).toThrow(
      /^depth: expected an option of XTransformer \(encoder \/ decoder options take an enc \/ dec prefix\), got an unknown option$/,
    );
    expect(() => new XTransformer({ ...base, decNumTokens: 11, tieTokenEmb: true })).toThrow(
      /^tieTokenEmb: /,
    );
  });
});
