/**
 * Transformer-XL style training and generation (the reference's XLAutoregressiveWrapper): sequences
 * longer than maxSeqLen are processed in segments of maxSeqLen, each attending to the memories
 * (hidden states) the previous segments left.
 */
import * as tf from '@tensorflow/tfjs-core';
import { Module } from '../nn/module.js';
import { checkTensor } from '../utils/errors.js';
import { Rng } from '../utils/random.js';
import { ensureGradients } from '../train/gradients.js';
import { crossEntropy } from './autoregressive-wrapper.js';
import { resolveFilter, topK, type FilterFn, type FilterKwargs, type FilterName } from './filters.js';
import { checkTemperature, sampleNext } from './sampling.js';

await ensureGradients();

/** What the XL wrapper needs of its model (TransformerWrapper with mems). */
export interface XlNet extends Module {
  readonly numTokens: number;
  readonly maxSeqLen: number;
  readonly canCacheKv?: boolean;
  forwardWithState(
    x: tf.Tensor,
    opts?: { mems?: tf.Tensor[]; returnMems?: boolean; cache?: XlCache; returnCache?: boolean },
  ): { logits: tf.Tensor; embeddings: tf.Tensor; mems?: tf.Tensor[]; cache?: XlCache };
}

/** A key/value cache as the model returns it (LayersCache). */
export interface XlCache {
  dispose(): void;
}

export interface XLAutoregressiveWrapperOptions {
  ignoreIndex: number;
  padValue: number;
}

export const xlAutoregressiveWrapperDefaults: XLAutoregressiveWrapperOptions = {
  ignoreIndex: -100,
  padValue: 0,
};

export interface XLGenerateOptions {
  eosToken?: number;
  /** 0 = greedy; default 1 */
  temperature?: number;
  filterLogitsFn?: FilterName | FilterFn;
  filterKwargs?: FilterKwargs;
  /** memories to start from: one [b, m, dim] per attention layer (not disposed) */
  mems?: tf.Tensor[];
  /**
   * decode with a key/value cache (default true), as the reference: the cache then spans every
   * segment decoded so far and the memories grow by one position per step
   */
  cacheKv?: boolean;
  seed?: number;
  signal?: AbortSignal;
}

/**
 * Wraps a TransformerWrapper (with `maxMemLen` > 0 to carry memories) for segment-recurrent
 * language modelling. Parameters are the net's, under `net.`.
 */
export class XLAutoregressiveWrapper extends Module {
  readonly options: XLAutoregressiveWrapperOptions;
  readonly maxSeqLen: number;
  net: XlNet;

  constructor(net: XlNet, options: Partial<XLAutoregressiveWrapperOptions> = {}) {
    super();
    for (const k of Object.keys(options)) {
      if (!(k in xlAutoregressiveWrapperDefaults))
        throw new Error(`${k}: unknown XLAutoregressiveWrapper option`);
    }
    const o = { ...xlAutoregressiveWrapperDefaults, ...options };
    if (!Number.isInteger(o.ignoreIndex))
      throw new Error(`ignoreIndex: expected an integer, got ${o.ignoreIndex}`);
    if (!Number.isInteger(o.padValue)) throw new Error(`padValue: expected an integer, got ${o.padValue}`);
    if (!Number.isInteger(net.maxSeqLen) || net.maxSeqLen < 1) {
      throw new Error(`net.maxSeqLen: expected a positive integer, got ${net.maxSeqLen}`);
    }
    this.options = o;
    this.maxSeqLen = net.maxSeqLen;
    this.net = this.registerModule('net', net);
  }

  /**
   * x: [b, n + 1] int32 (n may exceed maxSeqLen) -> scalar loss: the cross-entropy of each segment of
   * maxSeqLen inputs, weighted by its share of the sequence, memories carried between segments.
   * `mems` (optional, not disposed) seeds the first segment.
   */
  forward(x: tf.Tensor, opts: { mems?: tf.Tensor[] } = {}): tf.Scalar {
    checkTensor('x', x, { rank: 2, dtype: 'int32', desc: 'token ids [batch, seq + 1]' });
    const [b, seq] = x.shape as [number, number];
    if (seq < 2) throw new Error(`x: expected at least 2 positions (inputs and shifted targets), got ${seq}`);
    const n = seq - 1;
    const L = this.maxSeqLen;
    return tf.tidy(() => {
      const inp = tf.slice(x, [0, 0], [b, n]);
      const labels = tf.slice(x, [0, 1], [b, n]);
      let mems = opts.mems;
      let total: tf.Tensor = tf.scalar(0);
      for (let start = 0; start < n; start += L) {
        const len = Math.min(L, n - start);
        const chunk = tf.slice(inp, [0, start], [b, len]);
        const res = this.net.forwardWithState(chunk, { mems, returnMems: true });
        mems = res.mems;
        const loss = crossEntropy(
          res.logits,
          tf.slice(labels, [0, start], [b, len]),
          this.options.ignoreIndex,
        );
        total = tf.add(total, tf.mul(loss, len / n));
      }
      return total as tf.Scalar;
    });
  }

  /** The prompt rows and sampling settings of a generate call, checked. */
  private checkGenerateInputs(startTokens: tf.Tensor, seqLen: number, options: XLGenerateOptions) {
    checkTensor('startTokens', startTokens, { dtype: 'int32', desc: 'token ids [batch, seq]' });
    if (startTokens.rank !== 1 && startTokens.rank !== 2) {
      throw new Error(`startTokens: expected shape [batch, seq] or [seq], got [${startTokens.shape}]`);
    }
    if (!Number.isInteger(seqLen) || seqLen < 1)
      throw new Error(`seqLen: expected a positive integer, got ${seqLen}`);
    const temperature = checkTemperature(options.temperature ?? 1);
    const filter = resolveFilter(options.filterLogitsFn ?? topK);
    const rank1 = startTokens.rank === 1;
    const rows = (rank1 ? [startTokens.arraySync()] : startTokens.arraySync()) as number[][];
    if (rows[0]!.length < 1) throw new Error('startTokens: expected at least one token');
    const V = this.net.numTokens;
    for (const r of rows) {
      for (const id of r) {
        if (!Number.isInteger(id) || id < 0 || id >= V) {
          throw new Error(`startTokens: expected token ids in [0, ${V}), got ${id}`);
        }
      }
    }
    const eos = options.eosToken;
    if (eos !== undefined && (!Number.isInteger(eos) || eos < 0 || eos >= V)) {
      throw new Error(`eosToken: expected a token id in [0, ${V}), got ${eos}`);
    }
    return { rows, rank1, eos, temperature, filter };
  }

  /**
   * Samples up to `seqLen` tokens after `startTokens` ([b, t] int32, or [t]): the leading full
   * segments of the prompt only build memories, then decoding runs segment by segment with the
   * memories carried. Returns the new tokens, [b, steps] (or [steps]); after a row's eosToken the
   * positions hold padValue, and decoding stops once every row has one.
   */
  async generate(
    startTokens: tf.Tensor,
    seqLen: number,
    options: XLGenerateOptions = {},
  ): Promise<tf.Tensor> {
    const { rows, rank1, eos, temperature, filter } = this.checkGenerateInputs(startTokens, seqLen, options);
    const t = rows[0]!.length;
    const L = this.maxSeqLen;
    const rng = new Rng(options.seed ?? 0);
    const wasTraining = this.training;
    this.eval();
    const given = options.mems;
    // every memory tensor this call creates; freed once unreferenced, the rest at the end
    const live = new Set<tf.Tensor>();
    let currMems = given;
    let stepMems: tf.Tensor[] | undefined;
    const track = (ms: tf.Tensor[] | undefined): tf.Tensor[] | undefined => {
      for (const m of ms ?? []) live.add(m);
      return ms;
    };
    const release = (ms: tf.Tensor[] | undefined): void => {
      if (!ms || ms === given || ms === currMems || ms === stepMems) return;
      for (const m of ms) if (live.delete(m)) m.dispose();
    };
    let disposeCache = (): void => {};
    const toTensor = (rs: number[][]): tf.Tensor => tf.tensor2d(rs, [rs.length, rs[0]!.length], 'int32');
    try {
      // catch the memories up over every full segment before the last (partial or full) one
      const numLeading = Math.ceil(t / L) - 1;
      for (let s = 0; s < numLeading; s++) {
        const x = toTensor(rows.map((r) => r.slice(s * L, (s + 1) * L)));
        const res = this.net.forwardWithState(x, { mems: currMems, returnMems: true });
        x.dispose();
        res.logits.dispose();
        res.embeddings.dispose();
        const old = currMems;
        currMems = track(res.mems);
        release(old);
      }
      let currPos = numLeading * L;
      const useCache = (options.cacheKv ?? true) && this.net.canCacheKv !== false;
      let cache: XlCache | undefined;
      disposeCache = () => cache?.dispose();
      const ended = rows.map((r) => eos !== undefined && r.includes(eos));
      for (let step = 0; step < seqLen && !options.signal?.aborted; step++) {
        const len = rows[0]!.length;
        const lastOfSegment = len % L === 0;
        const x = toTensor(rows.map((r) => r.slice(currPos)));
        let res;
        try {
          res = this.net.forwardWithState(x, {
            mems: currMems,
            returnMems: true,
            cache,
            returnCache: useCache,
          });
        } catch (e) {
          if (!useCache) throw e;
          throw new Error(
            `cacheKv: cached decoding with memories failed for this model (${(e as Error).message}); pass cacheKv: false`,
            { cause: e },
          );
        } finally {
          x.dispose();
        }
        if (res.cache && res.cache !== cache) {
          cache?.dispose();
          cache = useCache ? res.cache : undefined;
          if (!useCache) res.cache.dispose();
        }
        res.embeddings.dispose();
        const logits = tf.tidy(() => {
          const [b, n, v] = res.logits.shape as [number, number, number];
          return tf.reshape(tf.slice(res.logits, [0, n - 1, 0], [b, 1, v]), [b, v]);
        });
        res.logits.dispose();
        const prevStep = stepMems;
        stepMems = track(res.mems);
        release(prevStep);
        let sample: number[];
        try {
          sample = sampleNext(logits, { temperature, filter, filterKwargs: options.filterKwargs, rng });
        } finally {
          logits.dispose();
        }
        if (lastOfSegment) {
          // the step that saw a whole segment: its memories feed the next segment
          currPos = len;
          const old = currMems;
          currMems = stepMems;
          release(old);
        }
        sample.forEach((s, i) => {
          rows[i]!.push(s);
          if (eos !== undefined && s === eos) ended[i] = true;
        });
        if (eos !== undefined && ended.every(Boolean)) break;
      }
      const out = rows.map((r) => {
        const row = [...r];
        if (eos !== undefined) {
          const first = row.indexOf(eos);
          if (first >= 0) for (let j = first + 1; j < row.length; j++) row[j] = this.options.padValue;
        }
        return row.slice(t);
      });
      const res = toTensor(out);
      if (!rank1) return res;
      const r1 = tf.reshape(res, [out[0]!.length]);
      res.dispose();
      return r1;
    } finally {
      disposeCache();
      for (const m of live) m.dispose();
      this.train(wasTraining);
    }
  }
}
