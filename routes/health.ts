import type { FastifyInstance } from 'fastify';
import { Health, Ready } from '../models/schemas.js';
import { engineStatus } from '../workers/engine.js';
import { listWorkers, localCuda, type WorkerPresence } from '../workers/presence.js';

/** Liveness, readiness (Redis and engine) and Prometheus metrics. */
export default async function healthRoutes(app: FastifyInstance): Promise<void> {
  app.get(
    '/healthz',
    { schema: { tags: ['health'], summary: 'Liveness: the process answers', response: { 200: Health } } },
    async () => ({ status: 'ok' }),
  );

  app.get(
    '/readyz',
    {
      schema: {
        tags: ['health'],
        summary:
          'Readiness: Redis answers and the tensor engine is loaded (503 otherwise); lists the live workers with their device',
        response: { 200: Ready, 503: Ready },
      },
    },
    async (_req, reply) => {
      let redis: 'ok' | 'down';
      try {
        redis = (await withTimeout(app.svc.redis.ping(), 1000)) === 'PONG' ? 'ok' : 'down';
      } catch {
        redis = 'down';
      }
      const eng = engineStatus();
      const ok = redis === 'ok' && eng.ready;
      let workers: WorkerPresence[] | undefined;
      if (redis === 'ok') {
        try {
          workers = await withTimeout(listWorkers(app.svc.redis, app.svc.registry.prefix), 1000);
        } catch {
          workers = undefined;
        }
      }
      const cuda = localCuda();
      return reply.status(ok ? 200 : 503).send({
        status: ok ? 'ok' : 'unavailable',
        backend: eng.backend,
        device: eng.device,
        ...(cuda ? { cuda } : {}),
        redis,
        ...(eng.reason ? { engine: eng.reason } : {}),
        ...(workers ? { workers } : {}),
      });
    },
  );

  app.get(
    '/metrics',
    { schema: { tags: ['health'], summary: 'Prometheus metrics (text exposition format)' } },
    async (_req, reply) => {
      const { metrics, trainQueue, generateQueue } = app.svc;
      try {
        metrics.setWorkers(await withTimeout(listWorkers(app.svc.redis, app.svc.registry.prefix), 1000));
      } catch {
        // Redis down: serve the rest
      }
      for (const q of [trainQueue, generateQueue]) {
        try {
          const counts = await q.getJobCounts('waiting', 'active', 'delayed', 'completed', 'failed');
          for (const [state, n] of Object.entries(counts))
            metrics.queueDepth.set({ queue: q.name, state }, n);
        } catch {
          // Redis down: serve the rest
        }
      }
      return reply.type(metrics.registry.contentType).send(await metrics.registry.metrics());
    },
  );
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('timeout')), ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e: unknown) => {
        clearTimeout(t);
        reject(e as Error);
      },
    );
  });
}
