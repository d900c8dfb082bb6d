import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { decode, decodeStream, type GenerateOptions } from '../../src/generation/generate.js';
import { Decoder } from '../../src/layers/attention-layers.js';
import type { AttentionLayersOptions } from '../../src/layers/options.js';
import {
  TransformerWrapper,
  type TransformerWrapperOptions,
} from '../../src/wrappers/transformer-wrapper.js';
import { manualSeed } from '../../src/utils/random.js';

const V = 24;

function makeNet(
  layers: AttentionLayersOptions = {},
  wrapper: Partial<TransformerWrapperOptions> = {},
  seed = 5,
): TransformerWrapper {
  manualSeed(seed);
  return new TransformerWrapper({
    numTokens: V,
    maxSeqLen: 16,
    ...wrapper,
    attnLayers: new Decoder({ dim: 16, depth: 2, heads: 2, attnDimHead: 8, ...layers }),
  });
}

function run(
  net: TransformerWrapper,
  prompts: number[][],
  seqLen: number,
  o: GenerateOptions = {},
): number[][] {
  const t = decode(net, prompts, seqLen, o);
  const out = t.arraySync() as number[][];
  t.dispose();
  return out;
}

const prompts = [
  [1, 2, 3, 4],
  [9, 8, 7, 6],
];

describe('generate: KV cache gives the same tokens as full recomputation', () => {
  const schemes: [string, AttentionLayersOptions, Partial<TransformerWrapperOptions>][] = [
    ['absolute positions', {}, {}],
    ['rotary', { rotaryPosEmb: true }, {}],
    ['rotary xpos', { rotaryPosEmb: true, rotaryXpos: true }, {}],
    ['alibi', { alibiPosBias: true }, {}],
    ['T5 relative position bias', { relPosBias: true }, {}],
    ['dynamic position bias', { dynamicPosBias: true }, {}],
    ['memory key/values', { attnNumMemKv: 2 }, {}],
    ['grouped-query attention', { heads: 4, attnKvHeads: 2, attnDimHead: 4 }, {}],
    ['memory tokens (cache disabled by the model)', {}, { numMemoryTokens: 2 }],
  ];
  for (const [name, layers, wrapper] of schemes) {
    it(name, () => {
      const net = makeNet(layers, wrapper);
      const before = tf.memory().numTensors;
      const cached = run(net, prompts, 12, { temperature: 0 });
      const plain = run(net, prompts, 12, { temperature: 0, cacheKv: false });
      expect(tf.memory().numTensors).toBe(before);
      expect(cached).toEqual(plain);
      expect(cached.map((r) => r.length)).toEqual([12, 12]);
      // sampling is seeded: same seed, same tokens, cached or not
      const s1 = run(net, prompts, 8, {
        temperature: 1,
        seed: 3,
        filterLogitsFn: 'top_k',
        filterKwargs: { k: 5 },
      });
      const s2 = run(net, prompts, 8, {
        temperature: 1,
        seed: 3,
        filterLogitsFn: 'top_k',
        filterKwargs: { k: 5 },
        cacheKv: false,
      });
      expect(s1).toEqual(s2);
      net.dispose();
    });
  }

  it('cross-attention context', () => {
    const net = makeNet({ crossAttend: true });
    manualSeed(11);
    const context = tf.randomNormal([2, 5, 16], 0, 1, 'float32', 4);
    const contextMask = tf.tensor2d(
      [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
      ],
      [2, 5],
      'bool',
    );
    const a = run(net, prompts, 10, { temperature: 0, context, contextMask });
    const b = run(net, prompts, 10, { temperature: 0, context, contextMask, cacheKv: false });
    expect(a).toEqual(b);
    context.dispose();
    contextMask.dispose();
    net.dispose();
  });

  it('ragged prompts are right-aligned and decode the same with and without cache', () => {
    const net = makeNet({ rotaryPosEmb: true });
    const o = { temperature: 0, promptLens: [2, 4] };
    const a = run(net, prompts, 8, o);
    const b = run(net, prompts, 8, { ...o, cacheKv: false });
    expect(a).toEqual(b);
    // a row's result depends only on its real prompt, not on the padding
    const single = run(net, [[1, 2]], 8, { temperature: 0 });
    expect(a[0]).toEqual(single[0]);
    net.dispose();
  });
});

describe('generate: semantics', () => {
  it('greedy decoding picks the argmax of the full forward pass', () => {
    const net = makeNet({ rotaryPosEmb: true });
    const out = run(net, prompts, 3, { temperature: 0 });
    let seq = prompts.map((r) => [...r]);
    for (let step = 0; step < 3; step++) {
      const x = tf.tensor2d(seq, undefined, 'int32');
      const logits = net.forward(x);
      const last = tf.tidy(() =>
        tf.argMax(tf.squeeze(tf.slice(logits, [0, seq[0]!.length - 1, 0], [-1, 1, -1]), [1]), -1),
      );
      const ids = Array.from(last.dataSync());
      tf.dispose([x, logits, last]);
      ids.forEach((id, i) => expect(out[i]![step]).toBe(id));
      seq = seq.map((r, i) => [...r, ids[i]!]);
    }
    net.dispose();
  });

  it('stops when every row produced eosToken and pads after it', () => {
    const net = makeNet({ rotaryPosEmb: true });
    const free = run(net, prompts, 10, { temperature: 0 });
    const eos = free[0]![2]!;
    const withEos = run(net, prompts, 10, { temperature: 0, eosToken: eos });
    const firstIn = (r: number[]): number => r.indexOf(eos);
    const k0 = firstIn(free[0]!);
    expect(withEos[0]!.slice(0, k0 + 1)).toEqual(free[0]!.slice(0, k0 + 1));
    expect(withEos[0]!.slice(k0 + 1).every((t) => t === 0)).toBe(true);
    const k1 = firstIn(free[1]!);
    if (k1 >= 0) expect(withEos[0]!.length).toBe(Math.max(k0, k1) + 1);
    else expect(withEos[0]!.length).toBe(10);
    net.dispose();
  });

  it('sliding window past maxSeqLen with a cache frees every tensor over 100 tokens', () => {
    const net = makeNet({ rotaryPosEmb: true }, { maxSeqLen: 24 });
    const before = tf.memory().numTensors;
    const out = run(net, prompts, 100, { temperature: 0.8, seed: 1 });
    expect(out[0]).toHaveLength(100);
    expect(out.flat().every((t) => t >= 0 && t < V)).toBe(true);
    expect(tf.memory().numTensors).toBe(before);
    net.dispose();
  });

  it('restrictToMaxSeqLen false feeds the whole sequence, cached or not', () => {
    const net = makeNet({ rotaryPosEmb: true });
    const o = { temperature: 0, restrictToMaxSeqLen: false };
    const a = run(net, prompts, 20, o);
    const b = run(net, prompts, 20, { ...o, cacheKv: false });
    expect(a).toEqual(b);
    // the sliding window changes the tokens once the sequence outgrows maxSeqLen
    const windowed = run(net, prompts, 20, { temperature: 0, cacheKv: false });
    expect(windowed.map((r) => r.slice(0, 12))).toEqual(a.map((r) => r.slice(0, 12)));
    net.dispose();
  });

  it('contrastive decoding with an amateur model', () => {
    const net = makeNet({ rotaryPosEmb: true });
    const amateur = makeNet({ rotaryPosEmb: true, depth: 1 }, {}, 9);
    const before = tf.memory().numTensors;
    const a = run(net, prompts, 6, { temperature: 0, amateurModel: amateur });
    const b = run(net, prompts, 6, { temperature: 0, amateurModel: amateur, cacheKv: false });
    expect(a).toEqual(b);
    expect(tf.memory().numTensors).toBe(before);
    net.dispose();
    amateur.dispose();
  });

  it('rejects bad arguments naming them', () => {
    const net = makeNet();
    expect(() => decode(net, prompts, 0)).toThrow(/seqLen/);
    expect(() => decode(net, prompts, 2, { temperature: -1 })).toThrow(/temperature/);
    expect(() => decode(net, prompts, 2, { filterLogitsFn: 'top_p', filterKwargs: { thres: 1.5 } })).toThrow(
      /thres/,
    );
    expect(() => decode(net, prompts, 2, { filterLogitsFn: 'top_p', filterKwargs: { thres: 0 } })).toThrow(
      /thres/,
    );
    expect(() => decode(net, [[1, 99]], 2)).toThrow(/prompts/);
    expect(() => decode(net, prompts, 2, { filterLogitsFn: 'nope' as never })).toThrow(/filterLogitsFn/);
    expect(() => decode(net, prompts, 2, { promptLens: [1] })).toThrow(/promptLens/);
    // absolute positions cannot be cached past maxSeqLen
    expect(() => decode(net, prompts, 20)).toThrow(/cacheKv/);
    const t = decode(net, prompts, 20, { cacheKv: false });
    expect(t.shape).toEqual([2, 20]);
    t.dispose();
    net.dispose();
  });
});

describe('generateStream', () => {
  it('yields the same tokens as generate, step by step', async () => {
    const net = makeNet({ rotaryPosEmb: true });
    const all = run(net, prompts, 6, { temperature: 0.7, seed: 2 });
    const steps: number[][] = [];
    for await (const s of decodeStream(net, prompts, 6, { temperature: 0.7, seed: 2 })) {
      expect(s.index).toBe(steps.length);
      steps.push(s.tokens);
    }
    expect(steps).toEqual([0, 1, 2, 3, 4, 5].map((j) => all.map((r) => r[j])));
    net.dispose();
  });

  it('frees every tensor when the consumer stops early or the signal aborts', async () => {
    const net = makeNet({ rotaryPosEmb: true });
    const before = tf.memory().numTensors;
    let n = 0;
    for await (const s of decodeStream(net, prompts, 10)) {
      expect(s.tokens).toHaveLength(2);
      if (++n === 3) break;
    }
    expect(tf.memory().numTensors).toBe(before);
    const ctl = new AbortController();
    const seen: number[] = [];
    for await (const s of decodeStream(net, prompts, 10, { signal: ctl.signal })) {
      seen.push(s.index);
      if (s.index === 1) ctl.abort();
    }
    expect(seen).toEqual([0, 1]);
    expect(tf.memory().numTensors).toBe(before);
    expect(net.training).toBe(true);
    net.dispose();
  });
});

describe('AutoregressiveWrapper.generate / generateStream', () => {
  it('delegates with the wrapper padValue and validates at the call', async () => {
    const { AutoregressiveWrapper } = await import('../../src/generation/autoregressive-wrapper.js');
    const net = makeNet({ rotaryPosEmb: true });
    const ar = new AutoregressiveWrapper(net, { padValue: 23 });
    const p = tf.tensor2d(prompts, undefined, 'int32');
    const free = await ar.generate(p, 8, { temperature: 0 });
    const rows = free.arraySync() as number[][];
    const eos = rows[0]![1]!;
    const t = await ar.generate(p, 8, { temperature: 0, eosToken: eos });
    const got = t.arraySync() as number[][];
    const k = rows[0]!.indexOf(eos);
    expect(got[0]!.slice(k + 1).every((x) => x === 23)).toBe(true);
    await expect(ar.generate(p, 0)).rejects.toThrow(/seqLen/);
    expect(() => ar.generateStream(p, 4, { temperature: -2 })).toThrow(/temperature/);
    // the stream reads the prompt at the call
    const stream = ar.generateStream(p, 3, { temperature: 0 });
    p.dispose();
    const steps: number[][] = [];
    for await (const s of stream) steps.push(s.tokens);
    expect(steps).toEqual([0, 1, 2].map((j) => rows.map((r) => r[j])));
    tf.dispose([free, t]);
    net.dispose();
  });
});
