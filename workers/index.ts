import { Worker, type Job } from 'bullmq';
import type { Redis } from 'ioredis';
import { EventWriter } from './event-writer.js';
import { Registry } from '../models/registry.js';
import { Storage } from '../models/storage.js';
import type { Logger, WorkerContext } from './context.js';
import type { ServiceMetrics } from './metrics.js';
import { ModelCache } from './model-cache.js';
import { TokenCache } from './token-cache.js';
import { GenerationPriority } from './priority.js';
import { processGenerate } from './generate.js';
import { processTrain } from './train.js';
import { startPresence } from './presence.js';
import {
  closeRedis,
  createRedis,
  GENERATE_QUEUE,
  TRAIN_QUEUE,
  type GenerateJobData,
  type TrainJobData,
} from './queues.js';

export interface WorkerOptions {
  redisUrl: string;
  dataDir: string;
  prefix?: string;
  /** Training jobs run at once (default 1). */
  concurrency?: number;
  /**
   * Generations decoded together per loaded model (default 32). The generate queue takes twice as
   * many jobs at once and feeds the batchers; those beyond a full batch wait for a place.
   */
  maxBatch?: number;
  /** Models kept loaded for generation (default 4). */
  modelCacheSize?: number;
  /** BullMQ lock: a worker silent this long is presumed dead (default 30000 ms). */
  lockDurationMs?: number;
  /** Stalled-job check period (default 15000 ms). */
  stalledIntervalMs?: number;
  metrics?: ServiceMetrics;
  log?: Logger;
  /** Characters of dataset text tokenized between progress events (default 1 Mi). */
  tokenizePieceChars?: number;
  /** Longest a training step waits for running generations (default 2000 ms). */
  trainMaxPauseMs?: number;
  /**
   * Decoding steps whose tokens go to Redis in one write (default 1: each step's at once). A
   * generation's first token and its end do not wait.
   */
  tokenWriteSteps?: number;
  /** Which queues to consume (default both). */
  queues?: ('train' | 'generate')[];
}

export interface ServiceWorkers {
  ctx: WorkerContext;
  workers: Worker[];
  /**
   * Graceful stop: no new jobs; running generations finish; training checkpoints its current step
   * and goes back to the queue for another worker; then connections close.
   */
  close(): Promise<void>;
}

const silent: Logger = { info: () => undefined, warn: () => undefined, error: () => undefined };

/** Starts the BullMQ workers for the `train` and `generate` queues. */
export async function startWorkers(options: WorkerOptions): Promise<ServiceWorkers> {
  const prefix = options.prefix ?? 'xt';
  const redis = createRedis(options.redisUrl);
  const sub = createRedis(options.redisUrl);
  const registry = new Registry(redis, prefix);
  const storage = new Storage(options.dataDir);
  const ctx: WorkerContext = {
    registry,
    events: new EventWriter(registry, options.tokenWriteSteps ?? 1),
    storage,
    cache: new ModelCache(storage, options.modelCacheSize ?? 4),
    tokens: new TokenCache(storage, options.tokenizePieceChars),
    priority: new GenerationPriority(options.trainMaxPauseMs),
    batchers: new Map(),
    maxBatch: options.maxBatch ?? 32,
    metrics: options.metrics,
    log: options.log ?? silent,
    running: new Map(),
    draining: false,
  };
  for (const c of [redis, sub])
    c.on('error', (err: Error) => ctx.log.warn({ err: err.message }, 'redis error'));
  await sub.subscribe(registry.cancelChannel);
  sub.on('message', (_channel: string, jobId: string) => ctx.running.get(jobId)?.abort());

  const common = {
    prefix,
    concurrency: options.concurrency ?? 1,
    lockDuration: options.lockDurationMs ?? 30_000,
    stalledInterval: options.stalledIntervalMs ?? 15_000,
    maxStalledCount: 10,
  };
  const which = options.queues ?? ['train', 'generate'];
  const workers: Worker[] = [];
  const conns: Redis[] = [];
  const connect = (): Redis => {
    const c = createRedis(options.redisUrl);
    c.on('error', (err: Error) => ctx.log.warn({ err: err.message }, 'redis error'));
    conns.push(c);
    return c;
  };
  if (which.includes('train')) {
    workers.push(
      new Worker<TrainJobData>(
        TRAIN_QUEUE,
        (job: Job<TrainJobData>, token?: string, signal?: AbortSignal) =>
          processTrain(ctx, job, token, signal),
        { ...common, connection: connect() },
      ),
    );
  }
  if (which.includes('generate')) {
    // twice MAX_BATCH in all: a generation is taken while others finish their bookkeeping; those
    // beyond a full batch wait in it for a place. A BullMQ worker takes one job per round trip, and
    // each round trip waits for the decoding step in progress, so requests that arrive together
    // would join one step after another: several workers (one per 8 places of the batch) take them
    // side by side.
    const takers = generateTakers(ctx.maxBatch);
    for (let i = 0; i < takers; i++)
      workers.push(
        new Worker<GenerateJobData>(
          GENERATE_QUEUE,
          (job: Job<GenerateJobData>, _token?: string, signal?: AbortSignal) =>
            processGenerate(ctx, job, signal),
          { ...common, concurrency: Math.ceil((2 * ctx.maxBatch) / takers), connection: connect() },
        ),
      );
  }
  for (const w of workers) {
    w.on('error', (err) => ctx.log.error({ err: err.message }, 'worker error'));
    await w.waitUntilReady();
  }
  // listed by the API's /readyz and /metrics (backend, device, GPU memory)
  const presence = startPresence(redis, prefix, which);
  await presence.refresh().catch(() => undefined);
  let closing: Promise<void> | null = null;
  return {
    ctx,
    workers,
    close() {
      if (closing) return closing;
      ctx.draining = true;
      closing = (async () => {
        await Promise.all(workers.map((w) => w.close()));
        await presence.stop();
        await Promise.all(conns.map((c) => closeRedis(c)));
        await closeRedis(sub);
        await closeRedis(redis);
        for (const b of ctx.batchers.values()) b.dispose();
        ctx.batchers.clear();
        ctx.cache.clear();
      })();
      return closing;
    },
  };
}

/** How many BullMQ workers take generation jobs for a batch of `maxBatch` places: one per 8. */
export function generateTakers(maxBatch: number): number {
  return Math.max(1, Math.ceil(maxBatch / 8));
}
