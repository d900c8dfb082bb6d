import type { ChildProcess } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  makeEnv,
  readSse,
  redisUrl,
  runServiceEntry,
  tinyDecoder,
  waitFor,
  type ServiceProcess,
  type SseEvent,
  type TestEnv,
} from './helpers.js';

const LOCK_MS = 2000;

/** Runs `npm run worker`'s entrypoint as a child process. */
function spawnWorker(env: TestEnv): ServiceProcess {
  return runServiceEntry('worker', {
    REDIS_URL: redisUrl(),
    REDIS_PREFIX: env.prefix,
    DATA_DIR: env.dataDir,
    LOCK_DURATION_MS: String(LOCK_MS),
    STALLED_INTERVAL_MS: '500',
    LOG_LEVEL: 'info',
  });
}

describe('worker failure and shutdown (real Redis, worker child processes)', () => {
  let env: TestEnv;
  let base: string;
  let modelId: string;
  let datasetId: string;
  const children: ChildProcess[] = [];

  beforeAll(async () => {
    env = await makeEnv();
    base = await env.app.listen({ port: 0, host: '127.0.0.1' });
    const m = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'r', config: tinyDecoder() },
    });
    modelId = m.json().id;
    const d = await env.app.inject({
      method: 'POST',
      url: '/v1/datasets',
      headers: { 'content-type': 'text/plain' },
      payload: 'the quick brown fox. '.repeat(200),
    });
    datasetId = d.json().id;
  });
  afterAll(async () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    await env?.close();
  });

  it('a worker killed mid-training leaves the job to another worker, which resumes from the last checkpoint', async () => {
    // the kill is sent at the checkpoint of step 8; the job has far more steps than the dead worker
    // can run before the signal lands, so it is always killed mid-job
    const STEPS = 200;
    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/train`,
      payload: {
        datasetId,
        steps: STEPS,
        batchSize: 4,
        seqLen: 16,
        learningRate: 0.01,
        checkpointEvery: 4,
        seed: 5,
      },
    });
    const { jobId } = t.json();
    const a = spawnWorker(env);
    children.push(a.child);
    let killed = false;
    let second: Promise<unknown> | null = null;
    void a.ended.then(() => {
      if (!killed) void env.app.inject({ method: 'DELETE', url: `/v1/jobs/${jobId}` });
    });
    const events = await readSse(`${base}/v1/jobs/${jobId}/events`, {}, (ev) => {
      if (!killed && ev.event === 'checkpoint' && (ev.data.step as number) >= 8) {
        killed = true;
        a.child.kill('SIGKILL');
        second = env.startWorkers({ lockDurationMs: LOCK_MS, stalledIntervalMs: 500 });
      }
      return false;
    });
    expect(killed, a.out()).toBe(true);
    await second;
    const exit = await a.ended;
    expect(exit.signal, a.out()).toBe('SIGKILL');

    const resumedAt = events.findIndex((e) => e.event === 'resumed');
    expect(resumedAt, JSON.stringify(events.map((e) => e.event))).toBeGreaterThan(0);
    const before = events.slice(0, resumedAt);
    const after = events.slice(resumedAt + 1);
    const lastCkpt = Math.max(
      ...before.filter((e) => e.event === 'checkpoint').map((e) => e.data.step as number),
    );
    expect(events[resumedAt]!.data.step).toBe(lastCkpt);
    const stepsAfter = after.filter((e) => e.event === 'progress').map((e) => e.data.step as number);
    expect(stepsAfter).toEqual(Array.from({ length: STEPS - lastCkpt }, (_, i) => lastCkpt + 1 + i));
    expect(events.at(-1)!.event).toBe('completed');

    // the loss curve continues: the resumed run repeats exactly the losses the dead worker had reached
    const lossAt = (list: SseEvent[], step: number) =>
      list.find((e) => e.event === 'progress' && e.data.step === step)?.data.loss as number | undefined;
    const firstLoss = lossAt(before, 1)!;
    const resumedLoss = lossAt(after, lastCkpt + 1)!;
    expect(resumedLoss).toBeLessThan(firstLoss);
    const deadLoss = lossAt(before, lastCkpt + 1);
    if (deadLoss !== undefined) expect(resumedLoss).toBeCloseTo(deadLoss, 4);

    const job = (await env.app.inject({ method: 'GET', url: `/v1/jobs/${jobId}` })).json();
    expect(job.state).toBe('completed');
    expect(job.result).toMatchObject({ steps: STEPS, resumedFromStep: lastCkpt });
  });

  it('SIGTERM drains: the worker checkpoints its current step, hands the job back and exits 0', async () => {
    // only the child below may take this job
    for (const w of env.workersStarted()) await w.close();
    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/train`,
      payload: {
        datasetId,
        steps: 5000,
        batchSize: 2,
        seqLen: 8,
        learningRate: 0.001,
        checkpointEvery: 1000,
      },
    });
    const { jobId } = t.json();
    const c = spawnWorker(env);
    children.push(c.child);
    let termAt = 0;
    const events: SseEvent[] = [];
    const reading = readSse(`${base}/v1/jobs/${jobId}/events`, {}, (ev) => {
      events.push(ev);
      if (!termAt && ev.event === 'progress' && (ev.data.step as number) >= 3) {
        termAt = ev.data.step as number;
        c.child.kill('SIGTERM');
      }
      return ev.event === 'checkpoint' && termAt > 0;
    });
    const exit = await c.ended;
    await reading;
    expect(exit.code, c.out()).toBe(0);
    const ck = events.filter((e) => e.event === 'checkpoint').at(-1)!;
    expect(ck.data.step as number).toBeGreaterThanOrEqual(termAt);
    const q = await env.app.svc.trainQueue.getJob(jobId);
    expect(await q!.getState()).toBe('waiting');
    const job = (await env.app.inject({ method: 'GET', url: `/v1/jobs/${jobId}` })).json();
    expect(job.state).toBe('waiting');
    const del = await env.app.inject({ method: 'DELETE', url: `/v1/jobs/${jobId}` });
    expect(del.statusCode).toBe(202);
    await waitFor(
      async () =>
        (await env.app.inject({ method: 'GET', url: `/v1/jobs/${jobId}` })).json().state === 'cancelled',
    );
  });
});
