import { UnrecoverableError } from 'bullmq';
import type { Registry } from '../models/registry.js';
import type { Storage } from '../models/storage.js';
import type { ServiceMetrics } from './metrics.js';
import type { ModelCache } from './model-cache.js';
import type { TokenCache } from './token-cache.js';
import type { GenerationPriority } from './priority.js';
import type { GenerationBatcher } from './batcher.js';

/** Minimal logger (pino's shape). */
export interface Logger {
  info(obj: object | string, msg?: string): void;
  warn(obj: object | string, msg?: string): void;
  error(obj: object | string, msg?: string): void;
}

/** What the processors share inside one worker process. */
export interface WorkerContext {
  registry: Registry;
  storage: Storage;
  cache: ModelCache;
  /** Datasets' tokens per tokenizer, tokenized once and kept in DATA_DIR. */
  tokens: TokenCache;
  /** One decode loop per loaded model, by the model's cache key: its generations run as one batch. */
  batchers: Map<string, GenerationBatcher>;
  /** Most generations a batcher runs at once (MAX_BATCH). */
  maxBatch: number;
  /** Generations go first: training waits before a step while one runs. */
  priority: GenerationPriority;
  metrics?: ServiceMetrics;
  log: Logger;
  /** Abort controllers of the jobs running here, by job id (cancel requests abort them). */
  running: Map<string, AbortController>;
  /** Set when the process is shutting down: training checkpoints and hands its job back. */
  draining: boolean;
}

/** Yields to the event loop so timers (lock renewal, heartbeats) and I/O run between steps. */
export function yieldToLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

/**
 * Records a job that failed for good: logs it, marks the job failed with a `failed` event (unless
 * its state already moved on), and returns the error BullMQ should see (never retried).
 */
export async function recordFailure(
  ctx: WorkerContext,
  jobId: string,
  what: string,
  e: unknown,
  observe: (state: string) => void,
): Promise<UnrecoverableError> {
  const message = (e as Error).message;
  ctx.log.error({ jobId, err: message }, `${what} failed`);
  const applied = await ctx.registry.updateJob(jobId, { state: 'failed', error: message });
  if (applied) await ctx.registry.appendEvent(jobId, 'failed', { error: message });
  observe('failed');
  return e instanceof UnrecoverableError ? e : new UnrecoverableError(message);
}
