import * as tf from '@tensorflow/tfjs-core';
import type { AttentionKv, RotaryInput } from '../attention/types.js';

/**
 * Rotary frequencies and cos / sin tables (`prepareRotary`'s) for positions 0 .. capacity - 1,
 * shared by the caches of one decoding run, so that a step slices them instead of computing its
 * positions' trigonometry again: every entry depends on its own position only, so a slice holds
 * exactly the numbers a shorter computation gives. Freed with the last cache that holds it.
 */
export class SharedRotaryTables {
  /** the creator's reference: it releases it once a cache holds the tables (or none will) */
  private holders = 1;

  constructor(
    readonly capacity: number,
    readonly width: number,
    /** forward(0 .. capacity - 1) with its tables (queryLen = capacity) */
    private readonly whole: RotaryInput,
  ) {
    const t = whole.tables;
    tf.keep(whole.freqs);
    if (t) for (const x of [t.cos, t.sin, t.cosQ, t.sinQ, t.swap]) tf.keep(x);
  }

  /** The RotaryInput of positions 0 .. n - 1 with tables for the last `queryLen` of them. */
  slice(n: number, queryLen: number): RotaryInput {
    if (n > this.capacity || queryLen > n)
      throw new Error(
        `rotary tables: expected n <= ${this.capacity} and queryLen <= n, got ${n} and ${queryLen}`,
      );
    const { freqs, tables } = this.whole;
    const first = (x: tf.Tensor, axis: number, start: number, len: number): tf.Tensor => {
      const begin = x.shape.map(() => 0);
      const size = x.shape.map(() => -1);
      begin[axis] = start;
      size[axis] = len;
      return tf.slice(x, begin, size);
    };
    const f = first(freqs, freqs.rank - 2, 0, n);
    if (!tables) return { freqs: f };
    const cos = first(tables.cos, 2, 0, n);
    const sin = first(tables.sin, 2, 0, n);
    return {
      freqs: f,
      tables: {
        width: tables.width,
        queryLen,
        cos,
        sin,
        cosQ: first(tables.cos, 2, n - queryLen, queryLen),
        sinQ: first(tables.sin, 2, n - queryLen, queryLen),
        swap: tables.swap,
      },
    };
  }

  /** The cos and sin tables of all its positions ([1, 1, capacity, width]), or null without tables. */
  fullTables(): { cos: tf.Tensor; sin: tf.Tensor } | null {
    const t = this.whole.tables;
    return t ? { cos: t.cos, sin: t.sin } : null;
  }

  hold(): this {
    this.holders++;
    return this;
  }

  release(): void {
    if (--this.holders > 0) return;
    const t = this.whole.tables;
    this.whole.freqs.dispose();
    if (t) for (const x of [t.cos, t.sin, t.cosQ, t.sinQ, t.swap]) x.dispose();
  }
}

/**
 * Keys/values of every attention layer (self and cross, in execution order) after a forward pass,
 * for KV-cached decoding. Its tensors are kept out of `tf.tidy` scopes; whoever holds the cache
 * disposes it (`dispose()`), once it is no longer passed to a forward call.
 */
export class LayersCache {
  /** Number of positions the cached keys cover (of the self-attention layers). */
  readonly seqLen: number;
  readonly kvs: AttentionKv[];
  /** Per entry of `kvs`: true for a self-attention layer, false for cross-attention. */
  readonly selfAttn: boolean[];
  private disposed = false;
  /** rotary tables shared along a decoding run (see SharedRotaryTables) */
  readonly rotary: SharedRotaryTables | null;

  constructor(
    kvs: AttentionKv[],
    seqLen: number,
    selfAttn: boolean[] = kvs.map(() => true),
    rotary: SharedRotaryTables | null = null,
  ) {
    if (selfAttn.length !== kvs.length)
      throw new Error(
        `selfAttn: expected ${kvs.length} flags (one per cached layer), got ${selfAttn.length}`,
      );
    this.kvs = kvs;
    this.seqLen = seqLen;
    this.selfAttn = selfAttn;
    this.rotary = rotary ? rotary.hold() : null;
    for (const kv of kvs) {
      tf.keep(kv.k);
      tf.keep(kv.v);
    }
  }

  /**
   * Keeps only the last `n` positions of every self-attention layer (as the reference does when
   * decoding past maxSeqLen). Returns a new cache; this one is untouched and still owned by its holder.
   */
  trimmed(n: number, selfAttn: boolean[] = this.selfAttn): LayersCache {
    if (this.disposed) throw new Error('cache: expected a live cache, got a disposed one');
    const kvs = this.kvs.map((kv, i) => {
      if (!selfAttn[i]) return { k: kv.k.clone(), v: kv.v.clone() };
      const t = kv.k.shape[2]!;
      const keep = Math.min(n, t);
      return {
        k: tf.slice(kv.k, [0, 0, t - keep, 0], [-1, -1, keep, -1]),
        v: tf.slice(kv.v, [0, 0, t - keep, 0], [-1, -1, keep, -1]),
      };
    });
    return new LayersCache(kvs, Math.min(n, this.seqLen), selfAttn, this.rotary);
  }

  get isDisposed(): boolean {
    return this.disposed;
  }

  /** Frees the cached tensors. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.rotary?.release();
    for (const kv of this.kvs) {
      kv.k.dispose();
      kv.v.dispose();
    }
  }
}
