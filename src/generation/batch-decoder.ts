/**
 * Continuous batching: one decoder holds many sequences of different lengths and advances all of
 * them with one forward pass per step. A sequence joins at the next step (its prompt is prefilled
 * alone first), leaves when it samples its eosToken, reaches its maxTokens or is removed, and keeps
 * its own sampling options and seeded generator.
 *
 * Each sequence keeps its own KV cache (a `LayersCache` of one row). A step embeds every row's last
 * token at its own position, runs the feedforward, norms and output layers on all rows at once and
 * attention row by row over each row's cache (`TransformerWrapper.forwardWithState` with
 * `rowCaches`, whose matrix products are computed row by row: `rowStableProducts`). So a sequence's
 * numbers, and therefore its tokens, greedy or seeded, are those that `decode` gives it alone.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { LayersCache } from '../layers/cache.js';
import type { TransformerWrapper } from '../wrappers/transformer-wrapper.js';
import { Rng } from '../utils/random.js';
import { smallOps } from '../backend/index.js';
import { argmaxRows, checkTemperature, divideByTemperature, multinomialRows } from './sampling.js';
import {
  FILTER_LOGITS_FN,
  resolveFilter,
  topK,
  type FilterFn,
  type FilterKwargs,
  type FilterName,
} from './filters.js';

/** Options of one sequence of a `BatchDecoder` (as `generate`'s, per sequence). */
export interface BatchSequenceOptions {
  /** most new tokens (required) */
  maxTokens: number;
  /** 0 = greedy (argmax); default 1 */
  temperature?: number;
  /** a built-in filter name (top_k, top_p, top_a, min_p) or a function; default top-k */
  filterLogitsFn?: FilterName | FilterFn;
  filterKwargs?: FilterKwargs;
  /** seed of this sequence's sampler (default 0) */
  seed?: number;
  /** the sequence ends once it samples this token (reported as its last token) */
  eosToken?: number;
}

/** A token of one sequence; `done` is set on its last one. */
export interface BatchToken {
  id: number;
  /** index of the token among the sequence's new tokens */
  index: number;
  token: number;
  done?: 'eos' | 'length';
}

/** Something that is, or wraps (`.net`), a token model. */
export type BatchModel = TransformerWrapper | { net: TransformerWrapper };

interface Sequence {
  id: number;
  /** prompt and new tokens */
  tokens: number[];
  produced: number;
  maxTokens: number;
  eosToken?: number;
  temperature: number;
  filter: FilterFn;
  filterKwargs: FilterKwargs;
  /** groups sequences that sample alike */
  sampleKey: string;
  rng: Rng;
  cache: LayersCache | null;
}

const BUILTIN = new Map<FilterFn, string>(Object.entries(FILTER_LOGITS_FN).map(([k, f]) => [f, k]));
let customFilters = 0;
const customKeys = new WeakMap<FilterFn, string>();

function netOf(m: BatchModel): TransformerWrapper {
  return 'net' in m && !('forwardWithState' in m) ? m.net : (m as TransformerWrapper);
}

/** How a sequence samples, as a key: sequences with equal keys sample from one filtered batch. */
function sampleKeyOf(temperature: number, spec: FilterName | FilterFn, kwargs: FilterKwargs): string {
  if (temperature === 0) return 'greedy';
  let name = typeof spec === 'string' ? spec : BUILTIN.get(spec);
  if (name === undefined) {
    const fn = spec as FilterFn;
    if (!customKeys.has(fn)) customKeys.set(fn, `custom${customFilters++}`);
    name = customKeys.get(fn)!;
  }
  const kw = Object.keys(kwargs)
    .sort()
    .map((k) => `${k}=${kwargs[k]}`);
  return `${temperature}|${name.replace('_', '').toLowerCase()}|${kw.join(',')}`;
}

/**
 * Decodes a changing set of sequences together (continuous batching). `add` queues a prompt,
 * `step` prefills the queued ones and advances every sequence by one token, `remove` drops one
 * (freeing its cache at once). `dispose` frees everything.
 *
 * Models whose options the rows path cannot follow (`BatchDecoder.unsupported(model)` says why,
 * e.g. cross-attention, memory tokens, hyper-connections) are decoded one request at a time with
 * `decode` / `generateStream` instead.
 */
export class BatchDecoder {
  readonly net: TransformerWrapper;
  /** most sequences at once */
  readonly maxBatch: number;
  private readonly seqs = new Map<number, Sequence>();
  private nextId = 0;
  private disposed = false;

  /** Why `model` cannot be decoded by a BatchDecoder, or null when it can. */
  static unsupported(model: BatchModel): string | null {
    return netOf(model).rowsUnsupported;
  }

  constructor(model: BatchModel, options: { maxBatch?: number } = {}) {
    const net = netOf(model);
    const why = net.rowsUnsupported;
    if (why) throw new Error(`model: cannot decode sequences together: ${why}`);
    const maxBatch = options.maxBatch ?? 32;
    if (!Number.isInteger(maxBatch) || maxBatch < 1)
      throw new Error(`maxBatch: expected a positive integer, got ${maxBatch}`);
    this.net = net;
    this.maxBatch = maxBatch;
  }

  /** Sequences held (running and waiting for their prefill). */
  get size(): number {
    return this.seqs.size;
  }

  has(id: number): boolean {
    return this.seqs.has(id);
  }

  /**
   * Queues a sequence; its prompt (token ids) is prefilled at the next `step`, which also yields its
   * first token. Returns its id. Throws when the decoder is full or an option is invalid.
   */
  add(prompt: number[], options: BatchSequenceOptions): number {
    if (this.disposed) throw new Error('BatchDecoder: used after dispose');
    if (this.seqs.size >= this.maxBatch)
      throw new Error(`add: the decoder is full (maxBatch ${this.maxBatch} sequences)`);
    const net = this.net;
    if (!Array.isArray(prompt) || prompt.length === 0)
      throw new Error(`prompt: expected at least one token id, got ${JSON.stringify(prompt)}`);
    prompt.forEach((id) => {
      if (!Number.isInteger(id) || id < 0 || id >= net.numTokens)
        throw new Error(`prompt: expected token ids in [0, ${net.numTokens}), got ${id}`);
    });
    const { maxTokens, eosToken, seed } = options;
    if (!Number.isInteger(maxTokens) || maxTokens < 1)
      throw new Error(`maxTokens: expected a positive integer, got ${maxTokens}`);
    const temperature = checkTemperature(options.temperature ?? 1);
    if (eosToken !== undefined && (!Number.isInteger(eosToken) || eosToken < 0 || eosToken >= net.numTokens))
      throw new Error(`eosToken: expected a token id in [0, ${net.numTokens}), got ${eosToken}`);
    if (seed !== undefined && !Number.isFinite(seed))
      throw new Error(`seed: expected a finite number, got ${seed}`);
    if (prompt.length + maxTokens - 1 > net.maxSeqLen && !net.canCacheKvOutsideMaxSeqLen)
      throw new Error(
        `maxTokens: the model cannot use cached keys/values past maxSeqLen ${net.maxSeqLen} (prompt ${prompt.length} + maxTokens ${maxTokens} - 1 tokens) because it uses absolute positional embeddings`,
      );
    const spec = options.filterLogitsFn ?? topK;
    const filter = resolveFilter(spec);
    const filterKwargs = options.filterKwargs ?? {};
    // check a built-in filter's kwargs now rather than at the first step
    if (temperature > 0 && (typeof spec === 'string' || BUILTIN.has(spec)))
      tf.tidy(() => {
        filter(tf.fill([1, net.numTokens], 0), filterKwargs);
      });
    const id = this.nextId++;
    this.seqs.set(id, {
      id,
      tokens: [...prompt],
      produced: 0,
      maxTokens,
      eosToken,
      temperature,
      filter,
      filterKwargs,
      sampleKey: sampleKeyOf(temperature, spec, filterKwargs),
      rng: new Rng(seed ?? 0),
      cache: null,
    });
    return id;
  }

  /** Drops a sequence (cancelled, stopped by its caller) and frees its cache; unknown ids are ignored. */
  remove(id: number): void {
    const s = this.seqs.get(id);
    if (!s) return;
    s.cache?.dispose();
    this.seqs.delete(id);
  }

  /** Sequences added and not prefilled yet: their prompts wait for the next `step` or `prefillQueued`. */
  get queued(): number {
    let n = 0;
    for (const s of this.seqs.values()) if (!s.cache) n++;
    return n;
  }

  /**
   * One step: prefills the queued sequences (each alone) and advances the running ones together by
   * one token. Returns one token per sequence, the queued ones' first: their prefills run first, so
   * that a new sequence's first token does not wait for the others' step (its time to first token),
   * while the step takes as long either way. Sequences whose token is their last (`done`) are
   * dropped.
   */
  step(): BatchToken[] {
    return this.run(true);
  }

  /**
   * Prefills the queued sequences (each alone) and returns their first tokens, without a step of the
   * running ones; the prefilled sequences run in the next `step`. So a caller can hand out the first
   * tokens before the batched step rather than after it. Each sequence's tokens are the same either way.
   */
  prefillQueued(): BatchToken[] {
    return this.run(false);
  }

  private run(stepRunning: boolean): BatchToken[] {
    if (this.disposed) throw new Error('BatchDecoder: used after dispose');
    const all = [...this.seqs.values()];
    if (!all.length) return [];
    const running = stepRunning ? all.filter((s) => s.cache) : [];
    const queued = all.filter((s) => !s.cache);
    if (!running.length && !queued.length) return [];
    const net = this.net;
    const wasTraining = net.training;
    if (wasTraining) net.train(false);
    try {
      const out: BatchToken[] = [];
      // every op of the step on one thread (smallOps); large products, a long prompt's, still use them all
      smallOps(() => {
        for (const s of queued) out.push(...this.advance([s]));
        if (running.length) out.push(...this.advance(running));
      });
      return out;
    } finally {
      if (wasTraining) net.train(true);
    }
  }

  /** Advances `seqs` (all running, or one queued) by one token each. */
  private advance(seqs: Sequence[]): BatchToken[] {
    const logits = seqs[0]!.cache ? this.stepRows(seqs) : this.prefill(seqs[0]!);
    let picked: number[];
    try {
      picked = this.sample(logits, seqs);
    } finally {
      logits.dispose();
    }
    return seqs.map((s, i) => {
      const token = picked[i]!;
      s.tokens.push(token);
      const t: BatchToken = { id: s.id, index: s.produced++, token };
      if (s.eosToken !== undefined && token === s.eosToken) t.done = 'eos';
      else if (s.produced >= s.maxTokens) t.done = 'length';
      if (t.done) this.remove(s.id);
      return t;
    });
  }

  /** A queued sequence's prompt (its last maxSeqLen tokens), alone: logits [1, V] of its last position. */
  private prefill(s: Sequence): tf.Tensor {
    const maxLen = this.net.maxSeqLen;
    const window = s.tokens.length > maxLen ? s.tokens.slice(-maxLen) : s.tokens;
    const x = tf.tensor2d([window], [1, window.length], 'int32');
    let res;
    try {
      res = this.net.forwardWithState(x, { returnCache: true, lastPositionLogits: true });
    } finally {
      x.dispose();
    }
    res.embeddings.dispose();
    s.cache = res.cache!;
    return lastPosition(res.logits);
  }

  /** Running sequences together: logits [b, V] of each one's next position. */
  private stepRows(seqs: Sequence[]): tf.Tensor {
    const maxLen = this.net.maxSeqLen;
    const kinds = this.net.attnLayers.cachedLayerKinds();
    // past maxSeqLen the window slides: keep the last maxSeqLen - 1 positions, as decoding alone does
    for (const s of seqs) {
      if (s.tokens.length > maxLen && s.cache!.seqLen > maxLen - 1) {
        const trimmed = s.cache!.trimmed(maxLen - 1, kinds);
        s.cache!.dispose();
        s.cache = trimmed;
      }
    }
    const x = tf.tensor2d(
      seqs.map((s) => s.tokens[s.tokens.length - 1]!),
      [seqs.length, 1],
      'int32',
    );
    let res;
    try {
      res = this.net.forwardWithState(x, { rowCaches: seqs.map((s) => s.cache!) });
    } finally {
      x.dispose();
    }
    res.embeddings.dispose();
    seqs.forEach((s, i) => {
      s.cache!.dispose();
      s.cache = res.rowCaches![i]!;
    });
    return lastPosition(res.logits);
  }

  /** One token per row of logits ([b, V]); rows that sample alike share one filtered batch. */
  private sample(logits: tf.Tensor, seqs: Sequence[]): number[] {
    const picked = new Array<number>(seqs.length);
    const groups = new Map<string, number[]>();
    seqs.forEach((s, i) => {
      const g = groups.get(s.sampleKey);
      if (g) g.push(i);
      else groups.set(s.sampleKey, [i]);
    });
    for (const [key, rows] of groups) {
      const first = seqs[rows[0]!]!;
      const part = rows.length === seqs.length ? logits : gatherRows(logits, rows);
      try {
        let ids: number[];
        if (key === 'greedy') ids = argmaxRows(part);
        else {
          const probs = tf.tidy(() =>
            tf.softmax(divideByTemperature(first.filter(part, first.filterKwargs), first.temperature), -1),
          );
          try {
            ids = multinomialRows(
              probs,
              rows.map((i) => seqs[i]!.rng),
            );
          } finally {
            probs.dispose();
          }
        }
        rows.forEach((r, j) => (picked[r] = ids[j]!));
      } finally {
        if (part !== logits) part.dispose();
      }
    }
    return picked;
  }

  /** Frees every sequence's cache; the decoder cannot be used afterwards. */
  dispose(): void {
    if (this.disposed) return;
    for (const id of [...this.seqs.keys()]) this.remove(id);
    this.disposed = true;
  }
}

/** logits [b, n, V] (disposed) -> [b, V] of the last position. */
function lastPosition(logits: tf.Tensor): tf.Tensor {
  const [b, n, v] = logits.shape as [number, number, number];
  const last = tf.tidy(() =>
    tf.reshape(n === 1 ? logits : tf.slice(logits, [0, n - 1, 0], [b, 1, v]), [b, v]),
  );
  logits.dispose();
  return last;
}

function gatherRows(x: tf.Tensor, rows: number[]): tf.Tensor {
  return tf.tidy(() => tf.gather(x, tf.tensor1d(rows, 'int32'), 0));
}
