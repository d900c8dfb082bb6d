import type { FastifyInstance } from 'fastify';
import { Type } from '@sinclair/typebox';
import { randomUUID } from 'node:crypto';
import { isTerminal } from '../models/registry.js';
import { IdParams, JobAccepted, JobView, TRAIN_DEFAULTS, TrainBody, errors } from '../models/schemas.js';
import type { TrainJobData } from '../workers/queues.js';
import { badRequest, conflict, notFound } from './errors.js';
import { cancelJob } from './job-control.js';
import { clientGone, pipeEvents, resumeId, SseWriter } from './sse.js';

/** Training jobs: start, read, cancel, and follow progress over server-sent events. */
export default async function jobRoutes(app: FastifyInstance): Promise<void> {
  const { registry, limits, trainQueue } = app.svc;

  app.post<{ Params: IdParams; Body: TrainBody }>(
    '/models/:id/train',
    {
      schema: {
        tags: ['jobs'],
        summary:
          'Start training the model on a dataset (a `train` job); follow it at /v1/jobs/{jobId}/events',
        params: IdParams,
        body: TrainBody,
        response: { 202: JobAccepted, ...errors(400, 401, 404) },
      },
    },
    async (request, reply) => {
      const model = await registry.getModel(request.params.id);
      if (!model) throw notFound('model', request.params.id);
      const b = {
        ...request.body,
        batchSize: request.body.batchSize ?? TRAIN_DEFAULTS.batchSize,
        seqLen:
          request.body.seqLen ?? Math.min(model.maxSeqLen, TRAIN_DEFAULTS.maxDefaultSeqLen, limits.maxSeqLen),
        learningRate: request.body.learningRate ?? TRAIN_DEFAULTS.learningRate,
      };
      const dataset = await registry.getDataset(b.datasetId);
      if (!dataset) throw notFound('dataset', b.datasetId);
      if (b.steps > limits.maxSteps)
        throw badRequest(`steps: ${b.steps} is over the limit MAX_STEPS=${limits.maxSteps}`);
      if (b.batchSize > limits.maxBatchSize)
        throw badRequest(`batchSize: ${b.batchSize} is over the limit MAX_BATCH_SIZE=${limits.maxBatchSize}`);
      if (b.seqLen > limits.maxSeqLen)
        throw badRequest(`seqLen: ${b.seqLen} is over the limit MAX_SEQ_LEN=${limits.maxSeqLen}`);
      if (b.seqLen > model.maxSeqLen)
        throw badRequest(`seqLen: ${b.seqLen} is over the model's maxSeqLen ${model.maxSeqLen}`);
      if (b.warmupSteps !== undefined && b.warmupSteps > b.steps)
        throw badRequest(`warmupSteps: expected at most steps (${b.steps}), got ${b.warmupSteps}`);
      const jobId = randomUUID();
      const data: TrainJobData = {
        jobId,
        modelId: model.id,
        ...b,
        checkpointEvery: b.checkpointEvery ?? Math.max(1, Math.ceil(b.steps / 10)),
      };
      await registry.createJob({ id: jobId, type: 'train', modelId: model.id });
      await trainQueue.add('train', data, { jobId, attempts: 1, removeOnComplete: 1000, removeOnFail: 1000 });
      return reply.status(202).send({ jobId });
    },
  );

  app.get<{ Params: IdParams }>(
    '/jobs/:id',
    {
      schema: {
        tags: ['jobs'],
        summary: 'Read a job (train or generate)',
        params: IdParams,
        response: { 200: JobView, ...errors(401, 404) },
      },
    },
    async (request) => {
      const job = await registry.getJob(request.params.id);
      if (!job) throw notFound('job', request.params.id);
      return job;
    },
  );

  app.delete<{ Params: IdParams }>(
    '/jobs/:id',
    {
      schema: {
        tags: ['jobs'],
        summary:
          'Cancel a job: a waiting job is dropped, a running one stops within one step (409 once finished)',
        params: IdParams,
        response: { 202: JobView, ...errors(401, 404, 409) },
      },
    },
    async (request, reply) => {
      const job = await registry.getJob(request.params.id);
      if (!job) throw notFound('job', request.params.id);
      if (isTerminal(job.state)) throw conflict(`job ${job.id} already ${job.state}`);
      await cancelJob(app.svc, job, { step: Number(job.progress.step ?? 0) });
      return reply.status(202).send((await registry.getJob(job.id)) ?? job);
    },
  );

  app.get<{ Params: IdParams; Querystring: { lastEventId?: string } }>(
    '/jobs/:id/events',
    {
      schema: {
        tags: ['jobs'],
        summary:
          'Server-sent events of a job: `tokenizing` {progress, tokens} (the first job on a dataset and tokenizer), ' +
          '`tokens` {tokenizer, tokens, cached, tokenizeMs, loadMs}, ' +
          '`progress` {step, steps, loss, learningRate, tokensPerSecond}, `checkpoint`, ' +
          '`eval`, `resumed`, then `completed` | `failed` | `cancelled` (generation: `token`, then `done`). ' +
          'Every event has an id; reconnect with Last-Event-ID to get what was missed.',
        params: IdParams,
        querystring: Type.Object({ lastEventId: Type.Optional(Type.String()) }),
        produces: ['text/event-stream'],
        response: { ...errors(401, 404) },
      },
    },
    async (request, reply) => {
      const job = await registry.getJob(request.params.id);
      if (!job) throw notFound('job', request.params.id);
      const from = resumeId(request.headers['last-event-id'] ?? request.query.lastEventId);
      const gone = clientGone(reply);
      const sse = new SseWriter(reply);
      await pipeEvents(
        sse,
        registry,
        job.id,
        from,
        { gone: gone.signal, closing: app.svc.closing },
        reply.log,
      );
    },
  );
}
