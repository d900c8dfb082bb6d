import { UnrecoverableError } from 'bullmq';
import type { Registry } from '../models/registry.js';
import type { EventWriter } from './event-writer.js';
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
  /** Job events written a turn of the event loop at a time (the tokens of a decoding step). */
  events: EventWriter;
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
 * One job's run in this worker, from its processor's first line to its last: the job's abort
 * controller is registered (a cancel request or BullMQ's signal aborts it), and the job ends once,
 * through `Registry.endJob` (final state and end event), with its duration metric.
 */
export class JobRun {
  private readonly ac = new AbortController();
  private readonly started = Date.now();

  constructor(
    private readonly ctx: WorkerContext,
    readonly type: 'train' | 'generate',
    readonly jobId: string,
    bullSignal?: AbortSignal,
  ) {
    ctx.running.set(jobId, this.ac);
    bullSignal?.addEventListener('abort', () => this.ac.abort());
  }

  /** Aborted when the job is cancelled or its worker must let go of it. */
  get signal(): AbortSignal {
    return this.ac.signal;
  }

  /** Whether the job should stop: aborted here, or a cancel request recorded in Redis. */
  async cancelRequested(): Promise<boolean> {
    return this.ac.signal.aborted || (await this.ctx.registry.isCancelRequested(this.jobId));
  }

  /** Marks the job active. */
  async begin(): Promise<void> {
    await this.ctx.registry.updateJob(this.jobId, { state: 'active' });
  }

  /** Ends the job as cancelled; `data` is its `cancelled` event (and its progress, when given). */
  async cancelled(
    data: Record<string, unknown>,
    progress?: Record<string, unknown>,
  ): Promise<{ cancelled: true }> {
    await this.ctx.registry.endJob(this.jobId, this.type, { state: 'cancelled', data, progress });
    this.observe('cancelled');
    return { cancelled: true };
  }

  /** Ends the job with its result (the `done` or `completed` event). */
  async completed<T extends Record<string, unknown>>(
    result: T,
    progress?: Record<string, unknown>,
  ): Promise<T> {
    await this.ctx.registry.endJob(this.jobId, this.type, { state: 'completed', result, progress });
    this.observe('completed');
    return result;
  }

  /**
   * Ends the job with its result, in the same write as the events of this turn (a generation's last
   * tokens), unless a cancel was requested by then: it then ends as cancelled, with `progress` as its
   * event's data. Returns the result, or { cancelled: true }.
   */
  async completedUnlessCancelled<T extends Record<string, unknown>>(
    result: T,
    progress: Record<string, unknown>,
  ): Promise<T | { cancelled: true }> {
    const end = this.ac.signal.aborted
      ? await this.ctx.events.end(this.jobId, this.type, { state: 'cancelled', data: progress, progress })
      : await this.ctx.events.end(this.jobId, this.type, { state: 'completed', result, progress }, progress);
    const cancelled = end.applied ? end.state === 'cancelled' : this.ac.signal.aborted;
    this.observe(cancelled ? 'cancelled' : 'completed');
    return cancelled ? { cancelled: true } : result;
  }

  /**
   * Ends a job that failed for good: logs it, marks it failed with a `failed` event (unless it
   * already ended), and returns the error BullMQ should see (never retried).
   */
  async failed(what: string, e: unknown): Promise<UnrecoverableError> {
    const message = (e as Error).message;
    this.ctx.log.error({ jobId: this.jobId, err: message }, `${what} failed`);
    await this.ctx.registry.endJob(this.jobId, this.type, { state: 'failed', error: message });
    this.observe('failed');
    return e instanceof UnrecoverableError ? e : new UnrecoverableError(message);
  }

  /** Unregisters the job (the processor's last step). */
  close(): void {
    this.ctx.running.delete(this.jobId);
  }

  private observe(state: string): void {
    this.ctx.metrics?.jobDuration.observe({ type: this.type, state }, (Date.now() - this.started) / 1000);
  }
}
