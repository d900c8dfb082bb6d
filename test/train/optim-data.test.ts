import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { createTokenizer } from '../../src/io/tokenizer.js';
import { sequentialBatches, splitTokens, WindowSampler } from '../../src/train/data.js';
import { AdamW, clipByGlobalNorm, defaultDecayFilter } from '../../src/train/optimizer.js';
import { learningRateAt } from '../../src/train/schedule.js';

describe('AdamW', () => {
  it('matches torch.optim.AdamW over three steps (lr 0.1, weight decay 0.1)', () => {
    const p = tf.variable(
      tf.tensor2d([
        [1, -2],
        [0.5, 3],
      ]),
    );
    const opt = new AdamW([['layer.weight', p]], { learningRate: 0.1, weightDecay: 0.1 });
    for (const g of [
      [
        [0.1, 0.2],
        [-0.3, 0.4],
      ],
      [
        [1, -1],
        [0, 2],
      ],
      [
        [0.5, 0.5],
        [0.5, 0.5],
      ],
    ]) {
      const gt = tf.tensor2d(g);
      opt.apply({ 'layer.weight': gt });
      gt.dispose();
    }
    // values printed by test/train/fixtures/adamw_reference.py (torch.optim.AdamW, PyTorch 1.13)
    const want = [0.708069384098053, -1.9659792184829712, 0.6213319897651672, 2.6477832794189453];
    const got = Array.from(p.dataSync());
    got.forEach((v, i) => expect(v).toBeCloseTo(want[i]!, 6));
    opt.dispose();
    p.dispose();
  });

  it('skips decay for norms, biases and embeddings by default', () => {
    const mat = tf.variable(tf.zeros([2, 2]));
    const vec = tf.variable(tf.zeros([2]));
    expect(defaultDecayFilter('attn_layers.layers.0.1.to_q.weight', mat)).toBe(true);
    expect(defaultDecayFilter('token_emb.emb.weight', mat)).toBe(false);
    expect(defaultDecayFilter('attn_layers.final_norm.weight', mat)).toBe(false);
    expect(defaultDecayFilter('to_logits.bias', vec)).toBe(false);
    expect(defaultDecayFilter('attn_layers.layers.0.0.0.gamma', vec)).toBe(false);
    mat.dispose();
    vec.dispose();
  });

  // reference values: test/train/fixtures/adamw_reference.py (torch.nn.utils.clip_grad_norm_)
  it('clips by global norm as torch.nn.utils.clip_grad_norm_', () => {
    const grads = { a: tf.tensor1d([3, 4]), b: tf.tensor1d([12]) };
    const { norm, grads: out } = clipByGlobalNorm(grads, 1);
    expect(norm).toBeCloseTo(13, 5);
    expect(Array.from(out.a!.dataSync())[0]).toBeCloseTo(0.23076921701431274, 6);
    expect(Array.from(out.b!.dataSync())[0]).toBeCloseTo(0.923076868057251, 6);
    expect(grads.a.isDisposed).toBe(true);
    Object.values(out).forEach((t) => t.dispose());
  });
});

describe('learning-rate schedule', () => {
  it('warms up linearly then follows a half cosine to the floor', () => {
    const o = { learningRate: 1, totalSteps: 12, warmupSteps: 2, minLearningRate: 0.1 };
    expect(learningRateAt(0, o)).toBe(0.5);
    expect(learningRateAt(1, o)).toBe(1);
    expect(learningRateAt(2, o)).toBe(1);
    expect(learningRateAt(11, o)).toBeCloseTo(0.1, 12);
    expect(learningRateAt(2 + 4.5, o)).toBeCloseTo(0.55, 12); // midpoint of 9 decay intervals
    expect(learningRateAt(7, { ...o, schedule: 'constant' })).toBe(1);
  });
});

describe('data', () => {
  const tokens = Int32Array.from({ length: 100 }, (_, i) => i);

  it('draws the same windows for the same seed and restores a position', () => {
    const take = (s: WindowSampler): number[][] => {
      const t = s.next();
      const v = t.arraySync();
      t.dispose();
      return v;
    };
    const a = new WindowSampler(tokens, 3, 5, 42);
    const b = new WindowSampler(tokens, 3, 5, 42);
    const arr = take(a);
    for (const row of arr) {
      expect(row).toHaveLength(6);
      row.forEach((v, i) => i > 0 && expect(v).toBe(row[i - 1]! + 1));
    }
    expect(take(b)).toEqual(arr);
    const second = take(a);
    const c = new WindowSampler(tokens, 3, 5, 42);
    c.restore({ seed: 42, drawn: 1 });
    expect(take(c)).toEqual(second);
    const d = new WindowSampler(tokens, 3, 5, 43);
    expect(take(d)).not.toEqual(arr);
  });

  it('splits and walks validation windows in order', () => {
    const { train, val } = splitTokens(tokens, 0.2);
    expect(train.length).toBe(80);
    expect(Array.from(val.subarray(0, 2))).toEqual([80, 81]);
    const batches = [...sequentialBatches(val, 2, 4)];
    // (20 - 1) / 4 = 4 windows -> 2 batches of 2
    expect(batches.map((b) => b.shape)).toEqual([
      [2, 5],
      [2, 5],
    ]);
    expect((batches[1]!.arraySync() as number[][])[1]).toEqual([92, 93, 94, 95, 96]);
    batches.forEach((b) => b.dispose());
    expect(() => new WindowSampler(tokens.subarray(0, 5), 1, 5)).toThrow(/tokens/);
    expect(() => splitTokens(tokens, 1)).toThrow(/valFraction/);
  });
});

describe('tokenizers', () => {
  it('byte tokenizer round-trips UTF-8', () => {
    const t = createTokenizer('byte');
    expect(t.vocabSize).toBe(256);
    const ids = t.encode('héllo ✓');
    expect(ids.length).toBe(new TextEncoder().encode('héllo ✓').length);
    expect(t.decode(ids)).toBe('héllo ✓');
    expect(() => t.decode([256])).toThrow(/ids\[0\]/);
  });

  it('BPE tokenizers round-trip and expose end of text', () => {
    for (const name of ['cl100k_base', 'o200k_base'] as const) {
      const t = createTokenizer(name);
      const text = 'The quick brown fox <|endoftext|> jumps.';
      const ids = t.encode(text);
      expect(ids.length).toBeLessThan(text.length);
      expect(ids.every((i) => i >= 0 && i < t.vocabSize)).toBe(true);
      expect(t.decode(ids)).toBe(text);
      expect(ids).not.toContain(t.eosTokenId);
      expect(t.eosTokenId).toBeLessThan(t.vocabSize);
    }
    expect(createTokenizer('cl100k_base').eosTokenId).toBe(100257);
    expect(() => createTokenizer('gpt9')).toThrow(/tokenizer/);
  });
});
