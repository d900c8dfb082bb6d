import * as tf from '@tensorflow/tfjs-core';
import type { AttentionKv } from '../attention/types.js';

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

  constructor(kvs: AttentionKv[], seqLen: number, selfAttn: boolean[] = kvs.map(() => true)) {
    if (selfAttn.length !== kvs.length)
      throw new Error(
        `selfAttn: expected ${kvs.length} flags (one per cached layer), got ${selfAttn.length}`,
      );
    this.kvs = kvs;
    this.seqLen = seqLen;
    this.selfAttn = selfAttn;
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
    return new LayersCache(kvs, Math.min(n, this.seqLen), selfAttn);
  }

  get isDisposed(): boolean {
    return this.disposed;
  }

  /** Frees the cached tensors. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    for (const kv of this.kvs) {
      kv.k.dispose();
      kv.v.dispose();
    }
  }
}
