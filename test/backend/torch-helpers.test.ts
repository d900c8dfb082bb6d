import os from 'node:os';
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import { describe, expect, it } from 'vitest';
import { useTorchBackend } from './use-torch.js';
import { loadAddon } from '../../src/backend/torch/native.js';
import { Decoder } from '../../src/layers/attention-layers.js';
import type { BackendKv } from '../../src/attention/types.js';
import type { LayersCache } from '../../src/layers/cache.js';
import type { TorchBackend } from '../../src/backend/torch/backend.js';
import { AdamW } from '../../src/train/optimizer.js';
import { manualSeed } from '../../src/utils/random.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { createMetrics } from '../../workers/metrics.js';

// The torch backend's helper threads: a batched decoding step shares its products and its attention
// with them, and every row keeps the numbers it has alone, whoever computed which part.

useTorchBackend();

const V = 300;
const DEPTH = 2;
// eight prompts of 30 to 44 tokens: rows of different lengths, each step's products and attention
// large enough to be shared (8 rows by 256-wide weights; 8 rows of 4 heads over 30+ positions)
const PROMPTS = Array.from({ length: 8 }, (_, i) =>
  Array.from({ length: 30 + 2 * i }, (_, j) => (7 * i + 13 * j + 1) % V),
);

function makeNet(maxSeqLen = 64): TransformerWrapper {
  manualSeed(11);
  const net = new TransformerWrapper({
    numTokens: V,
    maxSeqLen,
    attnLayers: new Decoder({ dim: 256, depth: DEPTH, heads: 4, rotaryPosEmb: true }),
  });
  net.eval();
  return net;
}

function prefill(net: TransformerWrapper, prompt: number[]): LayersCache {
  const x = tf.tensor2d([prompt], [1, prompt.length], 'int32');
  const r = net.forwardWithState(x, { returnCache: true });
  x.dispose();
  r.logits.dispose();
  r.embeddings.dispose();
  return r.cache!;
}

/** Each row's logits for `steps` tokens decoded alone on its own cache (no product is shared). */
function aloneLogits(net: TransformerWrapper, tokens: number[][], prompts = PROMPTS): number[][][] {
  return prompts.map((p, i) => {
    let cache = prefill(net, p);
    const seq = [...p];
    const out: number[][] = [];
    for (const t of tokens) {
      seq.push(t[i]!);
      const x = tf.tensor2d([seq], [1, seq.length], 'int32');
      const r = net.forwardWithState(x, { cache });
      x.dispose();
      r.embeddings.dispose();
      cache.dispose();
      cache = r.cache!;
      out.push(Array.from(r.logits.dataSync()).slice(-V));
      r.logits.dispose();
    }
    cache.dispose();
    return out;
  });
}

/** The same steps with the rows together (the eight, or `prompts`'): logits [row][step][V]. */
function batchedLogits(net: TransformerWrapper, tokens: number[][], prompts = PROMPTS): number[][][] {
  let caches = prompts.map((p) => prefill(net, p));
  const out: number[][][] = prompts.map(() => []);
  for (const t of tokens) {
    const x = tf.tensor2d(t, [t.length, 1], 'int32');
    const r = net.forwardWithState(x, { rowCaches: caches });
    x.dispose();
    r.embeddings.dispose();
    const rows = r.logits.arraySync() as number[][][];
    r.logits.dispose();
    rows.forEach((row, i) => out[i]!.push(row[0]!));
    for (const c of caches) c.dispose();
    caches = r.rowCaches!;
  }
  for (const c of caches) c.dispose();
  return out;
}

/**
 * The jobs `steps` batched steps share: per step and layer the projections (q, k and v in one
 * product, then the attention's output), the attention and the two feedforward products, then the
 * output layer's product. The first step too shares each layer's attention: it copies the
 * prompt's cache into buffers that later steps append to in place, on the path that shares it.
 */
const sharedJobs = (steps: number) => steps * (5 * DEPTH + 1);

const N = () => loadAddon();
const expected = Number(
  process.env.XT_HELPER_THREADS ?? Math.min(3, Math.max(0, os.availableParallelism() - 1)),
);

/**
 * The rows' prompts prefilled, then one batched step per entry of `tokens` (each row's token), with
 * each row's logits checked against `want[row][step]`; `beforeStep` may replace the caches before a
 * step (it owns the ones it replaces). Returns the helpers' jobs and chunks of each step.
 */
function batchedSteps(
  net: TransformerWrapper,
  prompts: number[][],
  tokens: number[][],
  want: number[][][],
  beforeStep: (caches: LayersCache[]) => LayersCache[] = (c) => c,
): { jobs: number; chunks: number }[] {
  let caches = prompts.map((p) => prefill(net, p));
  const shared: { jobs: number; chunks: number }[] = [];
  tokens.forEach((t, s) => {
    caches = beforeStep(caches);
    const before = N().helpers();
    const x = tf.tensor2d(t, [t.length, 1], 'int32');
    const r = net.forwardWithState(x, { rowCaches: caches });
    x.dispose();
    r.embeddings.dispose();
    const after = N().helpers();
    shared.push({ jobs: after.jobs - before.jobs, chunks: after.chunks - before.chunks });
    const rows = r.logits.arraySync() as number[][][];
    r.logits.dispose();
    rows.forEach((row, i) => expect(row[0], `row ${i}, step ${s}`).toEqual(want[i]![s]));
    for (const c of caches) c.dispose();
    caches = r.rowCaches!;
  });
  for (const c of caches) c.dispose();
  return shared;
}

describe('torch backend helper threads', () => {
  it('starts one helper per CPU beyond the first, at most 3 (XT_HELPER_THREADS sets it)', () => {
    expect(N().helpers().threads).toBe(expected);
  });

  it.runIf(process.platform === 'linux')('names its helper threads xt-helper (what /proc shows)', () => {
    N().helpers(); // started on first use
    const names = readdirSync(`/proc/${process.pid}/task`).map((tid) =>
      readFileSync(`/proc/${process.pid}/task/${tid}/comm`, 'utf8').trim(),
    );
    expect(names.filter((n) => n === 'xt-helper')).toHaveLength(expected);
  });

  it.runIf(expected > 0)(
    'rows decoded together keep their own logits when the helpers compute every shared chunk',
    () => {
      const net = makeNet();
      const tokens = [0, 1, 2].map((s) => PROMPTS.map((_, i) => (31 * i + 17 * s) % V));
      const want = aloneLogits(net, tokens);
      const before = N().helpers();
      const prev = N().setHelpersOnly(true);
      let got: number[][][];
      try {
        got = batchedLogits(net, tokens);
      } finally {
        N().setHelpersOnly(prev);
      }
      const after = N().helpers();
      got.forEach((row, i) => row.forEach((step, s) => expect(step).toEqual(want[i]![s])));
      expect(after.jobs - before.jobs).toBe(sharedJobs(tokens.length));
      expect(after.helperChunks - before.helperChunks).toBe(after.chunks - before.chunks);
      expect(after.takenBack).toBe(before.takenBack);
      net.dispose();
    },
  );

  it.runIf(expected > 0)(
    "a worker's /metrics counts the shared chunks by the thread that computed them",
    async () => {
      const metrics = createMetrics();
      const read = async () => {
        const text = await metrics.registry.metrics();
        const value = (re: RegExp) => Number(re.exec(text)?.[1] ?? NaN);
        return {
          threads: value(/^xt_compute_helper_threads (\d+)$/m),
          caller: value(/^xt_compute_shared_chunks_total\{by="caller"\} (\d+)$/m),
          helper: value(/^xt_compute_shared_chunks_total\{by="helper"\} (\d+)$/m),
          takenBack: value(/^xt_compute_shared_chunks_taken_back_total (\d+)$/m),
        };
      };
      const net = makeNet();
      const tokens = [0, 1].map((s) => PROMPTS.map((_, i) => (13 * i + 7 * s + 2) % V));
      const before = await read();
      const chunksBefore = N().helpers().chunks;
      const prev = N().setHelpersOnly(true);
      try {
        batchedLogits(net, tokens);
      } finally {
        N().setHelpersOnly(prev);
      }
      const chunks = N().helpers().chunks - chunksBefore;
      const after = await read();
      expect(after.threads).toBe(expected);
      // every chunk of those steps went to a helper: none to the decoding thread, none taken back
      expect(chunks).toBeGreaterThan(0);
      expect(after.helper - before.helper).toBe(chunks);
      expect(after.caller - before.caller).toBe(0);
      expect(after.takenBack - before.takenBack).toBe(0);
      // shared as they come: whoever computed them, every chunk is counted once
      batchedLogits(net, tokens);
      const last = await read();
      expect(last.caller + last.helper - after.caller - after.helper).toBe(
        N().helpers().chunks - chunksBefore - chunks,
      );
      net.dispose();
    },
  );

  it.runIf(expected > 0)('and when the caller and the helpers share the chunks as they come', () => {
    const net = makeNet();
    const tokens = Array.from({ length: 6 }, (_, s) => PROMPTS.map((_, i) => (5 * i + 29 * s + 3) % V));
    const want = aloneLogits(net, tokens);
    const before = N().helpers();
    const got = batchedLogits(net, tokens);
    got.forEach((row, i) => row.forEach((step, s) => expect(step).toEqual(want[i]![s])));
    expect(N().helpers().jobs - before.jobs).toBe(sharedJobs(tokens.length));
    net.dispose();
  });

  // fewer rows than the products' blocks of eight: the rows left after the blocks go through the
  // panels in one more pass (7 rows, 5 rows), and products of 4 rows or more by a 256 x 256 weight
  // are shared too (the attention's output, the output layer's); with 3 rows only q, k and v's
  // product (by their three weights at once) and the feedforward products are large enough, and
  // the attention over their positions is not
  it.runIf(expected > 0).each([
    [7, sharedJobs(3)],
    [5, sharedJobs(3)],
    [3, 3 * 3 * DEPTH],
  ])(
    '%i rows decoded together keep their own logits, with the helpers computing every shared chunk',
    (rows, jobs) => {
      const net = makeNet();
      const prompts = PROMPTS.slice(0, rows);
      const tokens = [0, 1, 2].map((s) => prompts.map((_, i) => (11 * i + 23 * s + 5) % V));
      const want = aloneLogits(net, tokens, prompts);
      const before = N().helpers();
      const prev = N().setHelpersOnly(true);
      let got: number[][][];
      try {
        got = batchedLogits(net, tokens, prompts);
      } finally {
        N().setHelpersOnly(prev);
      }
      const after = N().helpers();
      got.forEach((row, i) => row.forEach((step, s) => expect(step).toEqual(want[i]![s])));
      expect(after.jobs - before.jobs).toBe(jobs);
      expect(after.helperChunks - before.helperChunks).toBe(after.chunks - before.chunks);
      net.dispose();
    },
  );

  // a row's keys and values live in buffers with room for as many positions again: a row whose
  // buffer is full is copied into a larger one (its keys' rotations with it) inside the step, which
  // still takes the path that shares the attention (a chunk per row); 5 rows of 30 to 38 positions
  // fill their first buffers (62 to 78 positions) within 44 steps (maxSeqLen 128: no row slides)
  it.runIf(expected > 0)(
    'rows whose buffers fill up keep their own logits, and every step shares the same work',
    () => {
      const net = makeNet(128);
      const prompts = PROMPTS.slice(0, 5).map((p, i) => p.slice(0, 30 + 2 * i));
      const tokens = Array.from({ length: 44 }, (_, s) => prompts.map((_, i) => (13 * i + 7 * s + 3) % V));
      const want = aloneLogits(net, tokens, prompts);
      const shared = batchedSteps(net, prompts, tokens, want);
      expect(shared).toEqual(tokens.map(() => ({ jobs: sharedJobs(1), chunks: shared[0]!.chunks })));
      net.dispose();
    },
  );

  // past maxSeqLen each row keeps its last maxSeqLen - 1 positions (as generate does): its cache is a
  // window of its buffer's last positions, whose keys turn by new positions every step; the step
  // appends to the window in place, turns the keys on the fly, and still shares the attention
  it.runIf(expected > 0)(
    'rows past maxSeqLen (sliding windows) keep their own logits, and every step shares the same work',
    () => {
      const net = makeNet(); // maxSeqLen 64
      const maxLen = net.maxSeqLen;
      const kinds = net.attnLayers.cachedLayerKinds();
      // 5 rows of 56 to 64 positions: every row slides within the 30 steps, the last from the first
      const prompts = PROMPTS.slice(0, 5).map((p, i) =>
        Array.from({ length: 56 + 2 * i }, (_, j) => p[j % p.length]!),
      );
      const tokens = Array.from({ length: 30 }, (_, s) => prompts.map((_, i) => (17 * i + 5 * s + 1) % V));
      const slide = (cache: LayersCache, length: number): LayersCache => {
        if (length <= maxLen || cache.seqLen <= maxLen - 1) return cache;
        const trimmed = cache.trimmed(maxLen - 1, kinds);
        cache.dispose();
        return trimmed;
      };
      // alone: each row's window of its last maxSeqLen tokens, on its own trimmed cache
      const want = prompts.map((p, i) => {
        let cache = prefill(net, p);
        const seq = [...p];
        return tokens.map((t) => {
          seq.push(t[i]!);
          cache = slide(cache, seq.length);
          const x = tf.tensor2d([seq.slice(-maxLen)], [1, Math.min(seq.length, maxLen)], 'int32');
          const r = net.forwardWithState(x, { cache });
          x.dispose();
          r.embeddings.dispose();
          cache.dispose();
          cache = r.cache!;
          const out = Array.from(r.logits.dataSync()).slice(-V);
          r.logits.dispose();
          return out;
        });
      });
      const lengths = prompts.map((p) => p.length);
      const shared = batchedSteps(net, prompts, tokens, want, (caches) =>
        caches.map((c, i) => slide(c, ++lengths[i]!)),
      );
      expect(lengths.every((n) => n > maxLen)).toBe(true);
      expect(shared).toEqual(tokens.map(() => ({ jobs: sharedJobs(1), chunks: shared[0]!.chunks })));
      net.dispose();
    },
  );

  it("q, k and v's joint panels follow an in-place update of one of their weights", () => {
    const make = () => {
      manualSeed(5);
      const m = new TransformerWrapper({
        numTokens: 50,
        maxSeqLen: 32,
        attnLayers: new Decoder({ dim: 64, depth: 1, heads: 2, rotaryPosEmb: true }),
      });
      m.eval();
      return m;
    };
    // a prompt's cache, then one cached decoding step (its projections read the joint panels)
    const step = (m: TransformerWrapper): number[] => {
      const cache = prefill(m, [1, 2, 3, 4, 5]);
      const x = tf.tensor2d([[1, 2, 3, 4, 5, 7]], [1, 6], 'int32');
      const r = m.forwardWithState(x, { cache });
      const out = Array.from(r.logits.dataSync()).slice(-50);
      tf.dispose([x, r.logits, r.embeddings]);
      cache.dispose();
      r.cache!.dispose();
      return out;
    };
    const net = make();
    const before = step(net);
    const [name, wk] = net.namedParameters().find(([n]) => n.endsWith('to_k.weight'))!;
    const opt = new AdamW([[name, wk]], { learningRate: 0.05, weightDecay: 0 });
    const g = tf.tensor2d(
      Array.from({ length: wk.size }, (_, i) => Math.sin(i)),
      wk.shape as [number, number],
    );
    // the first step makes the optimizer's moments; the second updates the weight in place
    opt.apply({ [name]: g });
    const id = (tf.backend() as TorchBackend).id(wk);
    opt.apply({ [name]: g });
    expect((tf.backend() as TorchBackend).id(wk)).toBe(id);
    const after = step(net);
    // the same weights' values in a new model (new memory): panels made from them afresh
    const fresh = make();
    const values = Object.fromEntries(
      Object.entries(net.stateDict()).map(([k, v]) => [k, tf.tensor(v.dataSync(), v.shape, v.dtype)]),
    );
    fresh.loadStateDict(values);
    tf.dispose(Object.values(values));
    expect(after).toEqual(step(fresh));
    expect(after).not.toEqual(before);
    tf.dispose(g);
    opt.dispose();
    net.dispose();
    fresh.dispose();
  });

  it('XT_HELPER_THREADS=0 starts none, and a bad value fails the backend with its name', () => {
    const script =
      "import { loadAddon } from './src/backend/torch/native.ts'; " +
      "import { registerTorchBackend } from './src/backend/torch/register.ts'; " +
      'const r = registerTorchBackend(); ' +
      'console.log(JSON.stringify(r.ok ? loadAddon().helpers() : { reason: r.reason }));';
    const run = (value: string) =>
      spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
        env: { ...process.env, XT_HELPER_THREADS: value },
        encoding: 'utf8',
      });
    const none = run('0');
    expect(none.status, none.stderr).toBe(0);
    expect(JSON.parse(none.stdout.trim().split('\n').pop()!)).toMatchObject({ threads: 0, jobs: 0 });
    const bad = run('many');
    expect(bad.status, bad.stderr).toBe(0);
    expect(JSON.parse(bad.stdout.trim().split('\n').pop()!).reason).toContain(
      'XT_HELPER_THREADS: expected an integer from 0 to 64, got "many"',
    );
  });
});

describe('torch backend decoding caches', () => {
  // Past maxSeqLen a row keeps a window of its last maxSeqLen - 1 positions. A view that covers less
  // than half of a large storage is otherwise copied when the addon stores it (so that it does not
  // keep the rest alive); a window of a cache's own buffer stays a view, so that the next step
  // writes its new position into that buffer in place instead of copying the window twice.
  it('a sliding window stays a view of its buffer, and the next step appends to that buffer in place', () => {
    const net = makeNet(128);
    const kinds = net.attnLayers.cachedLayerKinds();
    const step = (cache: LayersCache, token: number): LayersCache => {
      const x = tf.tensor2d([[token]], [1, 1], 'int32');
      const r = net.forwardWithState(x, { rowCaches: [cache] });
      x.dispose();
      r.embeddings.dispose();
      r.logits.dispose();
      return r.rowCaches![0]!;
    };
    const keys = (c: LayersCache) => (c.entry(0) as BackendKv).k;
    // a 127-token prompt: the first step copies it into a buffer of 256 positions and appends the
    // 128th; the window of the last 127 positions is 127 KiB of keys per layer, under half of that
    // buffer's 256 KiB
    const prompt = Array.from({ length: 127 }, (_, j) => (11 * j + 3) % V);
    const prompted = prefill(net, prompt);
    const full = step(prompted, 7);
    prompted.dispose();
    expect(full.seqLen).toBe(128);
    const window = full.trimmed(127, kinds);
    expect(N().storageUseCount(keys(window))).toBe(N().storageUseCount(keys(full)));
    expect(N().storageUseCount(keys(window))).toBeGreaterThan(1);
    full.dispose();
    const before = N().storageUseCount(keys(window));
    const next = step(window, 9);
    // the step's keys are one more position of the window's buffer: one more view of its storage
    expect(next.seqLen).toBe(128);
    expect(N().storageUseCount(keys(window))).toBe(before + 1);
    expect(N().storageUseCount(keys(next))).toBe(before + 1);
    window.dispose();
    next.dispose();
    net.dispose();
  });
});
