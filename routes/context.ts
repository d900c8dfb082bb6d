import type { Queue } from 'bullmq';
import type { Redis } from 'ioredis';
import type { Registry } from '../models/registry.js';
import type { Storage } from '../models/storage.js';
import type { ServiceLimits } from '../service/config.js';
import type { ModelBuilder } from '../workers/build-pool.js';
import type { ServiceMetrics } from '../workers/metrics.js';
import type { GenerateJobData, TrainJobData } from '../workers/queues.js';

/** What the route plugins share: registry, files, queues, limits, metrics. */
export interface ServiceContext {
  redis: Redis;
  redisUrl: string;
  registry: Registry;
  storage: Storage;
  trainQueue: Queue<TrainJobData>;
  generateQueue: Queue<GenerateJobData>;
  limits: ServiceLimits;
  metrics: ServiceMetrics;
  /** Builds new models' initial weights off the event loop. */
  builder: ModelBuilder;
  /** Aborted when the app starts closing: open event streams end, telling their clients to reconnect. */
  closing: AbortSignal;
}

declare module 'fastify' {
  interface FastifyInstance {
    svc: ServiceContext;
  }
}
