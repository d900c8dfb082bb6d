import { randomUUID } from 'node:crypto';
import Fastify from 'fastify';
import type { FastifyReply } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { followEvents, SseWriter } from '../../routes/sse.js';
import { EventHub } from '../../models/event-hub.js';
import { EventWriter } from '../../workers/event-writer.js';
import { captureScripts, makeEnv, parseSse, type TestEnv } from './helpers.js';

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

  it("an end leaves the model's job set, starts the record's TTL, and does nothing to an unknown job", async () => {
    const { registry } = env.app.svc;
    const model = randomUUID();
    const [a, b] = [randomUUID(), randomUUID()];
    for (const id of [a, b]) await registry.createJob({ id, type: 'generate', modelId: model });
    expect((await registry.redis.smembers(registry.key('model', model, 'jobs'))).sort()).toEqual(
      [a, b].sort(),
    );
    expect(await registry.redis.ttl(registry.key('job', a))).toBe(-1);
    expect(await registry.endJob(a, 'generate', { state: 'cancelled', data: { tokens: 0 } })).toBe(true);
    expect(await registry.redis.smembers(registry.key('model', model, 'jobs'))).toEqual([b]);
    expect(await registry.redis.ttl(registry.key('job', a))).toBeGreaterThan(0);
    expect(await registry.redis.ttl(registry.eventsKey(a))).toBeGreaterThan(0);
    // scripts run by digest; a Redis that lost them (restarted) is sent their text again
    await registry.redis.script('FLUSH');
    expect(await registry.endJob(b, 'generate', { state: 'completed', result: {} })).toBe(true);
    expect(await registry.redis.smembers(registry.key('model', model, 'jobs'))).toEqual([]);
    const unknown = randomUUID();
    expect(await registry.endJob(unknown, 'generate', { state: 'completed', result: {} })).toBe(false);
    expect(await registry.redis.exists(registry.eventsKey(unknown), registry.key('job', unknown))).toBe(0);
  });

  it("a generation's end goes out in the same write as its last tokens, cancelled when a cancel was requested", async () => {
    const { registry } = env.app.svc;
    const [done, stopped] = [randomUUID(), randomUUID()];
    for (const id of [done, stopped])
      await registry.createJob({ id, type: 'generate', modelId: randomUUID() });
    await registry.requestCancel(stopped);
    const writer = new EventWriter(registry);
    const calls: string[][] = [];
    const writeEvents = registry.writeEvents.bind(registry);
    registry.writeEvents = (events) => {
      calls.push(events.map((e) => e.event));
      return writeEvents(events);
    };
    try {
      // one turn: each job's last token, then both ends
      writer.append(done, 'token', { index: 0, tokenId: 7 });
      writer.append(stopped, 'token', { index: 0, tokenId: 8 });
      const ends = await Promise.all([
        writer.end(
          done,
          'generate',
          { state: 'completed', result: { text: 'x' }, progress: { tokens: 1 } },
          { tokens: 1 },
        ),
        writer.end(
          stopped,
          'generate',
          { state: 'completed', result: { text: 'y' }, progress: { tokens: 1 } },
          { tokens: 1 },
        ),
      ]);
      expect(calls).toEqual([['token', 'token', 'done', 'done']]);
      expect(ends).toEqual([
        { applied: true, state: 'completed' },
        { applied: true, state: 'cancelled' },
      ]);
      // ending again changes nothing
      expect(await writer.end(done, 'generate', { state: 'failed', error: 'late' })).toEqual({
        applied: false,
        state: 'completed',
      });
    } finally {
      registry.writeEvents = writeEvents;
    }
    expect((await registry.readEvents(done, '0')).map((e) => [e.event, e.data])).toEqual([
      ['token', { index: 0, tokenId: 7 }],
      ['done', { text: 'x' }],
    ]);
    expect((await registry.readEvents(stopped, '0')).map((e) => [e.event, e.data])).toEqual([
      ['token', { index: 0, tokenId: 8 }],
      ['cancelled', { tokens: 1 }],
    ]);
    expect(await registry.getJob(done)).toMatchObject({
      state: 'completed',
      result: { text: 'x' },
      progress: { tokens: 1 },
    });
    const job = await registry.getJob(stopped);
    expect(job).toMatchObject({ state: 'cancelled', progress: { tokens: 1 } });
    expect(job!.result).toBeUndefined();
  });

  it("a write's events keep their data exactly, whatever characters and numbers it holds", async () => {
    const { registry } = env.app.svc;
    const jobs = [randomUUID(), randomUUID()];
    for (const j of jobs) await registry.createJob({ id: j, type: 'generate', modelId: randomUUID() });
    const data = [
      { index: 0, text: 'quote " backslash \\ newline \n tab \t' },
      { index: 1, text: 'héllo 世界 🙂', tokenId: 2 ** 40 + 1 },
      { index: 2, text: '\ud800 alone', x: 1e-7, y: -0.1, z: [1, { a: null }] },
      { index: 3, text: '' },
    ];
    await registry.writeEvents(data.map((d, i) => ({ jobId: jobs[i % 2]!, event: 'token', data: d })));
    expect((await registry.readEvents(jobs[0]!, '0')).map((e) => e.data)).toEqual([data[0], data[2]]);
    expect((await registry.readEvents(jobs[1]!, '0')).map((e) => e.data)).toEqual([data[1], data[3]]);
  });

  it('an end sent again (its reply lost when Redis restarted) is applied and appended once', async () => {
    const { registry } = env.app.svc;
    const job = randomUUID();
    await registry.createJob({ id: job, type: 'generate', modelId: randomUUID() });
    const scripts = captureScripts(registry);
    try {
      expect(await registry.endJob(job, 'generate', { state: 'completed', result: { tokens: [1] } })).toBe(
        true,
      );
    } finally {
      scripts.restore();
    }
    const first = await registry.readEvents(job, '0');
    // the same command again: answered as applied, with the entry already there
    expect(await scripts.again(0)).toEqual([first[0]!.id, 'completed']);
    expect((await registry.readEvents(job, '0')).map((e) => e.event)).toEqual(['done']);
  });

  it('tokens sent again (the reply lost) are not appended twice; later ones are', async () => {
    const { registry } = env.app.svc;
    const jobs = [randomUUID(), randomUUID()];
    for (const j of jobs) await registry.createJob({ id: j, type: 'generate', modelId: randomUUID() });
    const step = (i: number) => jobs.map((j) => ({ jobId: j, event: 'token', data: { index: i } }));
    const scripts = captureScripts(registry);
    let ids: string[];
    try {
      ids = await registry.appendEvents(step(0));
    } finally {
      scripts.restore();
    }
    await registry.appendEvents(step(1));
    // the first write again, after the second: each answered with its stream's last entry, nothing added
    const again = (await scripts.again(0)) as string[];
    expect(again.filter((_, i) => i % 2 === 0)).toHaveLength(2);
    await registry.appendEvents(step(2));
    for (const [k, j] of jobs.entries()) {
      const events = await registry.readEvents(j, '0');
      expect(events.map((e) => e.data.index)).toEqual([0, 1, 2]);
      expect(events[0]!.id).toBe(ids[k]);
    }
  });
});

describe('event followers', () => {
  let env: TestEnv;
  beforeAll(async () => {
    env = await makeEnv();
  });
  afterAll(async () => env?.close());

  /** connections Redis has accepted so far */
  const connections = async () => {
    const info = await env.app.svc.redis.info('stats');
    return Number(/total_connections_received:(\d+)/.exec(info)![1]);
  };

  const follow = async (jobId: string, signal = new AbortController().signal) => {
    const seen: string[] = [];
    for await (const ev of followEvents(env.app.svc.registry, jobId, '0', signal))
      seen.push(`${ev.event}${ev.data.index ?? ''}`);
    return seen;
  };

  it('followers of many jobs at once read on one connection, each its own events in order', async () => {
    const { registry } = env.app.svc;
    const jobs = Array.from({ length: 6 }, () => randomUUID());
    for (const j of jobs) await registry.createJob({ id: j, type: 'generate', modelId: randomUUID() });
    // the hub's connection, made by a first follower
    await registry.appendEvent(jobs[0]!, 'token', { index: 0 });
    await registry.endJob(jobs[0]!, 'generate', { state: 'completed', result: {} });
    expect(await follow(jobs[0]!)).toEqual(['token0', 'done']);
    const before = await connections();
    const rest = jobs.slice(1);
    const following = rest.map((j) => follow(j));
    // tokens of every job in turn, as a batched decoding step writes them
    for (let i = 0; i < 5; i++)
      await registry.writeEvents(rest.map((j) => ({ jobId: j, event: 'token', data: { index: i } })));
    for (const j of rest) await registry.endJob(j, 'generate', { state: 'completed', result: {} });
    const seen = await Promise.all(following);
    for (const s of seen) expect(s).toEqual(['token0', 'token1', 'token2', 'token3', 'token4', 'done']);
    expect(await connections()).toBe(before);
    expect(registry.events.size).toEqual({ followers: 0, streams: 0 });
  });

  it("a follower that joins while the hub's read waits gets its events without waiting for it", async () => {
    const { redis, registry } = env.app.svc;
    // a read that would wait a minute: the follower joining after it must cut it short
    const name = `hub-${randomUUID().slice(0, 8)}`;
    const hub = new EventHub(redis, { blockMs: 60_000, connectionName: name });
    try {
      const idle = hub.subscribe(registry.eventsKey(randomUUID()), '0');
      // until its read blocks at Redis
      const blocked = async () =>
        (await redis.client('LIST'))
          .toString()
          .split('\n')
          .some((c) => c.includes(` name=${name} `) && / flags=\w*b/.test(c));
      while (!(await blocked())) await new Promise((r) => setTimeout(r, 5));
      const job = randomUUID();
      const sub = hub.subscribe(registry.eventsKey(job), '0');
      await registry.appendEvent(job, 'token', { index: 7 });
      const never = new AbortController().signal;
      while (!sub.pending) await sub.wait(60_000, never);
      expect(sub.take().map((e) => e.data)).toEqual([{ index: 7 }]);
      idle.close();
      sub.close();
      expect(hub.size).toEqual({ followers: 0, streams: 0 });
    } finally {
      hub.close();
    }
  }, 20_000);

  it('an aborted follower leaves the hub; the next one on its job reads from the start', async () => {
    const { registry } = env.app.svc;
    const waiting = randomUUID();
    await registry.createJob({ id: waiting, type: 'generate', modelId: randomUUID() });
    const ac = new AbortController();
    const aborted = follow(waiting, ac.signal);
    while (registry.events.size.followers === 0) await new Promise((r) => setTimeout(r, 5));
    ac.abort();
    expect(await aborted).toEqual([]);
    expect(registry.events.size).toEqual({ followers: 0, streams: 0 });
    const next = follow(waiting);
    await registry.appendEvent(waiting, 'token', { index: 0 });
    await registry.endJob(waiting, 'generate', { state: 'completed', result: {} });
    expect(await next).toEqual(['token0', 'done']);
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

  it("sends what is written in one turn in one socket write, and each later turn's in its own", async () => {
    const calls: string[] = [];
    const raw = {
      writableEnded: false,
      writeHead: () => undefined,
      cork: () => calls.push('cork'),
      uncork: () => calls.push('uncork'),
      write: (chunk: string) => calls.push(chunk.includes('event: ') ? chunk.split('\n')[1]! : chunk.trim()),
      end: () => calls.push('end'),
    };
    const reply = { hijack: () => undefined, raw } as unknown as FastifyReply;
    const sse = new SseWriter(reply, 60_000);
    sse.event({ id: '1-0', event: 'token', data: { index: 0 } });
    sse.event({ id: '1-1', event: 'token', data: { index: 1 } });
    await new Promise((r) => setImmediate(r));
    sse.event({ id: '2-0', event: 'done', data: {} });
    await new Promise((r) => setImmediate(r));
    sse.end();
    expect(calls).toEqual([
      'cork',
      ': stream open',
      'event: token',
      'event: token',
      'uncork',
      'cork',
      'event: done',
      'uncork',
      'end',
    ]);
  });
});
