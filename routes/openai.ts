import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { Type, type Static, type TSchema } from '@sinclair/typebox';
import { randomUUID } from 'node:crypto';
import { isId } from '../models/ids.js';
import type { ModelRecord } from '../models/schemas.js';
import { getTokenizer } from '../workers/engine.js';
import type { GenerateJobResult } from '../workers/generate.js';
import { observeOnce } from '../workers/metrics.js';
import { bearerRefusal } from './auth.js';
import { CHAT_STOP, renderChat, type ChatMessage } from './chat-template.js';
import { errorStatus, HttpError } from './errors.js';
import { cancelJob, submitGeneration, type GenerationRequest } from './job-control.js';
import { engineCall } from './models.js';
import { clientGone, followEvents, SseWriter } from './sse.js';

/**
 * The OpenAI-compatible API (base URL `/openai/v1`): `GET /models`, `POST /completions`,
 * `POST /chat/completions` (under the plain template of chat-template.ts), with `stream: true` as
 * SSE `data: {...}` chunks ending in `data: [DONE]`. Each choice is one `generate` job; errors have
 * OpenAI's shape `{error: {message, type, param, code}}`. Bearer keys are the API's `API_KEYS`.
 */

// ---- schemas ------------------------------------------------------------------------------------

const OpenAiError = Type.Object(
  {
    error: Type.Object({
      message: Type.String(),
      type: Type.String(),
      param: Type.Union([Type.String(), Type.Null()]),
      code: Type.Union([Type.String(), Type.Null()]),
    }),
  },
  { description: "OpenAI's error shape" },
);

const errorsOf = (...codes: number[]): Record<number, TSchema> =>
  Object.fromEntries(codes.map((c) => [c, OpenAiError]));

/** Most choices (n × prompts) one request may ask for. */
export const MAX_CHOICES = 16;

const Stop = Type.Union(
  [Type.String({ minLength: 1 }), Type.Array(Type.String({ minLength: 1 }), { maxItems: 4 }), Type.Null()],
  { description: 'Up to 4 strings; the text stops before the first of them' },
);

const sampling = {
  model: Type.String({ minLength: 1, description: 'A model id, or a model name (GET /models)' }),
  temperature: Type.Optional(Type.Number({ minimum: 0, maximum: 2, description: '0 = greedy; default 1' })),
  top_p: Type.Optional(Type.Number({ exclusiveMinimum: 0, maximum: 1 })),
  stop: Type.Optional(Stop),
  seed: Type.Optional(
    Type.Integer({ description: 'Same seed, same text; choice i of n samples with seed + i' }),
  ),
  n: Type.Optional(Type.Integer({ minimum: 1, maximum: MAX_CHOICES })),
  stream: Type.Optional(Type.Boolean()),
  stream_options: Type.Optional(
    Type.Object({ include_usage: Type.Optional(Type.Boolean()) }, { additionalProperties: false }),
  ),
  user: Type.Optional(Type.String()),
};

const CompletionBody = Type.Object(
  {
    ...sampling,
    prompt: Type.Union(
      [
        Type.String(),
        Type.Array(Type.String(), { minItems: 1, maxItems: MAX_CHOICES }),
        Type.Array(Type.Integer({ minimum: 0 }), { minItems: 1 }),
      ],
      { description: 'Text, several texts (one set of choices each), or token ids' },
    ),
    max_tokens: Type.Optional(Type.Integer({ minimum: 1, description: 'Default 16' })),
  },
  { additionalProperties: false },
);
type CompletionBody = Static<typeof CompletionBody>;

const Role = Type.Union([
  Type.Literal('system'),
  Type.Literal('developer'),
  Type.Literal('user'),
  Type.Literal('assistant'),
]);
const TextPart = Type.Object({ type: Type.Literal('text'), text: Type.String() });

const ChatBody = Type.Object(
  {
    ...sampling,
    messages: Type.Array(
      Type.Object({
        role: Role,
        content: Type.Union([Type.String(), Type.Array(TextPart)]),
        name: Type.Optional(Type.String()),
      }),
      { minItems: 1 },
    ),
    max_tokens: Type.Optional(Type.Integer({ minimum: 1 })),
    max_completion_tokens: Type.Optional(
      Type.Integer({ minimum: 1, description: "Default: what is left of the model's maxSeqLen" }),
    ),
  },
  { additionalProperties: false },
);
type ChatBody = Static<typeof ChatBody>;

const Usage = Type.Object({
  prompt_tokens: Type.Integer(),
  completion_tokens: Type.Integer(),
  total_tokens: Type.Integer(),
});
type Usage = Static<typeof Usage>;

const FinishReason = Type.Union([Type.Literal('stop'), Type.Literal('length')]);

const Completion = Type.Object({
  id: Type.String(),
  object: Type.Literal('text_completion'),
  created: Type.Integer(),
  model: Type.String(),
  choices: Type.Array(
    Type.Object({
      index: Type.Integer(),
      text: Type.String(),
      finish_reason: FinishReason,
      logprobs: Type.Null(),
    }),
  ),
  usage: Usage,
});

const ChatCompletion = Type.Object({
  id: Type.String(),
  object: Type.Literal('chat.completion'),
  created: Type.Integer(),
  model: Type.String(),
  choices: Type.Array(
    Type.Object({
      index: Type.Integer(),
      message: Type.Object({ role: Type.Literal('assistant'), content: Type.String() }),
      finish_reason: FinishReason,
      logprobs: Type.Null(),
    }),
  ),
  usage: Usage,
});

const ModelObject = Type.Object({
  id: Type.String({ description: "The model's id" }),
  object: Type.Literal('model'),
  created: Type.Integer(),
  owned_by: Type.String(),
  name: Type.String({ description: "The model's name (requests may name it instead of the id)" }),
});

// ---- errors -------------------------------------------------------------------------------------

/** An error answered in OpenAI's shape, naming the request field (`param`) at fault. */
export class OpenAiHttpError extends HttpError {
  constructor(
    statusCode: number,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
  ) {
    super(statusCode, message);
  }
}

const invalid = (param: string, message: string) => new OpenAiHttpError(400, `${param}: ${message}`, param);

function errorType(status: number): string {
  if (status === 401) return 'authentication_error';
  if (status === 404) return 'not_found_error';
  if (status >= 500) return 'server_error';
  return 'invalid_request_error';
}

function errorBody(status: number, message: string, param: string | null, code: string | null) {
  return { error: { message, type: errorType(status), param, code } };
}

/** The field a schema validation error is about, and a message naming it. */
function validationError(err: FastifyError): { param: string | null; message: string } {
  const v = err.validation?.[0];
  if (!v) return { param: null, message: err.message };
  const params = v.params as Record<string, unknown>;
  const path = v.instancePath.replace(/^\//, '').replace(/\//g, '.');
  if (typeof params.additionalProperty === 'string') {
    const param = path ? `${path}.${params.additionalProperty}` : params.additionalProperty;
    return { param, message: `${param}: not a supported field` };
  }
  if (typeof params.missingProperty === 'string') {
    const param = path ? `${path}.${params.missingProperty}` : params.missingProperty;
    return { param, message: `${param}: required` };
  }
  return { param: path || null, message: `${path || 'body'}: ${v.message ?? 'invalid'}` };
}

// ---- requests -----------------------------------------------------------------------------------

/** A resolved request: the model, each prompt's tokens, and the sampling every choice shares. */
interface Plan {
  model: ModelRecord;
  modelName: string;
  prompts: number[][];
  n: number;
  sampling: Omit<GenerationRequest, 'promptTokens' | 'seed'>;
  seed?: number;
  includeUsage: boolean;
}

/** One choice's outcome. */
interface Choice {
  index: number;
  text: string;
  tokens: number;
  finishReason: 'stop' | 'length';
}

function textOf(content: ChatBody['messages'][number]['content']): string {
  return typeof content === 'string' ? content : content.map((p) => p.text).join('');
}

export default async function openaiRoutes(app: FastifyInstance, options: { keys: Buffer[] }): Promise<void> {
  const { registry, limits, metrics } = app.svc;

  app.setErrorHandler((err: FastifyError & { statusCode?: number }, request, reply) => {
    const { statusCode, message } = errorStatus(err, request, limits);
    let param: string | null = null;
    let code: string | null = null;
    let text = message;
    if (err instanceof OpenAiHttpError) ({ param, code } = err);
    else if (err.validation) ({ param, message: text } = validationError(err));
    if (statusCode === 413) reply.header('connection', 'close');
    if (statusCode >= 500) request.log.error({ err }, 'request failed');
    void reply
      .status(statusCode)
      .type('application/json')
      .send(errorBody(statusCode, text, param, code));
  });
  app.setNotFoundHandler((request, reply) => {
    void reply
      .status(404)
      .send(
        errorBody(404, `route ${request.method} ${request.url.split('?')[0]} not found`, null, 'not_found'),
      );
  });
  app.addHook('onRequest', async (request, reply) => {
    const refusal = bearerRefusal(request.headers.authorization, options.keys);
    if (refusal)
      return reply
        .status(401)
        .header('www-authenticate', 'Bearer')
        .send(errorBody(401, refusal, null, 'invalid_api_key'));
  });
  // the app's validator drops unknown fields silently; here a field the API does not support is an
  // error naming it, so a client never believes a setting (logit_bias, presence_penalty) was applied
  app.addHook('preValidation', async (request) => {
    const schema = request.routeOptions.schema?.body as { properties?: Record<string, unknown> } | undefined;
    const body = request.body;
    if (!schema?.properties || !body || typeof body !== 'object' || Array.isArray(body)) return;
    const unknown = Object.keys(body).find((k) => !(k in schema.properties!));
    if (unknown !== undefined) throw invalid(unknown, 'not a supported field');
  });
  app.addHook('onRoute', (route) => {
    route.schema = { ...route.schema, tags: ['openai'], security: [{ bearer: [] }] };
  });

  /** A model by id, else by name (a name several models share is refused, listing their ids). */
  const findModel = async (ref: string): Promise<ModelRecord> => {
    if (isId(ref)) {
      const m = await registry.getModel(ref);
      if (m) return m;
    }
    const named = (await registry.listModels()).filter((m) => m.name === ref);
    if (named.length === 1) return named[0]!;
    if (named.length > 1)
      throw invalid(
        'model',
        `the name "${ref}" belongs to ${named.length} models (${named.map((m) => m.id).join(', ')}); use an id`,
      );
    throw new OpenAiHttpError(
      404,
      `model: no model has the id or name "${ref}" (GET /openai/v1/models lists them)`,
      'model',
      'model_not_found',
    );
  };

  const encode = (model: ModelRecord, text: string, param: string): number[] => {
    const tokens = engineCall(() => getTokenizer(model.tokenizer)).encode(text);
    if (!tokens.length) throw invalid(param, 'expected at least one token, got an empty prompt');
    return tokens;
  };

  /** The checks and settings both endpoints share. */
  const planOf = (
    body: CompletionBody | ChatBody,
    model: ModelRecord,
    prompts: number[][],
    maxTokens: number,
    maxTokensParam: string,
    stop: string[],
  ): Plan => {
    const n = body.n ?? 1;
    if (n * prompts.length > MAX_CHOICES)
      throw invalid('n', `${n} choices for each of ${prompts.length} prompts is over ${MAX_CHOICES} in all`);
    if (maxTokens > limits.maxTokens)
      throw invalid(maxTokensParam, `${maxTokens} is over the limit MAX_TOKENS=${limits.maxTokens}`);
    for (const p of prompts) {
      if (p.length > limits.maxSeqLen)
        throw invalid('prompt', `${p.length} tokens is over the limit MAX_SEQ_LEN=${limits.maxSeqLen}`);
      const bad = p.findIndex((t) => t >= model.numTokens);
      if (bad >= 0)
        throw invalid(
          'prompt',
          `token ${p[bad]} at ${bad} is not below the model's numTokens ${model.numTokens}`,
        );
    }
    return {
      model,
      modelName: body.model,
      prompts,
      n,
      seed: body.seed,
      includeUsage: body.stream_options?.include_usage === true,
      sampling: {
        maxTokens,
        temperature: body.temperature,
        // top_p 1 keeps every token: no filter
        topP: body.top_p !== undefined && body.top_p < 1 ? body.top_p : undefined,
        stop: stop.length ? stop : undefined,
      },
    };
  };

  const stopOf = (stop: CompletionBody['stop']): string[] =>
    stop === undefined || stop === null ? [] : typeof stop === 'string' ? [stop] : stop;

  /**
   * Runs a plan's choices as generate jobs: `onToken` sees each piece of text as it comes; resolves
   * to the choices in order. A client that goes away cancels every job of the request.
   */
  const runChoices = async (
    plan: Plan,
    reply: FastifyReply,
    onToken: (index: number, text: string) => void,
  ): Promise<Choice[]> => {
    const jobs: string[] = [];
    const gone = clientGone(reply);
    const cancelAll = () => {
      for (const id of jobs)
        void cancelJob(app.svc, { id, type: 'generate' }, { tokens: 0 }).catch(() => undefined);
    };
    gone.signal.addEventListener('abort', cancelAll);
    for (const promptTokens of plan.prompts) {
      for (let i = 0; i < plan.n; i++) {
        const seed = plan.seed === undefined ? undefined : plan.seed + i;
        jobs.push(await submitGeneration(app.svc, plan.model, { ...plan.sampling, promptTokens, seed }));
      }
    }
    if (gone.signal.aborted) cancelAll();
    const signal = AbortSignal.any([gone.signal, app.svc.closing]);
    return Promise.all(
      jobs.map(async (jobId, index): Promise<Choice> => {
        const firstToken = observeOnce(metrics.generateTimeToFirstToken, () => reply.elapsedTime);
        for await (const ev of followEvents(registry, jobId, '0', signal)) {
          if (ev.event === 'token') {
            firstToken();
            const piece = String(ev.data.text ?? '');
            if (piece) onToken(index, piece);
          } else if (ev.event === 'done') {
            const r = ev.data as GenerateJobResult;
            metrics.generatedTokens.inc(r.tokens.length);
            if (typeof r.tokensPerSecond === 'number')
              metrics.generateTokensPerSecond.observe(r.tokensPerSecond);
            return {
              index,
              text: r.text,
              tokens: r.tokens.length,
              finishReason: r.finishReason === 'length' ? 'length' : 'stop',
            };
          } else if (ev.event === 'failed') {
            throw new OpenAiHttpError(500, `generation failed: ${String(ev.data.error)}`);
          } else if (ev.event === 'cancelled') {
            throw new OpenAiHttpError(409, `generation ${jobId} was cancelled`);
          }
        }
        if (app.svc.closing.aborted) throw new OpenAiHttpError(503, 'the server is shutting down; retry');
        throw new OpenAiHttpError(500, `generation ${jobId} ended without a result`);
      }),
    );
  };

  const usageOf = (plan: Plan, choices: Choice[]): Usage => {
    const prompt = plan.prompts.reduce((s, p) => s + p.length, 0);
    const completion = choices.reduce((s, c) => s + c.tokens, 0);
    return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
  };

  /**
   * Answers a plan: one JSON object, or (stream) SSE chunks from `chunk(index, piece | end)` and
   * `data: [DONE]`. A failure once streaming has begun is sent as a chunk in OpenAI's error shape.
   */
  const answer = async (
    request: FastifyRequest,
    reply: FastifyReply,
    plan: Plan,
    stream: boolean,
    shape: {
      id: string;
      object: string;
      whole(choices: Choice[], usage: Usage): unknown;
      start?(index: number): unknown;
      piece(index: number, text: string): unknown;
      end(index: number, finishReason: Choice['finishReason']): unknown;
    },
  ) => {
    const created = Math.floor(Date.now() / 1000);
    if (!stream) {
      const choices = await runChoices(plan, reply, () => undefined);
      return {
        id: shape.id,
        object: shape.object,
        created,
        model: plan.modelName,
        ...(shape.whole(choices, usageOf(plan, choices)) as object),
      };
    }
    const sse = new SseWriter(reply);
    const write = (choices: unknown[], extra: object = {}) =>
      sse.data({ id: shape.id, object: shape.object, created, model: plan.modelName, choices, ...extra });
    try {
      const total = plan.prompts.length * plan.n;
      if (shape.start) write(Array.from({ length: total }, (_, i) => shape.start!(i)));
      const choices = await runChoices(plan, reply, (index, text) => write([shape.piece(index, text)]));
      for (const c of choices) write([shape.end(c.index, c.finishReason)]);
      if (plan.includeUsage) write([], { usage: usageOf(plan, choices) });
      sse.data('[DONE]');
    } catch (e) {
      const status = e instanceof HttpError ? e.statusCode : 500;
      if (status >= 500) request.log.error({ err: (e as Error).message }, 'stream failed');
      sse.data(errorBody(status, (e as Error).message, null, null));
    } finally {
      sse.end();
    }
    return reply;
  };

  app.get(
    '/models',
    {
      schema: {
        summary: 'OpenAI-compatible: the models, by id (a request may use the name instead)',
        response: {
          200: Type.Object({ object: Type.Literal('list'), data: Type.Array(ModelObject) }),
          ...errorsOf(401),
        },
      },
    },
    async () => ({
      object: 'list' as const,
      data: (await registry.listModels()).map((m) => ({
        id: m.id,
        object: 'model' as const,
        created: Math.floor(Date.parse(m.createdAt) / 1000),
        owned_by: 'x-transformers-ts',
        name: m.name,
      })),
    }),
  );

  app.post<{ Body: CompletionBody }>(
    '/completions',
    {
      schema: {
        summary:
          'OpenAI-compatible text completion; `stream: true` sends SSE `data: {...}` chunks, then `data: [DONE]`',
        body: CompletionBody,
        produces: ['application/json', 'text/event-stream'],
        response: { 200: Completion, ...errorsOf(400, 401, 404, 409, 413, 500, 503) },
      },
    },
    async (request, reply) => {
      const b = request.body;
      const model = await findModel(b.model);
      const p = b.prompt;
      const prompts =
        typeof p === 'string'
          ? [encode(model, p, 'prompt')]
          : p.every((x) => typeof x === 'number')
            ? [p as number[]]
            : (p as string[]).map((s, i) => encode(model, s, `prompt[${i}]`));
      const plan = planOf(b, model, prompts, b.max_tokens ?? 16, 'max_tokens', stopOf(b.stop));
      return answer(request, reply, plan, b.stream === true, {
        id: `cmpl-${randomUUID()}`,
        object: 'text_completion',
        whole: (choices, usage) => ({
          choices: choices.map((c) => ({
            index: c.index,
            text: c.text,
            finish_reason: c.finishReason,
            logprobs: null,
          })),
          usage,
        }),
        piece: (index, text) => ({ index, text, finish_reason: null, logprobs: null }),
        end: (index, finishReason) => ({ index, text: '', finish_reason: finishReason, logprobs: null }),
      });
    },
  );

  app.post<{ Body: ChatBody }>(
    '/chat/completions',
    {
      schema: {
        summary:
          'OpenAI-compatible chat completion under the plain template ("System: …", "User: …", "Assistant: …" lines, ' +
          'ending in "Assistant:"); stops at a new "User:" or "System:" line',
        body: ChatBody,
        produces: ['application/json', 'text/event-stream'],
        response: { 200: ChatCompletion, ...errorsOf(400, 401, 404, 409, 413, 500, 503) },
      },
    },
    async (request, reply) => {
      const b = request.body;
      const model = await findModel(b.model);
      const messages: ChatMessage[] = b.messages.map((m) => ({ role: m.role, content: textOf(m.content) }));
      const prompt = encode(model, renderChat(messages), 'messages');
      const param = b.max_completion_tokens !== undefined ? 'max_completion_tokens' : 'max_tokens';
      const maxTokens =
        b.max_completion_tokens ??
        b.max_tokens ??
        Math.max(1, Math.min(limits.maxTokens, model.maxSeqLen - prompt.length));
      const plan = planOf(b, model, [prompt], maxTokens, param, [...stopOf(b.stop), ...CHAT_STOP]);
      return answer(request, reply, plan, b.stream === true, {
        id: `chatcmpl-${randomUUID()}`,
        object: b.stream === true ? 'chat.completion.chunk' : 'chat.completion',
        whole: (choices, usage) => ({
          choices: choices.map((c) => ({
            index: c.index,
            message: { role: 'assistant', content: c.text },
            finish_reason: c.finishReason,
            logprobs: null,
          })),
          usage,
        }),
        start: (index) => ({
          index,
          delta: { role: 'assistant', content: '' },
          finish_reason: null,
          logprobs: null,
        }),
        piece: (index, text) => ({ index, delta: { content: text }, finish_reason: null, logprobs: null }),
        end: (index, finishReason) => ({ index, delta: {}, finish_reason: finishReason, logprobs: null }),
      });
    },
  );
}
