import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { makeEnv, queuesIdle, tinyDecoder, waitFor, type TestEnv } from './helpers.js';

describe('worker model cache (bounded LRU)', () => {
  let env: TestEnv;
  beforeAll(async () => {
    env = await makeEnv({ workers: { modelCacheSize: 2 } });
  });
  afterAll(async () => env?.close());

  it('keeps at most modelCacheSize models loaded, reloading new weights under a new key', async () => {
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      const r = await env.app.inject({
        method: 'POST',
        url: '/v1/models',
        payload: { name: `m${i}`, config: tinyDecoder({ attnLayers: { dim: 16 } }) },
      });
      expect(r.statusCode).toBe(201);
      ids.push(r.json().id);
    }
    const cache = env.workers!.ctx.cache;
    const gen = async (id: string) => {
      const r = await env.app.inject({
        method: 'POST',
        url: `/v1/models/${id}/generate`,
        payload: { promptTokens: [1, 2], maxTokens: 2, temperature: 0 },
      });
      expect(r.statusCode).toBe(200);
      return r.json().tokens as number[];
    };
    const first = await gen(ids[0]!);
    expect(cache.size).toBe(1);
    await gen(ids[1]!);
    expect(cache.size).toBe(2);
    await gen(ids[2]!);
    expect(cache.size).toBe(2);
    // the evicted model reloads from its weights file and samples the same tokens
    expect(await gen(ids[0]!)).toEqual(first);
    expect(cache.size).toBe(2);

    // nothing leaks: a cached generation, a model creation and a whole training job free their tensors.
    // Each count is taken once the in-process worker has no job left (its processors have returned)
    // and no HTTP request is in flight: nothing else in this process allocates then.
    await queuesIdle(env.app);
    const before = tf.memory().numTensors;
    await gen(ids[0]!);
    await queuesIdle(env.app);
    expect(tf.memory().numTensors).toBe(before);
    const d = await env.app.inject({
      method: 'POST',
      url: '/v1/datasets',
      headers: { 'content-type': 'text/plain' },
      payload: 'abab'.repeat(100),
    });
    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${ids[1]}/train`,
      payload: {
        datasetId: d.json().id,
        steps: 3,
        batchSize: 2,
        seqLen: 8,
        learningRate: 0.01,
        evalEvery: 2,
      },
    });
    const jobId = t.json().jobId as string;
    await waitFor(
      async () =>
        (await env.app.inject({ method: 'GET', url: `/v1/jobs/${jobId}` })).json().state === 'completed',
      60_000,
      'training',
    );
    await queuesIdle(env.app);
    expect(tf.memory().numTensors).toBe(before);

    // a cached model trained again: its next generation loads the new weights and disposes the old
    // copy at once, instead of keeping it until it ages out (the other cached model stays)
    const cachedBefore = cache.versions(ids[0]!);
    expect(cachedBefore).toHaveLength(1);
    const t2 = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${ids[0]}/train`,
      payload: { datasetId: d.json().id, steps: 2, batchSize: 2, seqLen: 8, learningRate: 0.01 },
    });
    const job2 = t2.json().jobId as string;
    await waitFor(
      async () =>
        (await env.app.inject({ method: 'GET', url: `/v1/jobs/${job2}` })).json().state === 'completed',
      60_000,
      'training',
    );
    await gen(ids[0]!);
    await queuesIdle(env.app);
    const after = cache.versions(ids[0]!);
    expect(after).toHaveLength(1);
    expect(after[0]).toBeGreaterThan(cachedBefore[0]!);
    expect(cache.size).toBe(2);
    expect(tf.memory().numTensors).toBe(before);
  });
});
