import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { fromConfig, toConfig } from '../../src/io/config.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { Decoder, Encoder } from '../../src/layers/attention-layers.js';
import { manualSeed } from '../../src/utils/random.js';

// Parity of these options with the reference is in options-parity.test.ts; here: their JSON keys,
// parameter names, errors, and the paths the reference cases do not take (training, memory).

const layers = { type: 'Decoder', dim: 8, depth: 1, heads: 2, attnDimHead: 4 };
const lm = { wrapper: 'TransformerWrapper', numTokens: 10, maxSeqLen: 8, attnLayers: layers };
const decoder = (extra: Record<string, unknown> = {}): Decoder =>
  new Decoder({ dim: 8, depth: 1, heads: 2, attnDimHead: 4, ...extra });

function fails(fn: () => unknown): string {
  try {
    const r = fn();
    if (r instanceof TransformerWrapper) r.dispose();
    if (r instanceof tf.Tensor) r.dispose();
  } catch (e) {
    return (e as Error).message;
  }
  return 'no error';
}

const shapes = (m: TransformerWrapper): Record<string, number[]> =>
  Object.fromEntries(m.namedParameters().map(([n, v]) => [n, v.shape]));

describe('TransformerWrapper output, embedding and recycling options in JSON', () => {
  const snake = {
    ...lm,
    embed_num_tokens: { segment: 3, kind_of: 5 },
    num_output_heads: 2,
    recycling: true,
    train_max_recycle_steps: 2,
    num_memory_tokens: 1,
    memory_tokens_interspersed_every: 3,
    attn_z_loss_weight: 0.01,
  };
  const camel = {
    ...lm,
    embedNumTokens: { segment: 3, kind_of: 5 },
    numOutputHeads: 2,
    recycling: true,
    trainMaxRecycleSteps: 2,
    numMemoryTokens: 1,
    memoryTokensInterspersedEvery: 3,
    attnZLossWeight: 0.01,
  };

  it('accepts snake_case and camelCase keys alike, with the reference parameter names', () => {
    const a = fromConfig(snake) as TransformerWrapper;
    const b = fromConfig(camel) as TransformerWrapper;
    expect(toConfig(a)).toEqual(toConfig(b));
    const s = shapes(a);
    expect(s).toEqual(shapes(b));
    expect(s['embeds.segment_embed.weight']).toEqual([3, 8]);
    expect(s['embeds.kind_of_embed.weight']).toEqual([5, 8]);
    expect(s['to_logits.0.weight']).toEqual([10, 8]);
    expect(s['to_logits.1.weight']).toEqual([10, 8]);
    expect(s['to_logits.weight']).toBeUndefined();
    expect(s['recycled_proj.weight']).toEqual([8, 8]);
    expect(a.options.memoryTokensInterspersedEvery).toBe(3);
    expect(a.options.attnZLossWeight).toBe(0.01);
    expect(a.canCacheKv).toBe(false);
    a.dispose();
    b.dispose();
    const mos = fromConfig({
      ...lm,
      mixture_of_softmax: true,
      mixture_of_softmax_k: 3,
    }) as TransformerWrapper;
    const ms = shapes(mos);
    expect(ms['to_mixture.0.weight']).toEqual([24, 8]);
    expect(ms['combine_mixture.weight']).toEqual([3, 8]);
    expect(mos.outputIsLogProb).toBe(true);
    expect(toConfig(mos)).toMatchObject({ mixtureOfSoftmax: true, mixtureOfSoftmaxK: 3 });
    mos.dispose();
  });

  it('round-trips through toConfig with the same parameters and outputs', () => {
    const a = fromConfig({ ...camel, recycling: false }) as TransformerWrapper;
    const json = toConfig(a);
    expect(json.embedNumTokens).toEqual({ segment: 3, kind_of: 5 });
    const b = fromConfig(JSON.parse(JSON.stringify(json))) as TransformerWrapper;
    expect(toConfig(b)).toEqual(json);
    b.loadStateDict(a.stateDict());
    a.eval();
    b.eval();
    const x = tf.tensor2d([[1, 2, 3, 4, 5]], [1, 5], 'int32');
    const embedIds = {
      segment: tf.tensor2d([[0, 1, 2, 0, 1]], [1, 5], 'int32'),
      kind_of: tf.tensor2d([[4, 3, 2, 1, 0]], [1, 5], 'int32'),
    };
    const ya = a.forwardHeads(x, { embedIds });
    const yb = b.forwardHeads(x, { embedIds });
    expect(ya.length).toBe(2);
    for (let i = 0; i < 2; i++)
      expect(tf.tidy(() => tf.max(tf.abs(tf.sub(ya[i]!, yb[i]!))).dataSync()[0])).toBe(0);
    tf.dispose([x, ...Object.values(embedIds), ...ya, ...yb]);
    a.dispose();
    b.dispose();
  });

  it('names the key of a bad value', () => {
    expect(fails(() => fromConfig({ ...lm, num_output_heads: 0 }))).toBe(
      'numOutputHeads: expected a positive integer, got 0',
    );
    expect(fails(() => fromConfig({ ...lm, mixtureOfSoftmaxK: 1.5 }))).toBe(
      'mixtureOfSoftmaxK: expected a positive integer, got 1.5',
    );
    expect(fails(() => fromConfig({ ...lm, memory_tokens_interspersed_every: -2 }))).toBe(
      'memoryTokensInterspersedEvery: expected a positive integer, got -2',
    );
    expect(fails(() => fromConfig({ ...lm, trainMaxRecycleSteps: 0 }))).toBe(
      'trainMaxRecycleSteps: expected a positive integer, got 0',
    );
    expect(fails(() => fromConfig({ ...lm, embedNumTokens: { segment: 0 } }))).toBe(
      'embedNumTokens: expected an object of positive integers by name, got {"segment":0}',
    );
    expect(fails(() => fromConfig({ ...lm, embedNumTokens: [2] }))).toBe(
      'embedNumTokens: expected an object of positive integers by name, got [2]',
    );
    expect(fails(() => fromConfig({ ...lm, attnZLossWeight: 'big' }))).toBe(
      'attnZLossWeight: expected a finite number, got "big"',
    );
    expect(fails(() => fromConfig({ ...lm, recycling: 1 }))).toBe('recycling: expected a boolean, got 1');
  });

  it('rejects combinations the reference cannot run', () => {
    const build =
      (o: Record<string, unknown>, attnLayers: Decoder | Encoder = decoder()) =>
      () =>
        new TransformerWrapper({ numTokens: 10, maxSeqLen: 8, attnLayers, ...o });
    expect(fails(build({ mixtureOfSoftmax: true, numOutputHeads: 2 }))).toBe(
      'mixtureOfSoftmax: expected numOutputHeads 1 with it, got 2',
    );
    expect(fails(build({ tieEmbedding: true, numOutputHeads: 2 }))).toBe(
      'numOutputHeads: expected 1 with tieEmbedding, got 2',
    );
    expect(
      fails(
        build({ numMemoryTokens: 2, memoryTokensInterspersedEvery: 4 }, new Encoder({ dim: 8, depth: 1 })),
      ),
    ).toBe('memoryTokensInterspersedEvery: expected a Decoder (causal attention layers), got Encoder');
    expect(fails(build({ embedNumTokens: { 'a.b': 2 } }))).toBe(
      'embedNumTokens.a.b: expected a name of letters, digits and underscores, got "a.b"',
    );
  });
});

describe('TransformerWrapper forward arguments of these options', () => {
  const x = (): tf.Tensor =>
    tf.tensor2d(
      [
        [1, 2, 3],
        [4, 5, 6],
      ],
      [2, 3],
      'int32',
    );

  it('checks embedIds against embedNumTokens', () => {
    const m = new TransformerWrapper({
      numTokens: 10,
      maxSeqLen: 8,
      embedNumTokens: { segment: 2 },
      attnLayers: decoder(),
    });
    const ids = x();
    const good = tf.zeros([2, 3], 'int32');
    const big = tf.fill([2, 3], 2, 'int32');
    const short = tf.zeros([2, 2], 'int32');
    expect(fails(() => m.forward(ids))).toBe(
      'embedIds: expected ids for exactly the names of embedNumTokens (segment), got ()',
    );
    expect(fails(() => m.forward(ids, { embedIds: { segment: good, other: good } }))).toBe(
      'embedIds: expected ids for exactly the names of embedNumTokens (segment), got (segment, other)',
    );
    expect(fails(() => m.forward(ids, { embedIds: { segment: big } }))).toBe(
      'embedIds.segment: expected ids in [0, 2), got values in [2, 2]',
    );
    expect(fails(() => m.forward(ids, { embedIds: { segment: short } }))).toMatch(
      /^embedIds\.segment: expected shape \[2, 3\]/,
    );
    const plain = new TransformerWrapper({ numTokens: 10, maxSeqLen: 8, attnLayers: decoder() });
    expect(fails(() => plain.forward(ids, { embedIds: { segment: good } }))).toBe(
      'embedIds: given (segment), but the model has no embedNumTokens',
    );
    tf.dispose([ids, good, big, short]);
    m.dispose();
    plain.dispose();
  });

  it('asks for recycleSteps where the reference does', () => {
    const m = new TransformerWrapper({
      numTokens: 10,
      maxSeqLen: 8,
      recycling: true,
      attnLayers: decoder(),
    }).eval();
    const plain = new TransformerWrapper({ numTokens: 10, maxSeqLen: 8, attnLayers: decoder() }).eval();
    const ids = x();
    expect(fails(() => m.forward(ids))).toBe(
      'recycleSteps: expected a positive integer outside training (the model recycles), got undefined',
    );
    expect(fails(() => m.forward(ids, { recycleSteps: 0 }))).toBe(
      'recycleSteps: expected a positive integer, got 0',
    );
    expect(fails(() => plain.forward(ids, { recycleSteps: 2 }))).toBe(
      'recycleSteps: expected 1 (or nothing) for a model without recycling, got 2',
    );
    expect(fails(() => plain.forward(ids, { recycleSteps: 1 }))).toBe('no error');
    ids.dispose();
    m.dispose();
    plain.dispose();
  });

  it('recycles a seeded random number of steps in training, leaking nothing', () => {
    manualSeed(3);
    const m = new TransformerWrapper({
      numTokens: 10,
      maxSeqLen: 8,
      recycling: true,
      trainMaxRecycleSteps: 3,
      attnLayers: decoder(),
    });
    const ids = x();
    const run = (seed: number): Float32Array => {
      manualSeed(seed);
      const y = m.forward(ids);
      const v = y.dataSync() as Float32Array;
      y.dispose();
      return v;
    };
    const before = tf.memory().numTensors;
    const outs = [1, 2, 3, 4, 5, 6].map(run);
    expect(tf.memory().numTensors).toBe(before);
    // the same seed recycles the same number of steps; different seeds reach different step counts
    expect(run(1)).toEqual(outs[0]);
    const distinct = new Set(outs.map((o) => o.join(',')));
    expect(distinct.size).toBeGreaterThan(1);
    // each output is one of the eval outputs for 1..3 steps
    m.eval();
    const byStep = [1, 2, 3].map((s) => {
      const y = m.forward(ids, { recycleSteps: s });
      const v = (y.dataSync() as Float32Array).join(',');
      y.dispose();
      return v;
    });
    for (const o of outs) expect(byStep).toContain(o.join(','));
    ids.dispose();
    m.dispose();
  });

  it('returns the z-loss only where the attention logits exist', () => {
    const flash = new TransformerWrapper({
      numTokens: 10,
      maxSeqLen: 8,
      attnLayers: decoder({ attnFlash: true }),
    });
    const ids = x();
    expect(fails(() => flash.forwardWithState(ids, { returnAttnZLoss: true }).logits)).toBe(
      'returnAttnZLoss: needs the attention logits before softmax, which the fused attention (attnFlash) does not form',
    );
    const m = new TransformerWrapper({ numTokens: 10, maxSeqLen: 8, attnLayers: decoder() });
    const before = tf.memory().numTensors;
    const a = m.forwardWithState(ids, { returnAttnZLoss: true });
    const b = m.forwardWithState(ids, { returnAttnZLoss: true, attnZLossWeight: 2e-4 });
    // the default weight is the model's (1e-4): twice the weight, twice the loss
    expect(b.attnZLoss!.dataSync()[0]! / a.attnZLoss!.dataSync()[0]!).toBeCloseTo(2, 5);
    const c = m.forwardWithState(ids);
    expect(c.attnZLoss).toBeUndefined();
    tf.dispose([
      a.logits,
      a.embeddings,
      a.attnZLoss!,
      b.logits,
      b.embeddings,
      b.attnZLoss!,
      c.logits,
      c.embeddings,
    ]);
    expect(
      fails(() => m.forwardWithState(ids, { returnAttnZLoss: true, attnZLossWeight: Number.NaN }).logits),
    ).toBe('attnZLossWeight: expected a finite number, got NaN');
    expect(tf.memory().numTensors).toBe(before);
    ids.dispose();
    flash.dispose();
    m.dispose();
  });

  it('reads several output heads with forwardHeads only', () => {
    const m = new TransformerWrapper({
      numTokens: 10,
      maxSeqLen: 8,
      numOutputHeads: 3,
      attnLayers: decoder(),
    });
    const ids = x();
    expect(fails(() => m.forward(ids))).toBe(
      'numOutputHeads: the model has 3 output heads; read their logits with forwardHeads',
    );
    const before = tf.memory().numTensors;
    const heads = m.forwardHeads(ids);
    expect(heads.map((h) => h.shape)).toEqual([
      [2, 3, 10],
      [2, 3, 10],
      [2, 3, 10],
    ]);
    tf.dispose(heads);
    expect(tf.memory().numTensors).toBe(before);
    ids.dispose();
    m.dispose();
  });

  it('does not mask interspersed memory tokens, as the reference cannot', () => {
    const m = new TransformerWrapper({
      numTokens: 10,
      maxSeqLen: 8,
      numMemoryTokens: 2,
      memoryTokensInterspersedEvery: 2,
      attnLayers: decoder(),
    });
    const ids = x();
    const mask = tf.ones([2, 3], 'bool');
    expect(fails(() => m.forward(ids, { mask }))).toMatch(
      /^mask: not supported with memoryTokensInterspersedEvery/,
    );
    const prependEmbeds = tf.zeros([2, 2, 8]);
    const prependMask = tf.ones([2, 2], 'bool');
    expect(fails(() => m.forward(ids, { prependEmbeds, prependMask }))).toBe(
      'prependMask: not supported with memoryTokensInterspersedEvery',
    );
    const y = m.forward(ids);
    expect(y.shape).toEqual([2, 3, 10]);
    tf.dispose([prependEmbeds, prependMask]);
    tf.dispose([ids, mask, y]);
    m.dispose();
  });
});

describe('TransformerWrapper lastPositionLogits', () => {
  const decoder = (extra: Record<string, unknown> = {}) =>
    new TransformerWrapper({
      numTokens: 64,
      maxSeqLen: 32,
      attnLayers: new Decoder({ dim: 16, depth: 1, heads: 2, rotaryPosEmb: true }),
      ...extra,
    });

  it("gives the last position's logits of the whole call, and the same cache", () => {
    manualSeed(3);
    for (const extra of [{}, { tieEmbedding: true }, { mixtureOfSoftmax: true, mixtureOfSoftmaxK: 2 }]) {
      const m = decoder(extra);
      m.eval();
      const x = tf.tensor2d(
        [
          [1, 2, 3, 4, 5, 6, 7],
          [9, 8, 7, 6, 5, 4, 3],
        ],
        [2, 7],
        'int32',
      );
      const whole = m.forwardWithState(x, { returnCache: true });
      const last = m.forwardWithState(x, { returnCache: true, lastPositionLogits: true });
      expect(last.logits.shape).toEqual([2, 1, 64]);
      const expected = tf.slice(whole.logits, [0, 6, 0], [-1, 1, -1]);
      // one row's product against seven rows' (kernels that may add in another order)
      const diff = tf.max(tf.abs(tf.sub(last.logits, expected))).dataSync()[0]!;
      expect(diff).toBeLessThan(1e-5);
      const wholeKv = whole.cache!.kvs.flatMap((kv) => [kv.k, kv.v]);
      const lastKv = last.cache!.kvs.flatMap((kv) => [kv.k, kv.v]);
      wholeKv.forEach((t, i) => expect(Array.from(lastKv[i]!.dataSync())).toEqual(Array.from(t.dataSync())));
      tf.dispose([x, expected, whole.logits, whole.embeddings, last.logits, last.embeddings]);
      whole.cache!.dispose();
      last.cache!.dispose();
      m.dispose();
    }
  });

  it('leaves outputs that are not per position alone (pooled embeddings)', () => {
    manualSeed(4);
    const m = decoder({ averagePoolEmbed: true });
    m.eval();
    const x = tf.tensor2d([[1, 2, 3]], [1, 3], 'int32');
    const a = m.forwardWithState(x);
    const b = m.forwardWithState(x, { lastPositionLogits: true });
    expect(b.logits.shape).toEqual(a.logits.shape);
    expect(Array.from(b.logits.dataSync())).toEqual(Array.from(a.logits.dataSync()));
    tf.dispose([x, a.logits, a.embeddings, b.logits, b.embeddings]);
    m.dispose();
  });
});
