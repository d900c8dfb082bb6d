import { randomUUID } from 'node:crypto';
import Fastify from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SseWriter } from '../../routes/sse.js';
import { makeEnv, parseSse, type TestEnv } from './helpers.js';

describe('job lifecycle: a job ends once', () => {
  let env: TestEnv;
  beforeAll(async () => {
    env = await makeEnv();
  });
  afterAll(async () => env?.close());

  it('endJob writes the final state and its end event once; later ends change nothing', async () => {
    const { registry } = env.app.svc;
    const g1 = randomUUID();
    const t1 = randomUUID();
    await registry.createJob({ id: g1, type: 'generate', modelId: 'm' });
    expect(await registry.endJob(g1, 'generate', { state: 'completed', result: { tokens: [1] } })).toBe(true);
    expect(await registry.endJob(g1, 'generate', { state: 'cancelled', data: { tokens: 0 } })).toBe(false);
    expect(await registry.endJob(g1, 'generate', { state: 'failed', error: 'late' })).toBe(false);
    const job = await registry.getJob(g1);
    expect(job).toMatchObject({ state: 'completed', result: { tokens: [1] } });
    expect((await registry.readEvents(g1, '0')).map((e) => [e.event, e.data])).toEqual([
      ['done', { tokens: [1] }],
    ]);

    await registry.createJob({ id: t1, type: 'train', modelId: 'm' });
    expect(await registry.endJob(t1, 'train', { state: 'failed', error: 'boom' })).toBe(true);
    expect(await registry.endJob(t1, 'train', { state: 'completed', result: {} })).toBe(false);
    expect((await registry.getJob(t1))!.error).toBe('boom');
    expect((await registry.readEvents(t1, '0')).map((e) => e.event)).toEqual(['failed']);
  });
});

describe('SseWriter', () => {
  it('sends heartbeats while open, events with and without ids, and ends once', async () => {
    const app = Fastify();
    app.get('/s', async (_req, reply) => {
      const sse = new SseWriter(reply, 20);
      sse.event({ id: '1-0', event: 'token', data: { a: 1 } });
      await new Promise((r) => setTimeout(r, 90));
      sse.data({ b: 2 });
      sse.error('stop');
      sse.end();
      sse.end();
      sse.data('after the end');
    });
    const body = (await app.inject({ method: 'GET', url: '/s' })).body;
    await app.close();
    expect(body.startsWith(': stream open\n\n')).toBe(true);
    expect(body.match(/: ping\n\n/g)!.length).toBeGreaterThanOrEqual(2);
    expect(parseSse(body)).toEqual([
      { id: '1-0', event: 'token', data: { a: 1 } },
      { event: 'message', data: { b: 2 } },
      { event: 'error', data: { message: 'stop' } },
    ]);
    expect(body).not.toContain('after the end');
  });
});
