import * as tf from '@tensorflow/tfjs-core';
import type { AttentionKv, BackendKv, KvEntry, RotaryInput } from '../attention/types.js';
import { freeBackendIds, sliceBackendIds, tensorFromBackendId } from '../backend/index.js';

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
 *
 * A cache made by a batched decoding step holds its entries as backend ids (`BackendKv`); reading
 * `kvs` turns them into tensors once (the same memory), which the cache then holds instead.
 */
export class LayersCache {
  /** Number of positions the cached keys cover (of the self-attention layers). */
  readonly seqLen: number;
  private disposed = false;
  private kinds: boolean[];
  /** rotary tables shared along a decoding run (see SharedRotaryTables) */
  readonly rotary: SharedRotaryTables | null;
  private tensors: AttentionKv[] | null;
  private ids: BackendKv[] | null = null;

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
    this.tensors = kvs;
    this.seqLen = seqLen;
    this.kinds = selfAttn;
    this.rotary = rotary ? rotary.hold() : null;
    for (const kv of kvs) {
      tf.keep(kv.k);
      tf.keep(kv.v);
    }
  }

  /**
   * A cache of entries the backend holds under its ids (each id owned by the cache from now on: it
   * frees them, or hands them to the tensors `kvs` makes).
   */
  static fromBackend(
    entries: BackendKv[],
    seqLen: number,
    selfAttn: boolean[],
    rotary: SharedRotaryTables | null,
  ): LayersCache {
    if (selfAttn.length !== entries.length)
      throw new Error(
        `selfAttn: expected ${entries.length} flags (one per cached layer), got ${selfAttn.length}`,
      );
    const c = new LayersCache([], seqLen, [], rotary);
    c.kinds = selfAttn;
    c.tensors = null;
    c.ids = entries;
    return c;
  }

  /** Per entry of `kvs`: true for a self-attention layer, false for cross-attention. */
  get selfAttn(): boolean[] {
    return this.kinds;
  }

  /** The cached layers' keys/values as tensors (none once a cache of backend ids is disposed). */
  get kvs(): AttentionKv[] {
    if (!this.tensors) {
      if (!this.ids) return [];
      this.tensors = this.ids.map((e) => ({
        k: tf.keep(tensorFromBackendId(e.k, e.kShape, 'float32')),
        v: tf.keep(tensorFromBackendId(e.v, e.vShape, 'float32')),
      }));
      this.ids = null;
    }
    return this.tensors;
  }

  /** Entry `i` as a kernel takes it (backend ids stay ids: no tensor is made). */
  entry(i: number): KvEntry {
    if (this.disposed) throw new Error('cache: expected a live cache, got a disposed one');
    return this.ids ? this.ids[i]! : this.tensors![i]!;
  }

  /** How many cached layers it holds. */
  get layers(): number {
    return (this.ids ?? this.tensors ?? []).length;
  }

  /** The batch size of its entries. */
  get batch(): number | undefined {
    return this.ids ? this.ids[0]?.kShape[0] : this.tensors?.[0]?.k.shape[0];
  }

  /**
   * Keeps only the last `n` positions of every self-attention layer (as the reference does when
   * decoding past maxSeqLen). Returns a new cache; this one is untouched and still owned by its holder.
   */
  trimmed(n: number, selfAttn: boolean[] = this.selfAttn): LayersCache {
    if (this.disposed) throw new Error('cache: expected a live cache, got a disposed one');
    if (this.ids) {
      // a cache of backend ids stays one: views of the same memory under new ids, no tensor made
      const shapes = this.ids.flatMap((e) => [e.kShape, e.vShape]);
      const begins: number[][] = [];
      const sizes: number[][] = [];
      shapes.forEach(([b, h, t, d], j) => {
        const keep = selfAttn[j >> 1] ? Math.min(n, t!) : t!;
        begins.push([0, 0, t! - keep, 0]);
        sizes.push([b!, h!, keep, d!]);
      });
      const views = sliceBackendIds(
        this.ids.flatMap((e) => [e.k, e.v]),
        begins,
        sizes,
      );
      return LayersCache.fromBackend(
        this.ids.map((_, i) => ({
          k: views[2 * i]!,
          v: views[2 * i + 1]!,
          kShape: sizes[2 * i]!,
          vShape: sizes[2 * i + 1]!,
        })),
        Math.min(n, this.seqLen),
        selfAttn,
        this.rotary,
      );
    }
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
    if (this.ids) {
      freeBackendIds(this.ids.flatMap((e) => [e.k, e.v]));
      this.ids = null;
    }
    for (const kv of this.tensors ?? []) {
      kv.k.dispose();
      kv.v.dispose();
    }
  }
}
