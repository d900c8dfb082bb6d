import type { ModelRecord } from '../models/schemas.js';
import type { Storage } from '../models/storage.js';
import {
  autoregressive,
  buildModel,
  getTokenizer,
  loadWeights,
  type BuiltLm,
  type Tokenizer,
} from './engine.js';
import type { AutoregressiveWrapper } from '../src/index.js';

/** A model loaded for sampling. */
export interface LoadedModel {
  key: string;
  built: BuiltLm;
  ar: AutoregressiveWrapper;
  tokenizer: Tokenizer;
}

interface Entry {
  value: LoadedModel;
  refs: number;
  modelId: string;
  weightsVersion: number;
  /** Newer weights of the model were loaded: disposed as soon as no generation uses it. */
  stale: boolean;
}

/**
 * A bounded LRU of models loaded for generation, keyed by model id and weights version. New weights
 * mean a new entry, and the model's older entries are disposed as soon as no generation uses them
 * (a model trained again and again keeps one copy, not `capacity`). Entries in use are never disposed: `acquire` pins,
 * `release` unpins, and eviction skips pinned entries.
 */
export class ModelCache {
  private readonly entries = new Map<string, Entry>();

  constructor(
    private readonly storage: Storage,
    readonly capacity = 4,
  ) {}

  get size(): number {
    return this.entries.size;
  }

  /** The weights versions of a model that are loaded. */
  versions(modelId: string): number[] {
    return [...this.entries.values()].filter((e) => e.modelId === modelId).map((e) => e.weightsVersion);
  }

  /** The cache key of a model's record: its id and weights. */
  static keyOf(record: ModelRecord): string {
    return `${record.id}@${record.weightsVersion}:${record.weightsFile}`;
  }

  /**
   * The newest weights of model `modelId` loaded here, pinned as `acquire` pins (release it), or null
   * when none is. Whether they are still the model's is for the caller to check (`keyOf`).
   */
  acquireLatest(modelId: string): LoadedModel | null {
    let best: Entry | null = null;
    for (const e of this.entries.values())
      if (e.modelId === modelId && !e.stale && (!best || e.weightsVersion > best.weightsVersion)) best = e;
    return best ? this.pin(best) : null;
  }

  /** Marks an entry in use (pinned) and most recently used; returns its model. */
  private pin(e: Entry): LoadedModel {
    this.entries.delete(e.value.key);
    this.entries.set(e.value.key, e);
    e.refs++;
    return e.value;
  }

  async acquire(record: ModelRecord): Promise<LoadedModel> {
    const key = ModelCache.keyOf(record);
    const hit = this.entries.get(key);
    if (hit) return this.pin(hit);
    const bytes = await this.storage.read(record.weightsFile);
    const built = buildModel(record.config);
    try {
      loadWeights(built.model, bytes, record.weightsFile);
    } catch (e) {
      built.model.dispose();
      throw e;
    }
    built.model.eval();
    const value: LoadedModel = {
      key,
      built,
      ar: autoregressive(built.model),
      tokenizer: getTokenizer(record.tokenizer),
    };
    this.entries.set(key, {
      value,
      refs: 1,
      modelId: record.id,
      weightsVersion: record.weightsVersion,
      stale: false,
    });
    for (const [k, e] of this.entries) {
      if (e.modelId !== record.id || e.weightsVersion >= record.weightsVersion) continue;
      e.stale = true;
      if (e.refs === 0) this.remove(k, e);
    }
    this.evict();
    return value;
  }

  release(m: LoadedModel): void {
    const e = this.entries.get(m.key);
    if (e) {
      e.refs = Math.max(0, e.refs - 1);
      if (e.stale && e.refs === 0) this.remove(m.key, e);
      this.evict();
    } else {
      // evicted while pinned is impossible; disposed by clear() meanwhile
    }
  }

  private evict(): void {
    for (const [k, e] of this.entries) {
      if (this.entries.size <= this.capacity) break;
      if (e.refs > 0) continue;
      this.remove(k, e);
    }
  }

  private remove(key: string, e: Entry): void {
    this.entries.delete(key);
    e.value.built.model.dispose();
  }

  clear(): void {
    for (const [, e] of this.entries) e.value.built.model.dispose();
    this.entries.clear();
  }
}
