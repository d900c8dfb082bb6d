import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { Decoder } from '../../src/layers/attention-layers.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { manualSeed } from '../../src/utils/random.js';
import { expectClose } from './helpers.js';
import { XT_CACHED_ATTENTION } from '../../src/attention/attention.js';

// Cached decoding through a whole decoder equals the full pass for every attention-side scheme.
const configs: Record<string, object> = {
  // plain self-attention: one XtCachedAttention kernel per step where the backend has it
  plain: {},
  'rotary over heads of 64 (tables)': { rotaryPosEmb: true, attnDimHead: 64 },
  'flash + rotary, value heads of 8': {
    attnFlash: true,
    rotaryPosEmb: true,
    attnDimHead: 64,
    attnValueDimHead: 8,
  },
  rotary: { rotaryPosEmb: true },
  'rotary xpos': { rotaryXpos: true },
  'alibi (2 of 4 heads)': { alibiPosBias: true, alibiNumHeads: 2 },
  T5: { relPosBias: true },
  'dynamic, log distance': { dynamicPosBias: true, dynamicPosBiasLogDistance: true },
  'grouped-query + memory kv + rotary': { attnKvHeads: 2, attnNumMemKv: 2, rotaryPosEmb: true },
  'flash + alibi': { attnFlash: true, alibiPosBias: true },
  'qk norm + rotary': { attnQkNorm: true, rotaryPosEmb: true },
  'talking heads + T5': { attnPreTalkingHeads: true, attnPostTalkingHeads: true, relPosBias: true },
  'latent attention (cache of latents), rotary sub-heads, qk norm, memory kv': {
    attnUseLatentQ: true,
    attnDimLatentQ: 12,
    attnUseLatentKv: true,
    attnDimLatentKv: 10,
    attnLatentRopeSubheads: 2,
    attnQkNorm: true,
    attnNumMemKv: 2,
    rotaryPosEmb: true,
  },
  'queries, keys and values from three hyper-connection views + rotary': {
    numResidualStreams: 3,
    qkvReceiveDiffResiduals: true,
    rotaryPosEmb: true,
  },
};

describe('decoder cached decoding equals the uncached pass', () => {
  it('a cache continued twice (branching) keeps each continuation right', () => {
    manualSeed(3);
    const model = new TransformerWrapper({
      numTokens: 20,
      maxSeqLen: 64,
      attnLayers: new Decoder({ dim: 16, depth: 2, heads: 2, attnDimHead: 64, rotaryPosEmb: true }),
    });
    model.eval();
    const before = tf.memory().numTensors;
    tf.tidy(() => {
      const prefix = [1, 5, 7, 3, 2, 9, 11, 4, 6, 8, 10, 12, 13, 14, 15, 16, 17];
      const ids = (xs: number[]): tf.Tensor => tf.tensor2d([xs], [1, xs.length], 'int32');
      const start = model.forwardWithState(ids(prefix.slice(0, -1)), { returnCache: true }).cache!;
      // a decoding step's cache (which later steps may extend in place)
      const root = model.forwardWithState(ids(prefix), { cache: start, returnCache: true }).cache!;
      start.dispose();
      // two branches from the same cache, the second made after the first
      const a1 = model.forwardWithState(ids([...prefix, 2]), { cache: root, returnCache: true });
      const b1 = model.forwardWithState(ids([...prefix, 3]), { cache: root, returnCache: true });
      // each branch continued: its keys must be its own
      const a2 = model.forwardWithState(ids([...prefix, 2, 4]), { cache: a1.cache!, returnCache: true });
      const b2 = model.forwardWithState(ids([...prefix, 3, 5]), { cache: b1.cache!, returnCache: true });
      const again = model.forwardWithState(ids([...prefix, 2]), { cache: root, returnCache: true });
      const last = (t: tf.Tensor): tf.Tensor => tf.slice(t, [0, t.shape[1]! - 1, 0], [1, 1, -1]);
      expectClose(a2.logits, last(model.forward(ids([...prefix, 2, 4]))), 1e-5, 1e-4);
      expectClose(b2.logits, last(model.forward(ids([...prefix, 3, 5]))), 1e-5, 1e-4);
      expectClose(again.logits, a1.logits, 0, 0);
      for (const c of [root, a1.cache!, b1.cache!, a2.cache!, b2.cache!, again.cache!]) c.dispose();
    });
    expect(tf.memory().numTensors).toBe(before);
    model.dispose();
  });

  it('runs a plain step as one XtCachedAttention kernel exactly where the backend registers it', async () => {
    manualSeed(2);
    const model = new TransformerWrapper({
      numTokens: 20,
      maxSeqLen: 16,
      attnLayers: new Decoder({ dim: 16, depth: 2, heads: 2, attnDimHead: 64, rotaryPosEmb: true }),
    });
    model.eval();
    const x = tf.tensor2d([[1, 5, 7, 3]], [1, 4], 'int32');
    const st = model.forwardWithState(tf.slice(x, [0, 0], [1, 3]), { returnCache: true });
    const info = await tf.profile(() => {
      const next = model.forwardWithState(x, { cache: st.cache!, returnCache: true });
      next.cache!.dispose();
      return next.logits;
    });
    const registered = tf.getKernel(XT_CACHED_ATTENTION, tf.getBackend()) !== undefined;
    expect(registered).toBe(tf.getBackend() === 'torch');
    expect(info.kernels.filter((k) => k.name === XT_CACHED_ATTENTION).length).toBe(registered ? 2 : 0);
    st.cache!.dispose();
    tf.dispose([st.logits, x]);
    model.dispose();
  });

  it('past maxSeqLen a one-layer cache, trimmed to its window each step, equals the pass over the window', () => {
    // one layer: a token's keys and values depend on the token alone, so the trimmed cache holds
    // exactly what the window's own pass computes (the window moves within one buffer, appended in place)
    manualSeed(6);
    const maxSeqLen = 8;
    const model = new TransformerWrapper({
      numTokens: 20,
      maxSeqLen,
      attnLayers: new Decoder({ dim: 16, depth: 1, heads: 2, attnDimHead: 8, rotaryPosEmb: true }),
    });
    model.eval();
    const kinds = model.attnLayers.cachedLayerKinds();
    const before = tf.memory().numTensors;
    const seq = [1, 5, 7];
    const x0 = tf.tensor2d([seq], [1, 3], 'int32');
    const first = model.forwardWithState(x0, { returnCache: true });
    tf.dispose([x0, first.logits, first.embeddings]);
    let cache = first.cache!;
    for (let i = 0; i < 3 * maxSeqLen; i++) {
      seq.push((i * 7 + 2) % 20);
      const win = seq.slice(-maxSeqLen);
      if (seq.length > maxSeqLen && cache.seqLen > maxSeqLen - 1) {
        const trimmed = cache.trimmed(maxSeqLen - 1, kinds);
        cache.dispose();
        cache = trimmed;
      }
      tf.tidy(() => {
        const x = tf.tensor2d([win], [1, win.length], 'int32');
        const step = model.forwardWithState(x, { cache, returnCache: true });
        const full = model.forward(x);
        expectClose(step.logits, tf.slice(full, [0, win.length - 1, 0], [1, 1, -1]), 1e-5, 1e-4);
        cache.dispose();
        cache = step.cache!;
      });
    }
    cache.dispose();
    expect(tf.memory().numTensors).toBe(before);
    model.dispose();
  });

  // a prompt's prefill and a chunk of several tokens after a cache: in eval mode one kernel per layer
  // where the backend has it, with exactly the numbers of the layer's own ops (train mode, which
  // never runs it; dropout is 0); prompts of 130 positions take the flash path's blocked attention
  const fused: Record<string, object> = {
    plain: {},
    rotary: { rotaryPosEmb: true },
    'flash + rotary, value heads of 8': { attnFlash: true, rotaryPosEmb: true, attnValueDimHead: 8 },
  };
  for (const [name, extra] of Object.entries(fused))
    it(`prefill and a chunk after a cache (${name}) as one kernel per layer, same numbers`, async () => {
      manualSeed(4);
      const model = new TransformerWrapper({
        numTokens: 20,
        maxSeqLen: 160,
        attnLayers: new Decoder({ dim: 16, depth: 2, heads: 2, attnDimHead: 8, ...extra }),
      });
      const registered = tf.getKernel(XT_CACHED_ATTENTION, tf.getBackend()) !== undefined;
      const before = tf.memory().numTensors;
      for (const n of [1, 5, 130]) {
        const ids = Array.from({ length: n + 3 }, (_, i) => (i * 7 + 3) % 20);
        const x = tf.tensor2d([ids.slice(0, n)], [1, n], 'int32');
        const more = tf.tensor2d([ids], [1, n + 3], 'int32');
        // prefill, then the 3 next tokens at once; the logits and every layer's keys and values
        const run = async (train: boolean) => {
          model.train(train);
          const first = model.forwardWithState(x, { returnCache: true });
          const info = await tf.profile(() => {
            const r = model.forwardWithState(more, { cache: first.cache!, cacheAge: 3, returnCache: true });
            r.cache!.dispose();
            r.embeddings.dispose();
            return r.logits;
          });
          tf.dispose(info.result);
          const count = info.kernels.filter((k) => k.name === XT_CACHED_ATTENTION).length;
          const next = model.forwardWithState(more, { cache: first.cache!, cacheAge: 3, returnCache: true });
          const out = [first.logits, ...first.cache!.kvs.flatMap((kv) => [kv.k, kv.v])];
          out.push(next.logits, ...next.cache!.kvs.flatMap((kv) => [kv.k, kv.v]));
          const arrays = out.map((t) => t.arraySync());
          first.cache!.dispose();
          next.cache!.dispose();
          tf.dispose([first.logits, next.logits, first.embeddings, next.embeddings]);
          return { arrays, count };
        };
        const composite = await run(true);
        const one = await run(false);
        expect(composite.count).toBe(0);
        expect(one.count).toBe(registered ? 2 : 0);
        expect(one.arrays).toEqual(composite.arrays);
        tf.dispose([x, more]);
      }
      expect(tf.memory().numTensors).toBe(before);
      model.dispose();
    });

  for (const [name, extra] of Object.entries(configs)) {
    it(name, () => {
      manualSeed(1);
      const model = new TransformerWrapper({
        numTokens: 20,
        maxSeqLen: 16,
        attnLayers: new Decoder({ dim: 16, depth: 2, heads: 4, attnDimHead: 4, ...extra }),
      });
      model.eval();
      const x = tf.tensor2d([[1, 5, 7, 3, 2, 9, 11, 4]], [1, 8], 'int32');
      const before = tf.memory().numTensors;
      tf.tidy(() => {
        const full = model.forward(x);
        let st = model.forwardWithState(tf.slice(x, [0, 0], [1, 3]), { returnCache: true });
        const outs = [st.logits];
        for (let t = 4; t <= 8; t++) {
          const prev = st.cache!;
          st = model.forwardWithState(tf.slice(x, [0, 0], [1, t]), { cache: prev, returnCache: true });
          prev.dispose();
          expect(st.logits.shape).toEqual([1, 1, 20]);
          outs.push(st.logits);
        }
        st.cache!.dispose();
        expectClose(tf.concat(outs, 1), full, 1e-5, 1e-4);
      });
      expect(tf.memory().numTensors).toBe(before);
      x.dispose();
      model.dispose();
    });
  }
});
