/**
 * The BatchDecoder's cases, run on the active backend by batch-decoder.test.ts (torch where it
 * loads) and on the cpu backend by batch-decoder-cpu.test.ts.
 */
import * as tf from '@tensorflow/tfjs-core';
import { describe, expect, it } from 'vitest';
import { BatchDecoder, type BatchSequenceOptions } from '../../src/generation/batch-decoder.js';
import { XT_CACHED_ATTENTION, XT_CACHED_ATTENTION_ROWS } from '../../src/attention/attention.js';
import { decode } from '../../src/generation/generate.js';
import { Decoder } from '../../src/layers/attention-layers.js';
import type { LayersCache } from '../../src/layers/cache.js';
import { isBackendKv } from '../../src/attention/types.js';
import type { AttentionLayersOptions } from '../../src/layers/options.js';
import {
  TransformerWrapper,
  type TransformerWrapperOptions,
} from '../../src/wrappers/transformer-wrapper.js';
import { manualSeed } from '../../src/utils/random.js';

const V = 40;

function makeNet(
  layers: AttentionLayersOptions = {},
  wrapper: Partial<TransformerWrapperOptions> = {},
  seed = 3,
): TransformerWrapper {
  manualSeed(seed);
  const net = new TransformerWrapper({
    numTokens: V,
    maxSeqLen: 48,
    ...wrapper,
    attnLayers: new Decoder({ dim: 32, depth: 2, heads: 4, ...layers }),
  });
  net.eval();
  return net;
}

/** Prompts of different lengths (1 to 13 tokens). */
const PROMPTS = [
  [5],
  [1, 2, 3, 4, 5, 6, 7],
  [9, 8, 7],
  [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9],
  [7, 7],
  [2, 4, 6, 8, 10],
];

function alone(net: TransformerWrapper, prompt: number[], o: BatchSequenceOptions): number[] {
  const t = decode(net, [prompt], o.maxTokens, {
    temperature: o.temperature,
    filterLogitsFn: o.filterLogitsFn,
    filterKwargs: o.filterKwargs,
    seed: o.seed,
  });
  const out = (t.arraySync() as number[][])[0]!;
  t.dispose();
  return out;
}

/** Runs every sequence to its end; `join[i]` is the step at which sequence i is added (default 0). */
function together(
  net: TransformerWrapper,
  prompts: number[][],
  opts: BatchSequenceOptions[],
  join: number[] = [],
  removeAt: Map<number, number> = new Map(),
): number[][] {
  const d = new BatchDecoder(net, { maxBatch: prompts.length });
  const ids = new Map<number, number>();
  const tokens: number[][] = prompts.map(() => []);
  try {
    for (let step = 0; ; step++) {
      prompts.forEach((p, i) => {
        if ((join[i] ?? 0) === step) ids.set(d.add(p, opts[i]!), i);
      });
      for (const [seqId, i] of ids) if (removeAt.get(i) === step) d.remove(seqId);
      if (d.size === 0 && prompts.every((_, i) => (join[i] ?? 0) <= step)) break;
      for (const t of d.step()) {
        const i = ids.get(t.id)!;
        expect(t.index).toBe(tokens[i]!.length);
        tokens[i]!.push(t.token);
      }
    }
  } finally {
    d.dispose();
  }
  return tokens;
}

export function batchDecoderCases(backend: string): void {
  describe(`BatchDecoder (${backend}): each sequence's tokens equal those it gets alone`, () => {
    const models: [string, AttentionLayersOptions, Partial<TransformerWrapperOptions>][] = [
      ['absolute positions', {}, {}],
      [
        'rotary, grouped-query attention, memory key/values',
        { rotaryPosEmb: true, attnKvHeads: 2, attnNumMemKv: 2 },
        {},
      ],
      ['rotary over whole heads', { rotaryPosEmb: true, attnDimHead: 32 }, {}],
      ['rotary xpos', { rotaryPosEmb: true, rotaryXpos: true }, {}],
      ['alibi, RMSNorm, SwiGLU', { alibiPosBias: true, useRmsnorm: true, ffSwish: true, ffGlu: true }, {}],
      ['T5 relative position bias, tied embedding', { relPosBias: true }, { tieEmbedding: true }],
      [
        'latent attention (cached latents), decoupled rotary',
        { rotaryPosEmb: true, attnUseLatentKv: true, attnDimLatentKv: 16, attnLatentRopeSubheads: 2 },
        {},
      ],
    ];
    for (const [name, layers, wrapper] of models) {
      it(`greedy: ${name}`, () => {
        const net = makeNet(layers, wrapper);
        const before = tf.memory().numTensors;
        const opts = PROMPTS.map((_, i) => ({ maxTokens: 10 + i, temperature: 0 }));
        const want = PROMPTS.map((p, i) => alone(net, p, opts[i]!));
        // all at once, then joining at different steps
        expect(together(net, PROMPTS, opts)).toEqual(want);
        expect(together(net, PROMPTS, opts, [0, 2, 2, 5, 7, 9])).toEqual(want);
        expect(tf.memory().numTensors).toBe(before);
        net.dispose();
      });
    }

    it('each row of a step has exactly the logits of its own cached step (six rows of different lengths)', () => {
      const net = makeNet({ rotaryPosEmb: true });
      const caches: LayersCache[] = [];
      for (const p of PROMPTS) {
        const x = tf.tensor2d([p], [1, p.length], 'int32');
        const r = net.forwardWithState(x, { returnCache: true });
        x.dispose();
        r.logits.dispose();
        r.embeddings.dispose();
        caches.push(r.cache!);
      }
      const next = PROMPTS.map((_, i) => (i * 7) % V);
      const wantRows = PROMPTS.map((p, i) => {
        const x = tf.tensor2d([[...p, next[i]!]], [1, p.length + 1], 'int32');
        const r = net.forwardWithState(x, { cache: caches[i] });
        x.dispose();
        r.embeddings.dispose();
        r.cache?.dispose();
        const v = Array.from(r.logits.dataSync()).slice(-V);
        r.logits.dispose();
        return v;
      });
      const x = tf.tensor2d(next, [next.length, 1], 'int32');
      const r = net.forwardWithState(x, { rowCaches: caches });
      x.dispose();
      r.embeddings.dispose();
      const got = r.logits.arraySync() as number[][][];
      r.logits.dispose();
      got.forEach((row, i) => expect(row[0]).toEqual(wantRows[i]));
      r.rowCaches!.forEach((c, i) => expect(c.seqLen).toBe(PROMPTS[i]!.length + 1));
      for (const c of [...caches, ...r.rowCaches!]) c.dispose();
      net.dispose();
    });

    it("rows' new caches: each row's keys and values of its own steps, held as the backend's ids where the rows kernel runs, freed by dispose", () => {
      const net = makeNet({ rotaryPosEmb: true });
      const kernel = tf.getKernel(XT_CACHED_ATTENTION_ROWS, tf.getBackend()) !== undefined;
      const ids = () => tf.engine().backend.numDataIds();
      const before = ids();
      const prompts = PROMPTS.slice(1, 4);
      const prefill = (tokens: number[], cache?: LayersCache) => {
        const x = tf.tensor2d([tokens], [1, tokens.length], 'int32');
        const r = net.forwardWithState(x, cache ? { cache } : { returnCache: true });
        x.dispose();
        r.logits.dispose();
        r.embeddings.dispose();
        return r.cache!;
      };
      const step = (caches: LayersCache[], next: number[]) => {
        const x = tf.tensor2d(next, [next.length, 1], 'int32');
        const r = net.forwardWithState(x, { rowCaches: caches });
        x.dispose();
        r.logits.dispose();
        r.embeddings.dispose();
        return r.rowCaches!;
      };
      const values = (c: LayersCache) => c.kvs.map((kv) => [kv.k.arraySync(), kv.v.arraySync()]);
      const caches = prompts.map((p) => prefill(p));
      const first = step(caches, [11, 12, 13]);
      const second = step(first, [21, 22, 23]);
      for (const c of [...first, ...second])
        for (let l = 0; l < c.layers; l++) expect(isBackendKv(c.entry(l))).toBe(kernel);
      // the first step's caches are freed unread: their ids go with them
      first.forEach((c) => c.dispose());
      prompts.forEach((p, i) => {
        // the row decoded alone: its prefill, then one cached step per token
        const c0 = prefill(p);
        const c1 = prefill([...p, 11 + i], c0);
        const alone = prefill([...p, 11 + i, 21 + i], c1);
        expect(second[i]!.seqLen).toBe(p.length + 2);
        expect(values(second[i]!)).toEqual(values(alone));
        for (const c of [c0, c1, alone]) c.dispose();
      });
      for (const c of [...caches, ...second]) c.dispose();
      expect(ids()).toBe(before);
      net.dispose();
    });

    it('seeded sampling: per-sequence temperature, filter and seed give the tokens of the sequence alone', () => {
      const net = makeNet({ rotaryPosEmb: true });
      const opts: BatchSequenceOptions[] = [
        { maxTokens: 12, temperature: 1, seed: 1 },
        { maxTokens: 9, temperature: 0.7, filterLogitsFn: 'topP', filterKwargs: { thres: 0.8 }, seed: 2 },
        { maxTokens: 12, temperature: 1, seed: 3 },
        { maxTokens: 11, temperature: 0 },
        { maxTokens: 10, temperature: 1.3, filterLogitsFn: 'minP', filterKwargs: { minP: 0.05 }, seed: 4 },
        { maxTokens: 12, temperature: 1, filterLogitsFn: 'topK', filterKwargs: { k: 5 }, seed: 1 },
      ];
      const want = PROMPTS.map((p, i) => alone(net, p, opts[i]!));
      expect(together(net, PROMPTS, opts, [0, 1, 0, 3, 3, 4])).toEqual(want);
      net.dispose();
    });

    it('a removed sequence leaves the others as they are alone; eosToken ends a sequence with it', () => {
      const net = makeNet({ rotaryPosEmb: true });
      const opts = PROMPTS.map((_, i) => ({ maxTokens: 12, temperature: 0, seed: i }));
      const want = PROMPTS.map((p, i) => alone(net, p, opts[i]!));
      const got = together(net, PROMPTS, opts, [], new Map([[1, 3]]));
      expect(got[1]).toEqual(want[1]!.slice(0, 3));
      got.forEach((g, i) => i !== 1 && expect(g).toEqual(want[i]));

      const eos = want[0]![4]!;
      const stop = want[0]!.indexOf(eos) + 1;
      const d = new BatchDecoder(net);
      const id = d.add(PROMPTS[0]!, { maxTokens: 12, temperature: 0, eosToken: eos });
      const seen: number[] = [];
      let done: string | undefined;
      while (d.has(id)) {
        const [t] = d.step();
        seen.push(t!.token);
        done = t!.done;
      }
      expect(seen).toEqual(want[0]!.slice(0, stop));
      expect(done).toBe('eos');
      d.dispose();
      net.dispose();
    });

    it("a sequence that joins is prefilled first in its step: its first token comes before the others'", () => {
      const net = makeNet({ rotaryPosEmb: true });
      const d = new BatchDecoder(net);
      const a = d.add(PROMPTS[0]!, { maxTokens: 8, temperature: 0 });
      const b = d.add(PROMPTS[1]!, { maxTokens: 8, temperature: 0 });
      d.step();
      const c = d.add(PROMPTS[2]!, { maxTokens: 8, temperature: 0 });
      expect(d.step().map((t) => [t.id, t.index])).toEqual([
        [c, 0],
        [a, 1],
        [b, 1],
      ]);
      d.dispose();
      net.dispose();
    });

    it('prefillQueued gives the queued sequences their first tokens alone; they run in the next step, with the tokens they get alone', () => {
      const net = makeNet({ rotaryPosEmb: true });
      const opts: BatchSequenceOptions = { maxTokens: 6, temperature: 0 };
      const want = PROMPTS.slice(0, 3).map((p) => alone(net, p, opts));
      const d = new BatchDecoder(net);
      const a = d.add(PROMPTS[0]!, opts);
      const b = d.add(PROMPTS[1]!, opts);
      const got = new Map<number, number[]>([
        [a, []],
        [b, []],
      ]);
      const take = (ts: { id: number; token: number }[]) => ts.forEach((t) => got.get(t.id)!.push(t.token));
      take(d.step());
      take(d.step());
      const c = d.add(PROMPTS[2]!, opts);
      got.set(c, []);
      expect(d.queued).toBe(1);
      const firsts = d.prefillQueued();
      // only the queued one: the running ones do not advance
      expect(firsts.map((t) => [t.id, t.index])).toEqual([[c, 0]]);
      expect(d.queued).toBe(0);
      expect(d.prefillQueued()).toEqual([]);
      take(firsts);
      const next = d.step();
      expect(next.map((t) => [t.id, t.index])).toEqual([
        [a, 2],
        [b, 2],
        [c, 1],
      ]);
      take(next);
      while (d.size) take(d.step());
      expect([got.get(a), got.get(b), got.get(c)]).toEqual(want);
      d.dispose();
      net.dispose();
    });

    it('a step runs each self-attention layer as one XtCachedAttentionRows kernel where it applies', async () => {
      const registered = tf.getKernel(XT_CACHED_ATTENTION_ROWS, tf.getBackend()) !== undefined;
      expect(registered).toBe(tf.getBackend() === 'torch');
      const cases: [AttentionLayersOptions, boolean][] = [
        [{ rotaryPosEmb: true }, true],
        [{}, true],
        // position biases and grouped-query attention run row by row
        [{ alibiPosBias: true }, false],
        [{ attnKvHeads: 2 }, false],
      ];
      for (const [layers, applies] of cases) {
        const net = makeNet(layers);
        const d = new BatchDecoder(net);
        PROMPTS.slice(0, 3).forEach((p) => d.add(p, { maxTokens: 5, temperature: 0 }));
        d.step(); // the prefills
        const info = await tf.profile(() => {
          d.step();
        });
        const count = (name: string) => info.kernels.filter((k) => k.name === name).length;
        // depth 2: one kernel per layer for all rows, or one per layer and row
        expect(count(XT_CACHED_ATTENTION_ROWS)).toBe(registered && applies ? 2 : 0);
        // the rows' new keys and values are no tensors: the kernel's one output is the rows' attention
        for (const k of info.kernels.filter((k) => k.name === XT_CACHED_ATTENTION_ROWS))
          expect(k.outputShapes).toEqual([[3, 1, 32]]);
        if (applies) expect(count(XT_CACHED_ATTENTION)).toBe(0);
        d.dispose();
        net.dispose();
      }
    });

    it('rotary: rows whose position tables grow at different steps', () => {
      const net = makeNet({ rotaryPosEmb: true }, { maxSeqLen: 160 });
      // the first row passes 64 positions (its tables are made again, for 128) while the others do not
      const prompts = [Array.from({ length: 58 }, (_, i) => (i * 5) % V), PROMPTS[1]!, PROMPTS[3]!];
      const opts = prompts.map(() => ({ maxTokens: 12, temperature: 0 }));
      const want = prompts.map((p, i) => alone(net, p, opts[i]!));
      expect(together(net, prompts, opts, [0, 3, 1])).toEqual(want);
      net.dispose();
    });

    it('rotary: past maxSeqLen the window slides as it does alone', () => {
      const net = makeNet({ rotaryPosEmb: true }, { maxSeqLen: 12 });
      const prompts = [PROMPTS[3]!, PROMPTS[1]!];
      const opts = [
        { maxTokens: 8, temperature: 0 },
        { maxTokens: 9, temperature: 0 },
      ];
      const want = prompts.map((p, i) => alone(net, p, opts[i]!));
      expect(together(net, prompts, opts)).toEqual(want);
      net.dispose();
    });

    it('models the rows path cannot decode are named, with the reason', () => {
      const cases: [AttentionLayersOptions, Partial<TransformerWrapperOptions>, RegExp][] = [
        [{}, { numMemoryTokens: 2 }, /memory tokens/],
        [{ numResidualStreams: 2 }, {}, /residual streams/],
        [{ residualAttn: true }, {}, /residualAttn/],
        [{}, { embDim: 16 }, /embDim/],
      ];
      for (const [layers, wrapper, reason] of cases) {
        const net = makeNet(layers, wrapper);
        expect(BatchDecoder.unsupported(net)).toMatch(reason);
        expect(() => new BatchDecoder(net)).toThrow(reason);
        net.dispose();
      }
      const ok = makeNet({ rotaryPosEmb: true });
      expect(BatchDecoder.unsupported(ok)).toBeNull();
      ok.dispose();
    });

    it('bad arguments throw errors naming them', () => {
      const net = makeNet();
      const d = new BatchDecoder(net, { maxBatch: 1 });
      expect(() => d.add([], { maxTokens: 2 })).toThrow(/prompt: expected at least one token id/);
      expect(() => d.add([V], { maxTokens: 2 })).toThrow(/prompt: expected token ids in \[0, 40\), got 40/);
      expect(() => d.add([1], { maxTokens: 0 })).toThrow(/maxTokens: expected a positive integer, got 0/);
      expect(() => d.add([1], { maxTokens: 2, temperature: -1 })).toThrow(/temperature/);
      expect(() => d.add([1], { maxTokens: 49 })).toThrow(/maxTokens: the model cannot use cached keys/);
      expect(() => d.add([1], { maxTokens: 2, filterLogitsFn: 'topK', filterKwargs: { k: 0 } })).toThrow(
        /k: expected/,
      );
      d.add([1], { maxTokens: 2 });
      expect(() => d.add([1], { maxTokens: 2 })).toThrow(/add: the decoder is full \(maxBatch 1/);
      expect(() => new BatchDecoder(net, { maxBatch: 0 })).toThrow(/maxBatch: expected a positive integer/);
      d.dispose();
      expect(() => d.step()).toThrow(/after dispose/);
      net.dispose();
    });
  });
}
