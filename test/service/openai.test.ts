import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createMetrics } from '../../workers/metrics.js';
import { makeEnv, tinyDecoder, type TestEnv } from './helpers.js';

/** The OpenAI-compatible API, driven by the official `openai` client over real HTTP. */
describe('OpenAI-compatible API (/openai/v1) with the openai client', () => {
  let env: TestEnv;
  let client: OpenAI;
  let base: string;
  let modelId: string;
  const KEY = 'sk-test-key';
  const workerMetrics = createMetrics();

  beforeAll(async () => {
    env = await makeEnv({ app: { apiKeys: [KEY] }, workers: { metrics: workerMetrics } });
    base = await env.app.listen({ port: 0, host: '127.0.0.1' });
    client = new OpenAI({ apiKey: KEY, baseURL: `${base}/openai/v1`, maxRetries: 0 });
    const r = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      headers: { authorization: `Bearer ${KEY}` },
      payload: { name: 'oa-tiny', config: tinyDecoder({ maxSeqLen: 128 }) },
    });
    expect(r.statusCode).toBe(201);
    modelId = r.json().id;
  });
  afterAll(async () => env?.close());

  /** The service's own generation API, for the same request. */
  const nativeGenerate = async (body: Record<string, unknown>) => {
    const r = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/generate`,
      headers: { authorization: `Bearer ${KEY}` },
      payload: body,
    });
    expect(r.statusCode).toBe(200);
    return r.json() as { text: string; tokens: number[]; finishReason: string };
  };

  it('lists our models by id, with their names', async () => {
    const page = await client.models.list();
    const mine = page.data.find((m) => m.id === modelId);
    expect(mine).toMatchObject({ object: 'model', name: 'oa-tiny' });
  });

  it('completes text (by model name), as the service API does; usage counts the byte tokens', async () => {
    const prompt = 'héllo ';
    const c = await client.completions.create({ model: 'oa-tiny', prompt, max_tokens: 8, temperature: 0 });
    const ref = await nativeGenerate({ prompt, maxTokens: 8, temperature: 0 });
    expect(c.object).toBe('text_completion');
    expect(c.choices).toHaveLength(1);
    expect(c.choices[0]!.text).toBe(ref.text);
    // the byte tokenizer: one token per UTF-8 byte ('é' is two)
    expect(c.usage).toEqual({
      prompt_tokens: 7,
      completion_tokens: ref.tokens.length,
      total_tokens: 7 + ref.tokens.length,
    });
    expect(c.choices[0]!.finish_reason).toBe(ref.finishReason === 'length' ? 'length' : 'stop');
  });

  it('streams the same text as chunks ending in [DONE], with usage when asked', async () => {
    const whole = await client.completions.create({
      model: modelId,
      prompt: 'abc',
      max_tokens: 12,
      temperature: 0,
    });
    const stream = await client.completions.create({
      model: modelId,
      prompt: 'abc',
      max_tokens: 12,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined;
    let chunks = 0;
    for await (const chunk of stream) {
      chunks++;
      for (const ch of chunk.choices) {
        text += ch.text;
        if (ch.finish_reason) finish = ch.finish_reason;
      }
      if (chunk.usage) usage = chunk.usage;
    }
    expect(text).toBe(whole.choices[0]!.text);
    expect(finish).toBe(whole.choices[0]!.finish_reason);
    expect(usage).toEqual(whole.usage);
    // one chunk per piece of text at least, besides the end and usage chunks
    expect(chunks).toBeGreaterThan(2);
  });

  it("counts each generation's time to first token (API) and queue wait (worker) in /metrics", async () => {
    /** [count, sum] of a histogram in a Prometheus text page */
    const histogram = (page: string, name: string): [number, number] => {
      const read = (suffix: string) => {
        const m = page.match(new RegExp(`^${name}_${suffix} (\\S+)$`, 'm'));
        expect(m, `${name}_${suffix} in /metrics`).not.toBeNull();
        return Number(m![1]);
      };
      return [read('count'), read('sum')];
    };
    const apiPage = async () =>
      (await env.app.inject({ method: 'GET', url: '/metrics', headers: { authorization: `Bearer ${KEY}` } }))
        .body;
    const ttft = 'xt_generate_time_to_first_token_seconds';
    const wait = 'xt_generate_queue_wait_seconds';
    const [ttft0, ttftSum0] = histogram(await apiPage(), ttft);
    const [wait0, waitSum0] = histogram(await workerMetrics.registry.metrics(), wait);
    const t0 = performance.now();
    // two choices streamed over /openai/v1, and one generation of the service's own API, not streamed
    const stream = await client.completions.create({
      model: modelId,
      prompt: 'abc',
      max_tokens: 4,
      n: 2,
      temperature: 1,
      seed: 3,
      stream: true,
    });
    for await (const chunk of stream) void chunk;
    await nativeGenerate({ prompt: 'abc', maxTokens: 4, temperature: 0 });
    const elapsed = (performance.now() - t0) / 1000;
    const [ttft1, ttftSum1] = histogram(await apiPage(), ttft);
    const [wait1, waitSum1] = histogram(await workerMetrics.registry.metrics(), wait);
    expect(ttft1 - ttft0).toBe(3);
    expect(ttftSum1 - ttftSum0).toBeGreaterThan(0);
    expect(ttftSum1 - ttftSum0).toBeLessThan(3 * elapsed);
    expect(wait1 - wait0).toBe(3);
    expect(waitSum1 - waitSum0).toBeGreaterThanOrEqual(0);
    expect(waitSum1 - waitSum0).toBeLessThan(3 * elapsed);
  });

  it('stops before a stop string, with finish_reason "stop"', async () => {
    const free = await nativeGenerate({ prompt: 'xyz', maxTokens: 24, temperature: 0 });
    // a stop string from inside the free-running text: the completion must end right before it
    const at = Math.max(2, Math.floor(free.text.length / 2));
    const stop = free.text.slice(at, at + 2);
    const cut = free.text.indexOf(stop);
    const c = await client.completions.create({
      model: modelId,
      prompt: 'xyz',
      max_tokens: 24,
      temperature: 0,
      stop: [stop],
    });
    expect(c.choices[0]!.text).toBe(free.text.slice(0, cut));
    expect(c.choices[0]!.finish_reason).toBe('stop');
  });

  it('n choices sample with seed, seed + 1, ...', async () => {
    const c = await client.completions.create({
      model: modelId,
      prompt: 'q',
      max_tokens: 6,
      temperature: 1,
      seed: 40,
      n: 3,
    });
    expect(c.choices.map((x) => x.index)).toEqual([0, 1, 2]);
    for (const [i, choice] of c.choices.entries()) {
      const ref = await nativeGenerate({ prompt: 'q', maxTokens: 6, temperature: 1, seed: 40 + i });
      expect(choice.text).toBe(ref.text);
    }
  });

  it('chat completions render the plain template, streaming and not', async () => {
    const messages = [
      { role: 'system' as const, content: 'be brief' },
      { role: 'user' as const, content: 'hi' },
    ];
    const templated = 'System: be brief\nUser: hi\nAssistant:';
    const c = await client.chat.completions.create({
      model: modelId,
      messages,
      max_tokens: 10,
      temperature: 0,
    });
    const ref = await nativeGenerate({
      prompt: templated,
      maxTokens: 10,
      temperature: 0,
      stop: ['\nUser:', '\nSystem:'],
    });
    expect(c.object).toBe('chat.completion');
    expect(c.choices[0]!.message).toMatchObject({ role: 'assistant', content: ref.text });
    expect(c.usage?.prompt_tokens).toBe(Buffer.byteLength(templated));

    const stream = await client.chat.completions.create({
      model: modelId,
      messages,
      max_tokens: 10,
      temperature: 0,
      stream: true,
    });
    let content = '';
    let role: string | undefined;
    let finish: string | null = null;
    for await (const chunk of stream) {
      expect(chunk.object).toBe('chat.completion.chunk');
      const ch = chunk.choices[0];
      if (!ch) continue;
      role ??= ch.delta.role;
      content += ch.delta.content ?? '';
      if (ch.finish_reason) finish = ch.finish_reason;
    }
    expect(role).toBe('assistant');
    expect(content).toBe(ref.text);
    expect(finish).toBe(c.choices[0]!.finish_reason);
  });

  it("errors come in OpenAI's shape, naming the field", async () => {
    const bad = await client.completions.create({ model: modelId, prompt: 'a', max_tokens: 0 }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(bad).toBeInstanceOf(OpenAI.BadRequestError);
    expect((bad as OpenAI.APIError).param).toBe('max_tokens');
    expect((bad as OpenAI.APIError).message).toContain('max_tokens');

    const unknown = await client.completions
      .create({ model: 'no-such-model', prompt: 'a', max_tokens: 1 })
      .then(
        () => null,
        (e: unknown) => e,
      );
    expect(unknown).toBeInstanceOf(OpenAI.NotFoundError);
    expect((unknown as OpenAI.APIError).code).toBe('model_not_found');

    const tooMany = await client.completions
      .create({ model: modelId, prompt: 'a', max_tokens: 100_000 })
      .then(
        () => null,
        (e: unknown) => e,
      );
    expect((tooMany as OpenAI.APIError).status).toBe(400);
    expect((tooMany as OpenAI.APIError).message).toContain('MAX_TOKENS=');

    const extra = await fetch(`${base}/openai/v1/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: modelId, prompt: 'a', logit_bias: { 1: 5 } }),
    });
    expect(extra.status).toBe(400);
    expect((await extra.json()).error).toMatchObject({ param: 'logit_bias', type: 'invalid_request_error' });
  });

  it('needs the same API keys as /v1', async () => {
    const anonymous = new OpenAI({ apiKey: 'wrong', baseURL: `${base}/openai/v1`, maxRetries: 0 });
    const e = await anonymous.models.list().then(
      () => null,
      (err: unknown) => err,
    );
    expect(e).toBeInstanceOf(OpenAI.AuthenticationError);
    expect((e as OpenAI.APIError).code).toBe('invalid_api_key');
  });
});
