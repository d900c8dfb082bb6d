import type { FastifyInstance } from 'fastify';
import { GenerateBody, GenerateResult, IdParams, errors } from '../models/schemas.js';
import { getTokenizer } from '../workers/engine.js';
import { observeOnce } from '../workers/metrics.js';
import { badRequest, HttpError, notFound, unavailable } from './errors.js';
import { cancelJob, submitGeneration } from './job-control.js';
import { engineCall } from './models.js';
import { clientGone, followEvents, pipeEvents, SseWriter } from './sse.js';

/**
 * Sampling: the request becomes a `generate` job; its tokens come back through the job's Redis
 * Stream, as SSE (`stream: true` or Accept: text/event-stream) or as one JSON answer. A client that
 * disconnects cancels its generation.
 */
export default async function generateRoutes(app: FastifyInstance): Promise<void> {
  const { registry, limits, metrics } = app.svc;

  app.post<{ Params: IdParams; Body: GenerateBody }>(
    '/models/:id/generate',
    {
      schema: {
        tags: ['generation'],
        summary:
          'Generate text. With stream: true or Accept: text/event-stream: SSE `token` {index, tokenId, text} events, then ' +
          '`done` {tokens, text, tokensPerSecond, timeToFirstTokenMs}; otherwise one JSON answer',
        params: IdParams,
        body: GenerateBody,
        produces: ['application/json', 'text/event-stream'],
        response: { 200: GenerateResult, ...errors(400, 401, 404, 500, 503) },
      },
    },
    async (request, reply) => {
      const b = request.body;
      const model = await registry.getModel(request.params.id);
      if (!model) throw notFound('model', request.params.id);
      if (b.maxTokens > limits.maxTokens)
        throw badRequest(`maxTokens: ${b.maxTokens} is over the limit MAX_TOKENS=${limits.maxTokens}`);
      if ((b.prompt === undefined) === (b.promptTokens === undefined))
        throw badRequest('prompt: expected exactly one of prompt or promptTokens');
      let promptTokens: number[];
      if (b.promptTokens) {
        promptTokens = b.promptTokens;
        const bad = promptTokens.findIndex((t) => t >= model.numTokens);
        if (bad >= 0)
          throw badRequest(
            `promptTokens[${bad}]: expected an id below numTokens ${model.numTokens}, got ${promptTokens[bad]}`,
          );
      } else {
        const tokenizer = engineCall(() => getTokenizer(model.tokenizer));
        promptTokens = tokenizer.encode(b.prompt!);
        if (!promptTokens.length)
          throw badRequest('prompt: expected at least one token, got an empty prompt');
      }
      if (promptTokens.length > limits.maxSeqLen)
        throw badRequest(
          `prompt: ${promptTokens.length} tokens is over the limit MAX_SEQ_LEN=${limits.maxSeqLen}`,
        );
      const jobId = await submitGeneration(app.svc, model, {
        promptTokens,
        maxTokens: b.maxTokens,
        temperature: b.temperature,
        topK: b.topK,
        topP: b.topP,
        minP: b.minP,
        stop: b.stop,
        seed: b.seed,
        cacheKv: b.cacheKv,
        precision: b.precision,
      });
      const gone = clientGone(reply);
      gone.signal.addEventListener('abort', () => {
        void cancelJob(app.svc, { id: jobId, type: 'generate' }, { tokens: 0 }).catch(() => undefined);
      });
      const onDone = (d: Record<string, unknown>) => {
        const n = Array.isArray(d.tokens) ? d.tokens.length : 0;
        metrics.generatedTokens.inc(n);
        if (typeof d.tokensPerSecond === 'number') metrics.generateTokensPerSecond.observe(d.tokensPerSecond);
      };
      const firstToken = observeOnce(metrics.generateTimeToFirstToken, () => reply.elapsedTime);
      const onEvent = (ev: { event: string; data: Record<string, unknown> }) => {
        if (ev.event === 'token') firstToken();
        else if (ev.event === 'done') onDone(ev.data);
      };
      const wantsSse = b.stream === true || (request.headers.accept ?? '').includes('text/event-stream');
      if (wantsSse) {
        reply.raw.setHeader('x-job-id', jobId);
        const sse = new SseWriter(reply);
        sse.event({ id: '0-0', event: 'start', data: { jobId, promptTokens: promptTokens.length } });
        await pipeEvents(
          sse,
          registry,
          jobId,
          '0',
          { gone: gone.signal, closing: app.svc.closing },
          reply.log,
          onEvent,
        );
        return;
      }
      const signal = AbortSignal.any([gone.signal, app.svc.closing]);
      for await (const ev of followEvents(registry, jobId, '0', signal)) {
        onEvent(ev);
        if (ev.event === 'done') {
          return { jobId, ...(ev.data as Omit<GenerateResult, 'jobId'>) };
        }
        if (ev.event === 'failed') throw new HttpError(500, `generation failed: ${String(ev.data.error)}`);
        if (ev.event === 'cancelled') throw new HttpError(409, `generation ${jobId} was cancelled`);
      }
      if (app.svc.closing.aborted)
        throw unavailable(
          `the server is shutting down; generation ${jobId} goes on: read it at /v1/jobs/${jobId}`,
        );
      throw new HttpError(500, `generation ${jobId} ended without a result`);
    },
  );
}
