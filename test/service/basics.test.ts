import { randomUUID } from 'node:crypto';
import * as tf from '@tensorflow/tfjs-core';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../../routes/app.js';
import { generateOpenApi } from '../../service/openapi-doc.js';
import { ConfigError, loadConfig } from '../../service/config.js';
import { startRedisChild, type RedisChild } from '../../service/redis-server.js';
import { createRedis } from '../../workers/queues.js';
import { captureScripts, makeEnv, parseSse, type TestEnv } from './helpers.js';
import { EventWriter } from '../../workers/event-writer.js';

describe('service basics (real Redis)', () => {
  let env: TestEnv;
  beforeAll(async () => {
    env = await makeEnv({ app: { limits: { maxBodyBytes: 2048, maxUploadBytes: 4096 } } });
  });
  afterAll(async () => env?.close());

  it('GET /healthz answers ok', async () => {
    const r = await env.app.inject({ method: 'GET', url: '/healthz' });
    expect(r.statusCode).toBe(200);
    expect(r.json()).toEqual({ status: 'ok' });
  });

  it('GET /readyz reports backend, device and Redis; 200 once the backend is initialised', async () => {
    // test/setup.ts initialised the backend (XT_BACKEND, else the first that loads): the tensor engine's
    // own record of its active backend is the expected value
    const r = await env.app.inject({ method: 'GET', url: '/readyz' });
    expect(r.statusCode).toBe(200);
    const body = r.json();
    expect(body).toMatchObject({ status: 'ok', redis: 'ok', backend: tf.getBackend() });
    if (process.env.XT_BACKEND) expect(body.backend).toBe(process.env.XT_BACKEND);
    const devices: Record<string, string[]> = {
      torch: [process.env.XT_DEVICE ?? 'cpu'],
      tensorflow: ['cpu', 'gpu'],
      wasm: ['cpu'],
      cpu: ['cpu'],
    };
    expect(devices[body.backend as string]).toContain(body.device);
  });

  it('GET /readyz and /metrics list the live workers with their backend and device; a stopped one leaves', async () => {
    const listed = async (): Promise<Record<string, unknown>[]> =>
      ((await env.app.inject({ method: 'GET', url: '/readyz' })).json().workers ?? []) as Record<
        string,
        unknown
      >[];
    expect(await listed()).toEqual([]);
    const w = await env.startWorkers({ queues: ['generate'] });
    const [seen] = await listed();
    expect(seen).toMatchObject({
      pid: process.pid,
      backend: tf.getBackend(),
      device: process.env.XT_DEVICE ?? 'cpu',
      queues: ['generate'],
    });
    // a CPU engine reports no CUDA device
    expect(seen!.cuda).toBeUndefined();
    const metrics = (await env.app.inject({ method: 'GET', url: '/metrics' })).body;
    expect(metrics).toContain(`xt_workers{backend="${tf.getBackend()}",device="${seen!.device}"} 1`);
    await w.close();
    expect(await listed()).toEqual([]);
    const after = (await env.app.inject({ method: 'GET', url: '/metrics' })).body;
    expect(after).not.toMatch(/^xt_workers\{/m);
  });

  it('GET /readyz is 503 with redis "down" when Redis is unreachable', async () => {
    const app = await buildApp({ redisUrl: 'redis://127.0.0.1:1', dataDir: env.dataDir });
    try {
      const r = await app.inject({ method: 'GET', url: '/readyz' });
      expect(r.statusCode).toBe(503);
      expect(r.json()).toMatchObject({ status: 'unavailable', redis: 'down' });
    } finally {
      await app.close();
    }
  });

  it('unknown routes answer the JSON error shape', async () => {
    const r = await env.app.inject({ method: 'GET', url: '/v1/nope' });
    expect(r.statusCode).toBe(404);
    expect(r.json()).toEqual({
      statusCode: 404,
      error: 'Not Found',
      message: expect.stringContaining('/v1/nope'),
    });
  });

  it('datasets: text/plain upload, multipart upload, list, delete', async () => {
    const a = await env.app.inject({
      method: 'POST',
      url: '/v1/datasets?name=abc',
      headers: { 'content-type': 'text/plain' },
      payload: 'hello hello hello',
    });
    expect(a.statusCode).toBe(201);
    expect(a.json()).toMatchObject({ name: 'abc', bytes: 17 });
    const boundary = '----xtboundary';
    const payload =
      `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="corpus.txt"\r\n` +
      `Content-Type: text/plain\r\n\r\nabcabcabc\r\n--${boundary}--\r\n`;
    const b = await env.app.inject({
      method: 'POST',
      url: '/v1/datasets',
      headers: { 'content-type': `multipart/form-data; boundary=${boundary}` },
      payload,
    });
    expect(b.statusCode).toBe(201);
    expect(b.json()).toMatchObject({ name: 'corpus.txt', bytes: 9 });
    const list = (await env.app.inject({ method: 'GET', url: '/v1/datasets' })).json();
    expect(list.datasets.map((d: { id: string }) => d.id)).toEqual([a.json().id, b.json().id]);
    const del = await env.app.inject({ method: 'DELETE', url: `/v1/datasets/${a.json().id}` });
    expect(del.statusCode).toBe(204);
    const again = await env.app.inject({ method: 'DELETE', url: `/v1/datasets/${a.json().id}` });
    expect(again.statusCode).toBe(404);
    expect(again.json().message).toContain(a.json().id);
  });

  it('datasets: empty, wrong type and too-large uploads are refused naming the problem', async () => {
    const empty = await env.app.inject({
      method: 'POST',
      url: '/v1/datasets',
      headers: { 'content-type': 'text/plain' },
      payload: '',
    });
    expect(empty.statusCode).toBe(400);
    const json = await env.app.inject({ method: 'POST', url: '/v1/datasets', payload: { text: 'x' } });
    expect(json.statusCode).toBe(400);
    expect(json.json().message).toContain('text/plain');
    const big = await env.app.inject({
      method: 'POST',
      url: '/v1/datasets',
      headers: { 'content-type': 'text/plain' },
      payload: 'x'.repeat(5000),
    });
    expect(big.statusCode).toBe(413);
    expect(big.json().message).toContain('MAX_UPLOAD_BYTES=4096');
  });

  it('JSON bodies over MAX_BODY_BYTES are 413 naming the limit', async () => {
    const r = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'x'.repeat(3000), config: {} },
    });
    expect(r.statusCode).toBe(413);
    expect(r.json()).toMatchObject({
      statusCode: 413,
      message: expect.stringContaining('MAX_BODY_BYTES=2048'),
    });
  });

  it('unknown jobs, models and datasets are 404', async () => {
    for (const [method, url] of [
      ['GET', '/v1/jobs/nope'],
      ['DELETE', '/v1/jobs/nope'],
      ['GET', '/v1/jobs/nope/events'],
      ['GET', '/v1/models/nope'],
      ['DELETE', '/v1/models/nope'],
      ['GET', '/v1/models/nope/checkpoints'],
      ['GET', '/v1/models/nope/weights'],
    ] as const) {
      const r = await env.app.inject({ method, url });
      expect(r.statusCode, `${method} ${url}`).toBe(404);
      expect(r.json().error).toBe('Not Found');
    }
    const t = await env.app.inject({
      method: 'POST',
      url: '/v1/models/nope/train',
      payload: { datasetId: 'd', steps: 1, batchSize: 1, seqLen: 4, learningRate: 0.01 },
    });
    expect(t.statusCode).toBe(404);
    const g = await env.app.inject({
      method: 'POST',
      url: '/v1/models/nope/generate',
      payload: { prompt: 'a', maxTokens: 1 },
    });
    expect(g.statusCode).toBe(404);
  });

  it('request validation errors are 400 naming the field', async () => {
    const r = await env.app.inject({
      method: 'POST',
      url: '/v1/models/x/train',
      payload: { datasetId: 'd', steps: 0, batchSize: 1, seqLen: 4, learningRate: 0.01 },
    });
    expect(r.statusCode).toBe(400);
    expect(r.json().message).toContain('steps');
  });

  it('SSE job events carry ids and resume after Last-Event-ID', async () => {
    const { registry } = env.app.svc;
    const job = randomUUID();
    await registry.createJob({ id: job, type: 'train', modelId: randomUUID() });
    const ids: string[] = [];
    for (let step = 1; step <= 3; step++) {
      ids.push(await registry.appendEvent(job, 'progress', { step, steps: 3, loss: 5 - step }));
    }
    await registry.updateJob(job, { state: 'completed', result: { steps: 3 } });
    ids.push(await registry.appendEvent(job, 'completed', { steps: 3 }));
    const full = await env.app.inject({ method: 'GET', url: `/v1/jobs/${job}/events` });
    expect(full.headers['content-type']).toContain('text/event-stream');
    const all = parseSse(full.body);
    expect(all.map((e) => e.id)).toEqual(ids);
    expect(all.map((e) => e.event)).toEqual(['progress', 'progress', 'progress', 'completed']);
    const rest = parseSse(
      (
        await env.app.inject({
          method: 'GET',
          url: `/v1/jobs/${job}/events`,
          headers: { 'last-event-id': ids[1]! },
        })
      ).body,
    );
    expect(rest.map((e) => e.id)).toEqual(ids.slice(2));
    expect(rest[0]!.data).toMatchObject({ step: 3 });
  });

  it('an EventWriter sends the events of one turn in one round trip, in order, to each job stream', async () => {
    const { registry } = env.app.svc;
    const jobs = [randomUUID(), randomUUID()];
    for (const id of jobs) await registry.createJob({ id, type: 'generate', modelId: randomUUID() });
    const writer = new EventWriter(registry);
    const calls: number[] = [];
    const writeEvents = registry.writeEvents.bind(registry);
    registry.writeEvents = (events) => {
      calls.push(events.length);
      return writeEvents(events);
    };
    try {
      // one turn: interleaved tokens of two jobs, then the second job's end
      const pending = [0, 1, 2].flatMap((index) =>
        jobs.map((id) => writer.append(id, 'token', { index, tokenId: index + 40 })),
      );
      pending.push(writer.append(jobs[1]!, 'done', { tokens: 3 }));
      expect(new Set(pending.map((p) => p.written)).size).toBe(1);
      expect(pending.map((p) => p.at)).toEqual([0, 1, 2, 3, 4, 5, 6]);
      const written = await pending[0]!.written;
      const ids = pending.map((p) => written[p.at]);
      expect(calls).toEqual([7]);
      // the next turn is a round trip of its own
      await writer.append(jobs[0]!, 'done', { tokens: 3 }).written;
      expect(calls).toEqual([7, 1]);
      for (const [j, id] of jobs.entries()) {
        const events = await registry.readEvents(id, '0');
        expect(events.map((e) => [e.event, e.data.index ?? null])).toEqual([
          ['token', 0],
          ['token', 1],
          ['token', 2],
          ['done', null],
        ]);
        // the ids each append resolved with are the entries' ids
        expect(events.slice(0, 3).map((e) => e.id)).toEqual([0, 1, 2].map((i) => ids[i * 2 + j]));
        // an ended stream expires
        expect(await registry.redis.ttl(registry.eventsKey(id))).toBeGreaterThan(0);
      }
    } finally {
      registry.writeEvents = writeEvents;
    }
  });

  it('an event sent again (its reply lost when Redis restarted) is in the stream once', async () => {
    const { registry } = env.app.svc;
    const job = randomUUID();
    await registry.createJob({ id: job, type: 'train', modelId: randomUUID() });
    // capture the commands as sent, then send them again as a client does after reconnecting
    const scripts = captureScripts(registry);
    let ids: string[];
    try {
      ids = await Promise.all([
        registry.appendEvent(job, 'progress', { step: 1 }),
        registry.appendEvent(job, 'progress', { step: 2 }),
      ]);
    } finally {
      scripts.restore();
    }
    expect(scripts.sent).toHaveLength(2);
    const again = (await Promise.all([scripts.again(0), scripts.again(1)])) as string[][];
    // both already there: nothing added, each answered with the stream's last entry
    expect(again.map((r) => r[0])).toEqual([ids[1], ids[1]]);
    const events = await registry.readEvents(job, '0');
    expect(events.map((e) => e.data.step)).toEqual([1, 2]);
    // the next event is added as usual
    await registry.appendEvent(job, 'progress', { step: 3 });
    expect((await registry.readEvents(job, '0')).map((e) => e.data.step)).toEqual([1, 2, 3]);
  });

  it('GET /metrics exposes HTTP latency and queue depth', async () => {
    await env.app.inject({ method: 'GET', url: '/healthz' });
    const r = await env.app.inject({ method: 'GET', url: '/metrics' });
    expect(r.statusCode).toBe(200);
    expect(r.body).toMatch(
      /xt_http_request_duration_seconds_count\{method="GET",route="\/healthz",status_code="200"\} [1-9]/,
    );
    expect(r.body).toMatch(/xt_queue_jobs\{queue="train",state="waiting"\} \d+/);
    expect(r.body).toContain('xt_generated_tokens_total');
    expect(r.body).toContain('xt_job_duration_seconds');
  });

  it('serves the OpenAPI document, in sync with openapi/openapi.json, and Swagger UI', async () => {
    const live = (await env.app.inject({ method: 'GET', url: '/openapi.json' })).json();
    const committed = JSON.parse(
      readFileSync(new URL('../../openapi/openapi.json', import.meta.url), 'utf8'),
    );
    expect(live).toEqual(committed);
    expect(JSON.parse(await generateOpenApi())).toEqual(committed);
    expect(Object.keys(committed.paths)).toEqual(
      expect.arrayContaining(['/v1/models', '/v1/models/{id}/generate', '/v1/jobs/{id}/events', '/readyz']),
    );
    const ui = await env.app.inject({ method: 'GET', url: '/docs/' });
    expect(ui.statusCode).toBe(200);
    expect(ui.headers['content-type']).toContain('text/html');
  });
});

describe('API keys', () => {
  let env: TestEnv;
  beforeAll(async () => {
    env = await makeEnv({ app: { apiKeys: ['k1', 'secret-2'] } });
  });
  afterAll(async () => env?.close());

  it('every /v1 route needs a valid bearer key; health routes stay open', async () => {
    expect((await env.app.inject({ method: 'GET', url: '/healthz' })).statusCode).toBe(200);
    expect([200, 503]).toContain((await env.app.inject({ method: 'GET', url: '/readyz' })).statusCode);
    const none = await env.app.inject({ method: 'GET', url: '/v1/models' });
    expect(none.statusCode).toBe(401);
    expect(none.json()).toMatchObject({ statusCode: 401, error: 'Unauthorized' });
    const wrong = await env.app.inject({
      method: 'GET',
      url: '/v1/datasets',
      headers: { authorization: 'Bearer k2' },
    });
    expect(wrong.statusCode).toBe(401);
    const post = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'a', config: {} },
    });
    expect(post.statusCode).toBe(401);
    for (const key of ['k1', 'secret-2']) {
      const ok = await env.app.inject({
        method: 'GET',
        url: '/v1/datasets',
        headers: { authorization: `Bearer ${key}` },
      });
      expect(ok.statusCode).toBe(200);
    }
  });

  it('without keys configured /v1 is open', async () => {
    const open = await makeEnv();
    try {
      expect((await open.app.inject({ method: 'GET', url: '/v1/models' })).statusCode).toBe(200);
    } finally {
      await open.close();
    }
  });
});

describe('configuration from the environment', () => {
  it('reads defaults and values', () => {
    const c = loadConfig({ PORT: '8080', API_KEYS: 'a, b', WORKER_CONCURRENCY: '3', MAX_TOKENS: '64' });
    expect(c.port).toBe(8080);
    expect(c.apiKeys).toEqual(['a', 'b']);
    expect(c.workerConcurrency).toBe(3);
    expect(c.limits.maxTokens).toBe(64);
    expect(c.redisUrl).toBeUndefined();
    expect(c.maxBatch).toBe(32);
    expect(loadConfig({ MAX_BATCH: '8' }).maxBatch).toBe(8);
    expect(() => loadConfig({ MAX_BATCH: '0' })).toThrow(
      /MAX_BATCH: expected an integer in \[1, 1024\], got "0"/,
    );
    expect(c.tokenWriteSteps).toBe(2);
    expect(loadConfig({ TOKEN_WRITE_STEPS: '1' }).tokenWriteSteps).toBe(1);
    expect(() => loadConfig({ TOKEN_WRITE_STEPS: '0' })).toThrow(
      /TOKEN_WRITE_STEPS: expected an integer in \[1, 16\], got "0"/,
    );
  });

  it('lists every invalid variable with what was expected', () => {
    let err: Error | null = null;
    try {
      loadConfig({ PORT: 'abc', XT_BACKEND: 'gpu', REDIS_URL: 'localhost:6379', WORKER_CONCURRENCY: '0' });
    } catch (e) {
      err = e as Error;
    }
    expect(err).toBeInstanceOf(ConfigError);
    expect(err!.message).toContain('PORT: expected an integer');
    expect(err!.message).toContain('XT_BACKEND: expected one of torch, tensorflow, wasm, cpu, got "gpu"');
    expect(err!.message).toContain(
      'REDIS_URL: expected redis://host:port, rediss://… or unix:///path/to/redis.sock, got "localhost:6379"',
    );
    expect(err!.message).toContain('WORKER_CONCURRENCY');
  });

  it('takes a Redis on a Unix socket (an absolute path)', () => {
    expect(loadConfig({ REDIS_URL: 'unix:///run/redis/redis.sock' }).redisUrl).toBe(
      'unix:///run/redis/redis.sock',
    );
    expect(() => loadConfig({ REDIS_URL: 'unix://redis.sock' })).toThrow(
      'REDIS_URL: expected redis://host:port, rediss://… or unix:///path/to/redis.sock, got "unix://redis.sock"',
    );
  });
});

describe('a private redis-server', () => {
  it('listens on a Unix socket beside its data (or in the temporary folder; none where it cannot be made), which createRedis reaches', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'xt-redis-'));
    const deep = path.join(dir, 'x'.repeat(120));
    // a folder where the socket cannot be made (a folder has its name)
    const blocked = path.join(dir, 'blocked');
    mkdirSync(path.join(blocked, 'redis.sock'), { recursive: true });
    const children = [
      await startRedisChild({ dir }),
      await startRedisChild({ dir: deep }),
      await startRedisChild({ unixSocket: false }),
      await startRedisChild({ dir: blocked }),
    ];
    try {
      const [beside, fallback, tcp, noSocket] = children as [RedisChild, RedisChild, RedisChild, RedisChild];
      expect(beside.localUrl).toBe(`unix://${path.join(dir, 'redis.sock')}`);
      // a folder too deep for a socket's path: the temporary folder, named after the port
      expect(fallback.localUrl).toBe(`unix://${path.join(os.tmpdir(), `xt-redis-${fallback.port}.sock`)}`);
      expect(tcp.localUrl).toBe(tcp.url);
      // started again without the socket: TCP
      expect(noSocket.localUrl).toBe(noSocket.url);
      for (const c of children) {
        const conn = createRedis(c.localUrl);
        try {
          expect(await conn.ping()).toBe('PONG');
          // the socket's own connection, or TCP's
          const info = await conn.client('INFO');
          expect(String(info)).toMatch(c === tcp || c === noSocket ? /laddr=127\.0\.0\.1:/ : /laddr=\//);
        } finally {
          conn.disconnect();
        }
      }
    } finally {
      for (const c of children) await c.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
