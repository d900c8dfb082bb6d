import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GenerationPriority } from '../../workers/priority.js';
import { makeEnv, tinyDecoder, waitFor, type TestEnv } from './helpers.js';

describe('generation before training in one worker', () => {
  it('a training step waits while a generation runs, and goes on when it ends', async () => {
    const p = new GenerationPriority(60_000, 0);
    expect(await p.beforeTrainStep()).toBeLessThan(50); // nothing runs: no wait
    const end = p.begin();
    let stepped = false;
    const waiting = p.beforeTrainStep().then(() => (stepped = true));
    await new Promise((r) => setImmediate(r));
    await new Promise((r) => setTimeout(r, 20));
    expect(stepped).toBe(false);
    end();
    await waiting;
    expect(stepped).toBe(true);
    expect(p.running).toBe(0);
  });

  it('a step waits at most maxPauseMs, and no longer than its signal', async () => {
    const p = new GenerationPriority(100, 0);
    const end = p.begin();
    const waited = await p.beforeTrainStep();
    expect(waited).toBeGreaterThanOrEqual(95);
    const q = new GenerationPriority(60_000, 0);
    q.begin();
    const ac = new AbortController();
    const w = q.beforeTrainStep(ac.signal);
    ac.abort();
    expect(await w).toBeLessThan(1000);
    end();
    expect(() => new GenerationPriority(-1)).toThrow('maxPauseMs: expected a number >= 0, got -1');
  });

  describe('in the service', () => {
    let env: TestEnv;
    beforeAll(async () => {
      env = await makeEnv({ workers: true });
    });
    afterAll(async () => env?.close());

    it('a generation completes while a long training job runs in the same worker', async () => {
      const create = async (name: string, dim: number) => {
        const r = await env.app.inject({
          method: 'POST',
          url: '/v1/models',
          payload: { name, config: tinyDecoder({ attnLayers: { dim, depth: 2 } }) },
        });
        expect(r.statusCode).toBe(201);
        return r.json().id as string;
      };
      const trained = await create('trained', 64);
      const sampled = await create('sampled', 32);
      const d = await env.app.inject({
        method: 'POST',
        url: '/v1/datasets?name=p',
        headers: { 'content-type': 'text/plain' },
        payload: 'a long training text. '.repeat(200),
      });
      const t = await env.app.inject({
        method: 'POST',
        url: `/v1/models/${trained}/train`,
        payload: {
          datasetId: d.json().id,
          steps: 100_000,
          batchSize: 4,
          seqLen: 32,
          checkpointEvery: 100_000,
        },
      });
      expect(t.statusCode).toBe(202);
      const trainId = t.json().jobId as string;
      const registry = env.app.svc.registry;
      await waitFor(
        async () => Number((await registry.getJob(trainId))?.progress.step ?? 0) >= 1,
        60_000,
        'the first training step',
      );

      const g = await env.app.inject({
        method: 'POST',
        url: `/v1/models/${sampled}/generate`,
        payload: { prompt: 'a ', maxTokens: 40, seed: 1 },
      });
      expect(g.statusCode).toBe(200);
      expect(g.json().tokens).toHaveLength(40);
      const during = await registry.getJob(trainId);
      expect(during?.state).toBe('active');
      expect(Number(during?.progress.step)).toBeLessThan(100_000);

      const c = await env.app.inject({ method: 'DELETE', url: `/v1/jobs/${trainId}` });
      expect(c.statusCode).toBe(202);
      await waitFor(async () => (await registry.getJob(trainId))?.state === 'cancelled', 60_000, 'cancelled');
    });
  });
});
