import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyServerOptions } from 'fastify';
import multipart from '@fastify/multipart';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import { Queue } from 'bullmq';
import { Registry } from '../models/registry.js';
import { Storage } from '../models/storage.js';
import { defaultLimits, type ServiceLimits } from '../service/config.js';
import { ModelBuilder } from '../workers/build-pool.js';
import { createMetrics, type ServiceMetrics } from '../workers/metrics.js';
import {
  closeRedis,
  createRedis,
  within,
  GENERATE_QUEUE,
  TRAIN_QUEUE,
  type GenerateJobData,
  type TrainJobData,
} from '../workers/queues.js';
import { bearerRefusal } from './auth.js';
import dashboardRoutes from './dashboard.js';
import type { ServiceContext } from './context.js';
import datasetRoutes from './datasets.js';
import { installErrorHandling } from './errors.js';
import generateRoutes from './generate.js';
import healthRoutes from './health.js';
import jobRoutes from './jobs.js';
import modelRoutes from './models.js';
import openaiRoutes from './openai.js';

export interface AppOptions {
  redisUrl: string;
  dataDir: string;
  /** Redis key prefix for the registry and queues (default xt). */
  prefix?: string;
  /** Bearer keys for /v1 routes; empty or unset: open. */
  apiKeys?: string[];
  limits?: Partial<ServiceLimits>;
  logger?: FastifyServerOptions['logger'];
  /** A logger to use instead of `logger`'s options (the service's own, pretty on a terminal). */
  loggerInstance?: FastifyBaseLogger;
  /** Shared metrics (e.g. with an in-process worker); created when absent. */
  metrics?: ServiceMetrics;
}

/** The API's OpenAPI description (also used by `npm run openapi`). */
export const OPENAPI_INFO = {
  title: 'x-transformers-ts service',
  description:
    'Define transformer models as JSON, upload text, train them on BullMQ workers and stream generations over ' +
    'server-sent events.',
  version: '0.1.0',
};

/**
 * Assembles the HTTP API: error shape, metrics, OpenAPI (/openapi.json, Swagger UI at /docs),
 * health routes, the web dashboard at /, and the /v1 routes (behind bearer keys when `apiKeys` is set). The app owns its
 * Redis connections and queues and closes them in `app.close()`.
 */
export async function buildApp(options: AppOptions): Promise<FastifyInstance> {
  const limits: ServiceLimits = { ...defaultLimits, ...options.limits };
  const app = (
    options.loggerInstance
      ? Fastify({ loggerInstance: options.loggerInstance, bodyLimit: limits.maxBodyBytes })
      : Fastify({ logger: options.logger ?? false, bodyLimit: limits.maxBodyBytes })
  ) as FastifyInstance;
  const prefix = options.prefix ?? 'xt';
  const closing = new AbortController();
  const redis = createRedis(options.redisUrl);
  const queueConn = createRedis(options.redisUrl);
  const ctx: ServiceContext = {
    redis,
    redisUrl: options.redisUrl,
    registry: new Registry(redis, prefix),
    storage: new Storage(options.dataDir),
    trainQueue: new Queue<TrainJobData>(TRAIN_QUEUE, { connection: queueConn, prefix }),
    generateQueue: new Queue<GenerateJobData>(GENERATE_QUEUE, { connection: queueConn, prefix }),
    limits,
    metrics: options.metrics ?? createMetrics(),
    closing: closing.signal,
    builder: new ModelBuilder(),
  };
  ctx.trainQueue.on('error', (err) => app.log.error({ err: err.message }, 'train queue error'));
  ctx.generateQueue.on('error', (err) => app.log.error({ err: err.message }, 'generate queue error'));
  for (const c of [redis, queueConn])
    c.on('error', (err) => app.log.warn({ err: err.message }, 'redis error'));
  app.decorate('svc', ctx);
  // before the server stops accepting: end open event streams, or closing would wait on them
  app.addHook('preClose', async () => closing.abort());
  app.addHook('onClose', async () => {
    const up = redis.status === 'ready';
    await within(ctx.trainQueue.close(), up ? 5000 : 100);
    await within(ctx.generateQueue.close(), up ? 5000 : 100);
    await ctx.builder.close();
    ctx.registry.closeReaders();
    await closeRedis(queueConn);
    await closeRedis(redis);
  });

  installErrorHandling(app, limits);
  // uploads arrive as bytes: a text body is checked as UTF-8 by its route, not decoded with replacements
  app.removeContentTypeParser('text/plain');
  for (const type of ['application/octet-stream', 'text/plain']) {
    app.addContentTypeParser(type, { parseAs: 'buffer' }, (_req, body, done) => done(null, body));
  }
  await app.register(multipart, { limits: { fileSize: limits.maxUploadBytes, files: 1 } });
  app.addHook('onResponse', async (request, reply) => {
    ctx.metrics.httpDuration.observe(
      {
        method: request.method,
        route: request.routeOptions.url ?? 'unmatched',
        status_code: String(reply.statusCode),
      },
      reply.elapsedTime / 1000,
    );
  });

  await app.register(swagger, {
    openapi: {
      openapi: '3.0.3',
      info: OPENAPI_INFO,
      tags: [
        { name: 'models', description: 'Model definitions, weights and checkpoints' },
        { name: 'datasets', description: 'Training text' },
        { name: 'jobs', description: 'Training jobs and their event streams' },
        { name: 'generation', description: 'Sampling' },
        { name: 'health', description: 'Liveness, readiness, metrics' },
        { name: 'openai', description: 'OpenAI-compatible completions and chat completions' },
      ],
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
    },
  });
  await app.register(swaggerUi, { routePrefix: '/docs' });
  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());

  await app.register(healthRoutes);
  await app.register(dashboardRoutes);
  const keys = (options.apiKeys ?? []).map((k) => Buffer.from(k));
  await app.register(
    async (v1) => {
      v1.addHook('onRequest', async (request, reply) => {
        const refusal = bearerRefusal(request.headers.authorization, keys);
        if (refusal)
          return reply
            .status(401)
            .header('www-authenticate', 'Bearer')
            .send({ statusCode: 401, error: 'Unauthorized', message: refusal });
      });
      v1.addHook('onRoute', (route) => {
        route.schema = { ...route.schema, security: [{ bearer: [] }] };
      });
      await v1.register(modelRoutes);
      await v1.register(datasetRoutes);
      await v1.register(jobRoutes);
      await v1.register(generateRoutes);
    },
    { prefix: '/v1' },
  );
  await app.register(openaiRoutes, { prefix: '/openai/v1', keys });
  return app;
}
