import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import {
  NonAutoregressiveWrapper,
  linspace01,
  maskCounts,
  NAR_SCHEDULES,
} from '../../src/generation/nonautoregressive-wrapper.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { Encoder } from '../../src/layers/attention-layers.js';
import { Rng, manualSeed } from '../../src/utils/random.js';
import { fromConfig, toConfig } from '../../src/io/config.js';

const net = (extra = {}): TransformerWrapper =>
  new TransformerWrapper({
    numTokens: 10,
    maxSeqLen: 8,
    attnLayers: new Encoder({ dim: 8, depth: 1, heads: 2, attnDimHead: 4 }),
    ...extra,
  });

describe('NonAutoregressiveWrapper', () => {
  it('schedules fewer masked tokens at every step, down to none', () => {
    expect(linspace01(5)).toEqual([0, 0.25, 0.5, 0.75, 1]);
    for (const name of ['linear', 'cosine'] as const) {
      const counts = maskCounts(NAR_SCHEDULES[name], 10, 16);
      expect(counts).toHaveLength(10);
      expect(counts.at(-1)).toBe(0);
      for (let i = 1; i < counts.length; i++) expect(counts[i]!).toBeLessThanOrEqual(counts[i - 1]!);
    }
    // cosine keeps more tokens masked early than linear
    expect(maskCounts(NAR_SCHEDULES.cosine, 4, 16)).toEqual([14, 11, 6, 0]);
    expect(maskCounts(NAR_SCHEDULES.linear, 4, 16)).toEqual([12, 8, 4, 0]);
  });

  it('names its parameters as the reference, sharing the net with a self critic', () => {
    manualSeed(1);
    const w = new NonAutoregressiveWrapper(net(), { maskId: 9, selfCond: true, selfTokenCritic: true });
    const names = w.namedParameters().map(([n]) => n);
    expect(names).toContain('null_embed');
    expect(names).toContain('to_self_cond.weight');
    expect(names).toContain('token_critic.to_logits.weight');
    expect(names.some((n) => n.startsWith('token_critic.net.'))).toBe(false);
    expect(Object.keys(w.stateDict())).toContain('token_critic.net.token_emb.emb.weight');
    w.dispose();
  });

  it('trains with seeded draws and generates the same tokens from the same seed, leaking nothing', async () => {
    manualSeed(2);
    const w = new NonAutoregressiveWrapper(net(), {
      maskId: 9,
      selfCond: true,
      selfTokenCritic: true,
      steps: 4,
    });
    const x = tf.tensor2d(
      [
        [1, 2, 3, 4, 5, 6, 7, 8],
        [8, 7, 6, 5, 4, 3, 2, 1],
      ],
      [2, 8],
      'int32',
    );
    const before = tf.memory().numTensors;
    const a = w.forward(x, { rng: new Rng(5) });
    const b = w.forward(x, { rng: new Rng(5) });
    expect(a.loss.dataSync()[0]).toBe(b.loss.dataSync()[0]);
    expect(Number.isFinite(a.criticLoss!.dataSync()[0])).toBe(true);
    const { value, grads } = tf.variableGrads(() => w.forward(x, { rng: new Rng(6) }).loss);
    expect(Object.keys(grads).length).toBeGreaterThan(0);
    tf.dispose([
      a.loss,
      a.generatorLoss!,
      a.criticLoss!,
      b.loss,
      b.generatorLoss!,
      b.criticLoss!,
      value,
      ...Object.values(grads),
    ]);
    const s1 = await w.generate({ batchSize: 2, seed: 3 });
    const s2 = await w.generate({ batchSize: 2, seed: 3 });
    const one = await w.generate({ seed: 3 });
    expect(s1.shape).toEqual([2, 8]);
    expect(one.shape).toEqual([8]);
    expect(s1.arraySync()).toEqual(s2.arraySync());
    // every position is unmasked at the end
    expect((s1.dataSync() as Int32Array).every((t) => t !== 9 && t >= 0 && t < 10)).toBe(true);
    tf.dispose([s1, s2, one]);
    expect(tf.memory().numTensors).toBe(before);
    expect(w.training).toBe(true);
    x.dispose();
    w.dispose();
  });

  it('rejects bad options and inputs, naming them', async () => {
    const m = net();
    expect(() => new NonAutoregressiveWrapper(m, { maskId: 10 })).toThrow(
      'maskId: expected a token id in [0, 10) (numTokens of the net), got 10',
    );
    expect(() => new NonAutoregressiveWrapper(m, { maskId: 9, schedule: 'square' as never })).toThrow(
      `schedule: expected 'linear', 'cosine' or a function of t, got "square"`,
    );
    expect(() => new NonAutoregressiveWrapper(m, { maskId: 9, tokenCritic: net() })).toThrow(
      'tokenCritic: expected one output per position (logitsDim 1), got 10',
    );
    expect(() => new NonAutoregressiveWrapper(m, { maskId: 9, noReplaceProb: 2 })).toThrow(
      'noReplaceProb: expected a number in [0, 1], got 2',
    );
    const w = new NonAutoregressiveWrapper(m, { maskId: 9 });
    const short = tf.zeros([2, 7], 'int32');
    expect(() => w.forward(short)).toThrow(
      'x: expected shape [*, 8] (token ids [batch, maxSeqLen]), got [2, 7]',
    );
    await expect(w.generate({ batchSize: 0 })).rejects.toThrow(
      'batchSize: expected a positive integer, got 0',
    );
    await expect(w.generate({ filterThres: 1 })).rejects.toThrow(
      'filterThres: expected a number in [0, 1) or null, got 1',
    );
    short.dispose();
    w.dispose();
  });

  it('builds from JSON with the net and critic as nested configs, and gives its config back', () => {
    const netJson = {
      wrapper: 'TransformerWrapper',
      num_tokens: 10,
      max_seq_len: 8,
      attn_layers: { type: 'Encoder', dim: 8, depth: 1, heads: 2, attn_dim_head: 4 },
    };
    const json = {
      wrapper: 'NonAutoregressiveWrapper',
      mask_id: 9,
      schedule: 'cosine',
      self_cond: true,
      net: netJson,
      token_critic: { ...netJson, logits_dim: 1 },
    };
    const w = fromConfig(json) as NonAutoregressiveWrapper;
    expect(w).toBeInstanceOf(NonAutoregressiveWrapper);
    expect(w.tokenCritic).toBeInstanceOf(TransformerWrapper);
    const layers = { type: 'Encoder', dim: 8, depth: 1, heads: 2, attnDimHead: 4 };
    expect(toConfig(w)).toEqual({
      wrapper: 'NonAutoregressiveWrapper',
      maskId: 9,
      schedule: 'cosine',
      selfCond: true,
      net: { wrapper: 'TransformerWrapper', numTokens: 10, maxSeqLen: 8, attnLayers: layers },
      tokenCritic: {
        wrapper: 'TransformerWrapper',
        numTokens: 10,
        maxSeqLen: 8,
        logitsDim: 1,
        attnLayers: layers,
      },
    });
    const again = fromConfig(toConfig(w)) as NonAutoregressiveWrapper;
    expect(Object.keys(again.stateDict())).toEqual(Object.keys(w.stateDict()));
    again.dispose();
    w.dispose();
    expect(() => fromConfig({ ...json, no_replace_prob: 1.5 })).toThrow(
      'noReplaceProb: expected a number in [0, 1], got 1.5',
    );
    expect(() => fromConfig({ ...json, mask_id: undefined })).toThrow(
      'maskId: expected a non-negative integer, got undefined',
    );
    expect(() => fromConfig({ ...json, net: { ...netJson, num_tokens: 0 } })).toThrow(
      'net.numTokens: expected a positive integer, got 0',
    );
    expect(() => fromConfig({ ...json, token_critic: { ...netJson, wrapper: 'NeoMLP' } })).toThrow(
      /^tokenCritic\./,
    );
  });
});
