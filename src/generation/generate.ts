/**
 * Autoregressive decoding with the reference's semantics (x-transformers AutoregressiveWrapper.generate):
 * greedy or filtered sampling with a temperature, end-of-sequence stopping and padding, ragged
 * prompts right-aligned, a sliding window at maxSeqLen, KV caching, and contrastive decoding
 * against amateur models. `decodeStream` yields each step's tokens as soon as they are sampled.
 */
import * as tf from '@tensorflow/tfjs-core';
import { checkPrecision, withPrecision, type Precision } from '../backend/precision.js';
import { smallOps } from '../backend/index.js';
import { Rng } from '../utils/random.js';
import { checkTemperature, sampleNext } from './sampling.js';
import {
  contrastiveDecode,
  FILTER_LOGITS_FN,
  resolveFilter,
  topK,
  type ContrastiveDecodeOptions,
  type FilterFn,
  type FilterKwargs,
  type FilterName,
} from './filters.js';

/** A KV cache as the model returns it (see LayersCache). */
export interface DecodeCache {
  readonly seqLen: number;
  dispose(): void;
  /** keeps the last n positions of the self-attention layers (a new cache) */
  trimmed(n: number, selfAttn: boolean[]): DecodeCache;
}

/** Per-call options the decoder passes to the model. */
export interface DecodeForwardOptions {
  cache?: DecodeCache;
  returnCache?: boolean;
  seqStartPos?: tf.Tensor;
  context?: tf.Tensor;
  contextMask?: tf.Tensor;
  mems?: tf.Tensor[];
  returnMems?: boolean;
  /** logits of the last position only (a model may still return every position's) */
  lastPositionLogits?: boolean;
}

/** What a token model (TransformerWrapper) offers for decoding. */
export interface DecodingNet {
  readonly numTokens: number;
  readonly maxSeqLen: number;
  readonly canCacheKv: boolean;
  readonly canCacheKvOutsideMaxSeqLen: boolean;
  readonly attnLayers: { cachedLayerKinds(): boolean[] };
  training: boolean;
  train(mode?: boolean): unknown;
  /** x: [b, n] int32 -> logits [b, n | cached, V] (and the cache with returnCache) */
  forwardWithState(
    x: tf.Tensor,
    opts?: DecodeForwardOptions,
  ): { logits: tf.Tensor; embeddings: tf.Tensor; mems?: tf.Tensor[]; cache?: DecodeCache };
}

/** Something that is, or wraps (`.net`), a decoding model. */
export type AmateurModel = DecodingNet | { net: DecodingNet };

/** Options of `generate` / `generateStream` (camelCase of the reference's keywords). */
export interface GenerateOptions {
  /** 0 = greedy (argmax); default 1 */
  temperature?: number;
  /** a built-in filter name (top_k, top_p, top_a, min_p) or a function; default top-k */
  filterLogitsFn?: FilterName | FilterFn;
  filterKwargs?: FilterKwargs;
  /** stop when every row has produced it; later positions are set to padValue */
  eosToken?: number;
  /** promptLens: [b] real lengths of the prompts (left-aligned in `prompts`); they are right-aligned */
  promptLens?: tf.Tensor | number[];
  /** feed only the last maxSeqLen tokens (default true); false feeds the whole sequence (the reference 2.0.1 fails there) */
  restrictToMaxSeqLen?: boolean;
  /** decode with a key/value cache (default true) */
  cacheKv?: boolean;
  /** contrastive decoding against one or more amateur models (turns the filter off) */
  amateurModel?: AmateurModel | AmateurModel[];
  contrastiveDecodeKwargs?: ContrastiveDecodeOptions | ContrastiveDecodeOptions[];
  /** seed of the sampler (default 0) */
  seed?: number;
  /** stops decoding early when aborted */
  signal?: AbortSignal;
  /** cross-attention context: [b, m, dimContext] and its mask [b, m] */
  context?: tf.Tensor;
  contextMask?: tf.Tensor;
  /** `bf16`: each step's matrix products and attention in bfloat16 (torch backend); default `fp32` */
  precision?: Precision;
}

/** One decoding step: `tokens[i]` is row i's new token (padValue once the row has ended). */
export interface GenerateStep {
  index: number;
  tokens: number[];
}

/** Prompt token ids: [b, n] (or [n]) int32 tensor, or nested arrays. */
export type Prompts = tf.Tensor | number[][] | number[];

function netOf(m: AmateurModel): DecodingNet {
  return 'net' in m && !('forwardWithState' in m) ? m.net : (m as DecodingNet);
}

function readPrompts(prompts: Prompts, numTokens: number): { rows: number[][]; rank1: boolean } {
  let rows: number[][];
  let rank1: boolean;
  if (prompts instanceof tf.Tensor) {
    if (prompts.rank !== 1 && prompts.rank !== 2) {
      throw new Error(
        `prompts: expected token ids of shape [batch, seq] or [seq], got shape [${prompts.shape}]`,
      );
    }
    if (prompts.dtype !== 'int32') throw new Error(`prompts: expected dtype int32, got ${prompts.dtype}`);
    rank1 = prompts.rank === 1;
    const arr = prompts.arraySync() as number[] | number[][];
    rows = rank1 ? [arr as number[]] : (arr as number[][]);
  } else if (Array.isArray(prompts)) {
    rank1 = prompts.length > 0 && !Array.isArray(prompts[0]);
    rows = rank1 ? [prompts as number[]] : (prompts as number[][]);
    if (rows.some((r) => !Array.isArray(r) || r.length !== rows[0]!.length)) {
      throw new Error('prompts: expected rows of equal length (use promptLens for ragged prompts)');
    }
  } else {
    throw new Error(`prompts: expected a tensor or arrays of token ids, got ${typeof prompts}`);
  }
  if (rows.length === 0 || rows[0]!.length === 0) {
    throw new Error(
      `prompts: expected at least one row of at least one token, got [${rows.length}, ${rows[0]?.length ?? 0}]`,
    );
  }
  for (let i = 0; i < rows.length; i++) {
    for (const id of rows[i]!) {
      if (!Number.isInteger(id) || id < 0 || id >= numTokens) {
        throw new Error(`prompts: expected token ids in [0, ${numTokens}), got ${id} in row ${i}`);
      }
    }
  }
  return { rows: rows.map((r) => [...r]), rank1 };
}

const BUILTIN = new Set<FilterFn>(Object.values(FILTER_LOGITS_FN));

/** Checks the options that do not depend on the model, throwing Errors naming the argument. */
function checkOptions(seqLen: number, o: GenerateOptions): void {
  if (!Number.isInteger(seqLen) || seqLen < 1)
    throw new Error(`seqLen: expected a positive integer, got ${seqLen}`);
  checkTemperature(o.temperature ?? 1);
  if (o.eosToken !== undefined && !Number.isInteger(o.eosToken)) {
    throw new Error(`eosToken: expected an integer token id, got ${o.eosToken}`);
  }
  if (o.seed !== undefined && !Number.isFinite(o.seed))
    throw new Error(`seed: expected a finite number, got ${o.seed}`);
  checkPrecision(o.precision);
}

/**
 * Step-by-step decoder state. Owns its caches; `dispose()` frees them (safe to call twice).
 */
class StepDecoder {
  readonly rows: number[][];
  readonly promptLen: number;
  readonly rank1: boolean;
  private readonly filter: FilterFn;
  private readonly greedy: boolean;
  private readonly rng: Rng;
  private readonly seqStartPos?: tf.Tensor;
  private cache?: DecodeCache;
  private readonly amateurs: DecodingNet[];
  private readonly amateurCaches: (DecodeCache | undefined)[];
  private readonly cdKwargs: ContrastiveDecodeOptions[];
  private readonly ended: boolean[];
  private readonly wasTraining: boolean;
  steps = 0;
  private disposed = false;

  constructor(
    private readonly net: DecodingNet,
    prompts: Prompts,
    readonly seqLen: number,
    private readonly o: GenerateOptions,
    private readonly padValue: number,
  ) {
    checkOptions(seqLen, o);
    const { rows, rank1 } = readPrompts(prompts, net.numTokens);
    this.rank1 = rank1;
    const b = rows.length;
    const t = rows[0]!.length;
    this.promptLen = t;
    if (o.eosToken !== undefined && (o.eosToken < 0 || o.eosToken >= net.numTokens)) {
      throw new Error(`eosToken: expected a token id in [0, ${net.numTokens}), got ${o.eosToken}`);
    }

    const filterSpec = o.filterLogitsFn ?? topK;
    this.filter = resolveFilter(filterSpec);
    this.greedy = (o.temperature ?? 1) === 0;
    // check the kwargs of built-in filters before decoding starts
    if (!o.amateurModel && !this.greedy && (typeof filterSpec === 'string' || BUILTIN.has(filterSpec))) {
      tf.tidy(() => {
        this.filter(tf.fill([1, net.numTokens], 0), o.filterKwargs ?? {});
      });
    }
    this.rng = new Rng(o.seed ?? 0);

    // ragged prompts: take each row's first promptLens[i] tokens and right-align them
    if (o.promptLens !== undefined) {
      const lens =
        o.promptLens instanceof tf.Tensor ? (Array.from(o.promptLens.dataSync()) as number[]) : o.promptLens;
      if (!Array.isArray(lens) || lens.length !== b) {
        throw new Error(`promptLens: expected ${b} lengths (one per prompt row), got ${lens?.length}`);
      }
      lens.forEach((l, i) => {
        if (!Number.isInteger(l) || l < 1 || l > t) {
          throw new Error(`promptLens: expected integers in [1, ${t}], got ${l} for row ${i}`);
        }
      });
      for (let i = 0; i < b; i++) {
        const l = lens[i]!;
        rows[i] = [...Array<number>(t - l).fill(padValue), ...rows[i]!.slice(0, l)];
      }
      this.seqStartPos = tf.keep(
        tf.tensor1d(
          lens.map((l) => t - l),
          'int32',
        ),
      );
    }
    this.rows = rows;
    this.ended = rows.map((r) => o.eosToken !== undefined && r.includes(o.eosToken));

    // a cache cannot follow absolute positions past maxSeqLen
    const restrict = o.restrictToMaxSeqLen ?? true;
    const cacheKv = o.cacheKv ?? true;
    if (restrict && cacheKv && t + seqLen - 1 > net.maxSeqLen && !net.canCacheKvOutsideMaxSeqLen) {
      this.seqStartPos?.dispose();
      throw new Error(
        `cacheKv: the model cannot use cached keys/values past maxSeqLen ${net.maxSeqLen} (prompt ${t} + seqLen ${seqLen} - 1 tokens) ` +
          'because it uses absolute positional embeddings; pass cacheKv: false or use rotary embeddings',
      );
    }

    const amateurs =
      o.amateurModel === undefined ? [] : Array.isArray(o.amateurModel) ? o.amateurModel : [o.amateurModel];
    this.amateurs = amateurs.map(netOf);
    const cd = o.contrastiveDecodeKwargs ?? {};
    this.cdKwargs = Array.isArray(cd) ? cd : this.amateurs.map(() => cd);
    if (this.cdKwargs.length !== this.amateurs.length) {
      this.seqStartPos?.dispose();
      throw new Error(
        `contrastiveDecodeKwargs: expected ${this.amateurs.length} entries (one per amateur model), got ${this.cdKwargs.length}`,
      );
    }
    for (const a of this.amateurs) {
      if (a.numTokens !== net.numTokens) {
        this.seqStartPos?.dispose();
        throw new Error(`amateurModel: expected ${net.numTokens} logits like the model, got ${a.numTokens}`);
      }
      a.train(false);
    }
    this.amateurCaches = this.amateurs.map(() => undefined);
    this.wasTraining = net.training;
    net.train(false);
  }

  /** Whether every row has produced eosToken. */
  get allEnded(): boolean {
    return this.o.eosToken !== undefined && this.ended.every(Boolean);
  }

  /** Runs `net` on the current window, returns last-position logits [b, V] and updates its cache. */
  private logitsOf(
    net: DecodingNet,
    cache: DecodeCache | undefined,
    setCache: (c: DecodeCache | undefined) => void,
  ): tf.Tensor {
    const o = this.o;
    const restrict = o.restrictToMaxSeqLen ?? true;
    const cacheKv = (o.cacheKv ?? true) && net.canCacheKv;
    const len = this.rows[0]!.length;
    // every model sees the main model's window; only the main model's cache is trimmed (as the reference)
    const maxLen = this.net.maxSeqLen;
    let window = this.rows;
    if (restrict && len > maxLen) {
      window = this.rows.map((r) => r.slice(-maxLen));
      if (net === this.net && cache && cache.seqLen > maxLen - 1) {
        const trimmed = cache.trimmed(maxLen - 1, net.attnLayers.cachedLayerKinds());
        cache.dispose();
        cache = trimmed;
        setCache(cache);
      }
    }
    const x = tf.tensor2d(window, [window.length, window[0]!.length], 'int32');
    let res;
    try {
      const run = () =>
        net.forwardWithState(x, {
          cache,
          returnCache: cacheKv,
          seqStartPos: this.seqStartPos,
          context: o.context,
          contextMask: o.contextMask,
          // only the next token's logits: a prompt's, or an uncached step's, other positions are not sampled
          lastPositionLogits: true,
        });
      // a few rows through every op (a long prompt's large products still use every thread)
      res = smallOps(run);
    } finally {
      x.dispose();
    }
    res.embeddings.dispose();
    for (const m of res.mems ?? []) m.dispose();
    if (cacheKv && res.cache) {
      if (cache && cache !== res.cache) cache.dispose();
      setCache(res.cache);
    } else res.cache?.dispose();
    const logits = res.logits;
    const [b, n, v] = logits.shape as [number, number, number];
    const last = tf.tidy(() =>
      tf.reshape(n === 1 ? logits : tf.slice(logits, [0, n - 1, 0], [b, 1, v]), [b, v]),
    );
    logits.dispose();
    return last;
  }

  /** Samples one token per row and appends it; returns the step's tokens (padValue for ended rows). */
  step(): number[] {
    if (this.disposed) throw new Error('generate: decoder used after dispose');
    return withPrecision(this.o.precision, () => this.stepAtPrecision());
  }

  private stepAtPrecision(): number[] {
    let logits = this.logitsOf(this.net, this.cache, (c) => (this.cache = c));
    try {
      for (let i = 0; i < this.amateurs.length; i++) {
        const a = this.amateurs[i]!;
        const al = this.logitsOf(a, this.amateurCaches[i], (c) => (this.amateurCaches[i] = c));
        const next = contrastiveDecode(logits, al, this.cdKwargs[i]);
        al.dispose();
        logits.dispose();
        logits = next;
      }
      const sample = sampleNext(logits, {
        temperature: this.o.temperature ?? 1,
        filter: this.amateurs.length ? undefined : this.filter,
        filterKwargs: this.o.filterKwargs,
        rng: this.rng,
      });
      const eos = this.o.eosToken;
      const shown: number[] = [];
      sample.forEach((s, i) => {
        this.rows[i]!.push(s);
        shown.push(this.ended[i] ? this.padValue : s);
        if (eos !== undefined && s === eos) this.ended[i] = true;
      });
      this.steps++;
      return shown;
    } finally {
      logits.dispose();
    }
  }

  /** New tokens so far, with positions after each row's first eosToken set to padValue: [b, steps]. */
  result(): number[][] {
    const eos = this.o.eosToken;
    return this.rows.map((r) => {
      const row = [...r];
      if (eos !== undefined) {
        const first = row.indexOf(eos);
        if (first >= 0) for (let j = first + 1; j < row.length; j++) row[j] = this.padValue;
      }
      return row.slice(this.promptLen);
    });
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.cache?.dispose();
    for (const c of this.amateurCaches) c?.dispose();
    this.seqStartPos?.dispose();
    this.net.train(this.wasTraining);
  }
}

/**
 * Generates up to `seqLen` tokens after `prompts` ([b, n] int32, or [n]); returns only the new
 * tokens, [b, steps] int32 (or [steps]); steps < seqLen when every row reached eosToken first.
 */
export function decode(
  net: DecodingNet,
  prompts: Prompts,
  seqLen: number,
  options: GenerateOptions = {},
  padValue = 0,
): tf.Tensor {
  const d = new StepDecoder(net, prompts, seqLen, options, padValue);
  try {
    while (d.steps < seqLen && !options.signal?.aborted) {
      d.step();
      if (d.allEnded) break;
    }
    const rows = d.result();
    const b = rows.length;
    const n = rows[0]!.length;
    const t = tf.tensor2d(rows.flat(), [b, n], 'int32');
    if (!d.rank1) return t;
    const r = tf.reshape(t, [n]);
    t.dispose();
    return r;
  } finally {
    d.dispose();
  }
}

/**
 * Yields each step's tokens (one per row) as soon as they are sampled; a row that has ended yields
 * padValue. Stops at seqLen, when every row has produced eosToken, or when `signal` aborts. Leaving
 * the loop early (break / return()) frees every tensor.
 */
export function decodeStream(
  net: DecodingNet,
  prompts: Prompts,
  seqLen: number,
  options: GenerateOptions = {},
  padValue = 0,
): AsyncGenerator<GenerateStep, void, undefined> {
  // validate now, so bad arguments throw at the call rather than at the first step
  new StepDecoder(net, prompts, seqLen, options, padValue).dispose();
  // read tensors now: the caller may dispose them before iterating
  const ids = prompts instanceof tf.Tensor ? (prompts.arraySync() as number[] | number[][]) : prompts;
  const lens =
    options.promptLens instanceof tf.Tensor
      ? (Array.from(options.promptLens.dataSync()) as number[])
      : options.promptLens;
  return streamSteps(net, ids, seqLen, { ...options, promptLens: lens }, padValue);
}

async function* streamSteps(
  net: DecodingNet,
  prompts: Prompts,
  seqLen: number,
  options: GenerateOptions,
  padValue: number,
): AsyncGenerator<GenerateStep, void, undefined> {
  const d = new StepDecoder(net, prompts, seqLen, options, padValue);
  try {
    while (d.steps < seqLen && !options.signal?.aborted) {
      const tokens = d.step();
      yield { index: d.steps - 1, tokens };
      if (d.allEnded) break;
      await new Promise<void>((r) => setImmediate(r));
    }
  } finally {
    d.dispose();
  }
}
