import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { BatchDecoder } from '../../src/index.js';
import { generateTakers } from '../../workers/index.js';
import { makeEnv, readSse, tinyDecoder, waitFor, type TestEnv } from './helpers.js';

describe('continuous batching in the worker (real Redis, in-process worker)', () => {
  let env: TestEnv;
  let base: string;
  let modelId: string;
  const sizes: number[] = [];

  beforeAll(async () => {
    // 24 places: three queue workers take generations for the one decode loop of each model; the
    // tokens of two steps go to Redis in one write, as `npm start` has it (TOKEN_WRITE_STEPS)
    env = await makeEnv({
      app: { limits: { maxTokens: 4000 } },
      workers: { maxBatch: 24, tokenWriteSteps: 2 },
    });
    base = await env.app.listen({ port: 0, host: '127.0.0.1' });
    const r = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'rope', config: tinyDecoder({ attnLayers: { rotaryPosEmb: true, depth: 2 } }) },
    });
    modelId = r.json().id;
    // the size of the batch at every step of the worker's decode loops
    const step = BatchDecoder.prototype.step;
    vi.spyOn(BatchDecoder.prototype, 'step').mockImplementation(function (this: BatchDecoder) {
      sizes.push(this.size);
      return step.call(this);
    });
  });
  afterAll(async () => {
    vi.restoreAllMocks();
    await env?.close();
  });

  const generate = async (payload: Record<string, unknown>) => {
    const r = await env.app.inject({ method: 'POST', url: `/v1/models/${modelId}/generate`, payload });
    expect(r.statusCode, r.body).toBe(200);
    return r.json() as { tokens: number[]; finishReason: string };
  };

  it('generations that run together get the tokens each gets alone (greedy and seeded)', async () => {
    const requests = [
      { prompt: 'a', maxTokens: 30, temperature: 0 },
      { prompt: 'the quick brown fox', maxTokens: 40, temperature: 0 },
      { prompt: 'xyz', maxTokens: 35, temperature: 1, seed: 7 },
      { prompt: 'hello there, general', maxTokens: 25, temperature: 0.8, topK: 10, seed: 2 },
    ];
    const alone = [];
    for (const q of requests) alone.push((await generate(q)).tokens);
    expect(Math.max(...sizes)).toBe(1);

    // a long generation holds the batch open while the others join it and finish
    let holderId = '';
    let release = false;
    const mark = sizes.length;
    const holder = readSse(
      `${base}/v1/models/${modelId}/generate`,
      {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: 'hold', maxTokens: 4000, stream: true }),
      },
      (ev) => {
        if (ev.event === 'start') holderId = ev.data.jobId as string;
        return release && ev.event === 'token';
      },
    );
    await waitFor(async () => sizes.length > mark && holderId, 30_000, 'the long generation running');
    const results = await Promise.all(requests.map((q) => generate(q)));
    release = true;
    expect(results.map((r) => r.tokens)).toEqual(alone);
    expect(Math.max(...sizes)).toBeGreaterThanOrEqual(2);
    await holder;
    await waitFor(
      async () =>
        (await env.app.inject({ method: 'GET', url: `/v1/jobs/${holderId}` })).json().state === 'cancelled',
      30_000,
      'holder cancelled by its disconnect',
    );
    // the decode loop ends with its last generation
    await waitFor(async () => env.workers!.ctx.batchers.size === 0, 30_000, 'batcher dropped');
  });

  it("streams written two steps at a time carry every token once, in order, and each stream's end", async () => {
    const stream = (prompt: string, maxTokens: number) =>
      readSse(
        `${base}/v1/models/${modelId}/generate`,
        {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ prompt, maxTokens, temperature: 0, stream: true }),
        },
        () => false,
      );
    // three together, of different lengths: each ends while the others still run
    const runs = await Promise.all([stream('one', 17), stream('two two', 30), stream('three', 9)]);
    for (const [i, events] of runs.entries()) {
      const tokens = events.filter((e) => e.event === 'token');
      const done = events.find((e) => e.event === 'done');
      expect(done, `stream ${i}`).toBeDefined();
      expect(tokens.map((e) => e.data.index)).toEqual([...Array(tokens.length).keys()]);
      expect(tokens.map((e) => e.data.tokenId)).toEqual((done!.data as { tokens: number[] }).tokens);
      expect(tokens.map((e) => e.data.text).join('')).toBe((done!.data as { text: string }).text);
    }
    expect(runs.map((r) => r.filter((e) => e.event === 'token').length)).toEqual([17, 30, 9]);
  });

  it('generations are taken from the queue by one worker per 8 places of the batch, side by side', async () => {
    expect([1, 8, 9, 24, 32].map(generateTakers)).toEqual([1, 1, 2, 3, 4]);
    // as Redis sees them: the connections that wait for generation jobs
    expect(await env.app.svc.generateQueue.getWorkersCount()).toBe(3);
  });

  it('a generation of a loaded model whose cancel came before a worker took it sends no token', async () => {
    const { registry, generateQueue } = env.app.svc;
    // the model is loaded in the worker (the generations above): the job starts on it at once, its
    // tokens held back until its checks answer
    expect(env.workers!.ctx.cache.versions(modelId)).toHaveLength(1);
    const jobId = randomUUID();
    await registry.createJob({ id: jobId, type: 'generate', modelId });
    await registry.requestCancel(jobId);
    await generateQueue.add('generate', {
      jobId,
      modelId,
      tokenizer: 'byte',
      promptTokens: [1, 2, 3],
      maxTokens: 50,
      temperature: 0,
    });
    await waitFor(async () => (await registry.getJob(jobId))?.state === 'cancelled', 30_000, 'cancelled');
    expect((await registry.readEvents(jobId, '0')).map((e) => [e.event, e.data])).toEqual([
      ['cancelled', { tokens: 0 }],
    ]);
    // and the next generation runs as usual
    expect((await generate({ prompt: 'a', maxTokens: 5, temperature: 0 })).tokens).toHaveLength(5);
  });

  it('a generation of a loaded model deleted since fails without a token and leaves no decoding behind', async () => {
    const { registry, generateQueue } = env.app.svc;
    const created = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'doomed', config: tinyDecoder() },
    });
    const doomed = created.json().id as string;
    const warm = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${doomed}/generate`,
      payload: { prompt: 'a', maxTokens: 3, temperature: 0 },
    });
    expect(warm.statusCode).toBe(200);
    expect(env.workers!.ctx.cache.versions(doomed)).toHaveLength(1);
    expect((await env.app.inject({ method: 'DELETE', url: `/v1/models/${doomed}` })).statusCode).toBe(204);
    const jobId = randomUUID();
    await registry.createJob({ id: jobId, type: 'generate', modelId: doomed });
    await generateQueue.add('generate', {
      jobId,
      modelId: doomed,
      tokenizer: 'byte',
      promptTokens: [1, 2, 3],
      maxTokens: 50,
      temperature: 0,
    });
    await waitFor(async () => (await registry.getJob(jobId))?.state === 'failed', 30_000, 'failed');
    const events = await registry.readEvents(jobId, '0');
    expect(events.map((e) => e.event)).toEqual(['failed']);
    expect(String(events[0]!.data.error)).toContain('no longer exists');
    // its batch let it go: no decode loop is left running for it
    await waitFor(async () => env.workers!.ctx.batchers.size === 0, 30_000, 'batcher dropped');
  });

  it('a model the batched path cannot decode is served one request at a time', async () => {
    const r = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'resattn', config: tinyDecoder({ attnLayers: { residualAttn: true } }) },
    });
    const id = r.json().id;
    const before = sizes.length;
    const out = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${id}/generate`,
      payload: { prompt: 'abc', maxTokens: 12, temperature: 0 },
    });
    expect(out.statusCode).toBe(200);
    expect(out.json().tokens).toHaveLength(12);
    expect(sizes.length).toBe(before);
  });
});
