import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fromConfig } from '../../src/io/config.js';
import { makeEnv, tinyDecoder, type TestEnv } from '../service/helpers.js';

// Bad input, generated: every answer is a model or an error that names what was wrong; the service
// answers 4xx (never 5xx) with a message, and stays up. Runs bounded (fixed seeds, counted runs).

const RUNS = Number(process.env.XT_FUZZ_RUNS ?? 150);

/** Values that a careless or hostile client might put anywhere (numbers kept small: no huge models). */
const junk = fc.oneof(
  fc.integer({ min: -3, max: 40 }),
  fc.double({ min: -1e3, max: 1e3 }),
  fc.constantFrom(0, -1, 0.5, NaN, Infinity, 1e308, 2 ** 53),
  fc.string({ maxLength: 8 }),
  fc.boolean(),
  fc.constant(null),
  fc.array(fc.integer({ min: -1, max: 4 }), { maxLength: 3 }),
  fc.dictionary(fc.string({ maxLength: 4 }), fc.integer({ min: -1, max: 4 }), { maxKeys: 2 }),
);

const LAYER_KEYS = [
  'type',
  'dim',
  'depth',
  'heads',
  'attnDimHead',
  'rotaryPosEmb',
  'ffMult',
  'attnKvHeads',
  'alibiPosBias',
  'attn_flash',
  'ff_glu',
  'crossAttend',
  'customLayers',
  'residualAttn',
  'shiftTokens',
];
const WRAPPER_KEYS = [
  'wrapper',
  'numTokens',
  'maxSeqLen',
  'attnLayers',
  'embDim',
  'numMemoryTokens',
  'tieEmbedding',
  'logitsDim',
  'l2normEmbed',
  'max_mem_len',
  'unknownOption',
];

/** A valid small definition with one key (of the wrapper or of its layers) set to a junk value. */
const mutatedConfig = fc
  .tuple(fc.boolean(), fc.constantFrom(...LAYER_KEYS), fc.constantFrom(...WRAPPER_KEYS), junk)
  .map(([inLayers, lk, wk, v]) => {
    const c = tinyDecoder() as Record<string, unknown> & { attnLayers: Record<string, unknown> };
    if (inLayers) c.attnLayers = { ...c.attnLayers, [lk]: v };
    else c[wk] = v;
    return { config: c, key: inLayers ? lk : wk };
  });

describe('model definitions (fromConfig), fuzzed', () => {
  it('build or throw an Error naming a key path of the definition', () => {
    fc.assert(
      fc.property(mutatedConfig, ({ config }) => {
        let model: { dispose(): void } | null = null;
        try {
          model = fromConfig(config).model as unknown as { dispose(): void };
        } catch (e) {
          expect(e).toBeInstanceOf(Error);
          expect((e as Error).message).toMatch(/^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+|\[\d+\])*: \S/);
        }
        model?.dispose();
      }),
      { numRuns: RUNS, seed: 1 },
    );
  });
});

describe('request bodies and queries, fuzzed (real Redis, no worker)', () => {
  let env: TestEnv;
  let modelId = '';
  let datasetId = '';
  beforeAll(async () => {
    env = await makeEnv();
    modelId = (
      await env.app.inject({
        method: 'POST',
        url: '/v1/models',
        payload: { name: 'f', config: tinyDecoder() },
      })
    ).json().id;
    datasetId = (
      await env.app.inject({
        method: 'POST',
        url: '/v1/datasets?name=f',
        headers: { 'content-type': 'text/plain' },
        payload: 'abc '.repeat(200),
      })
    ).json().id;
  });
  afterAll(async () => env?.close());

  const answersWell = (r: { statusCode: number; json(): { statusCode?: number; message?: unknown } }) => {
    expect(r.statusCode).toBeLessThan(500);
    if (r.statusCode >= 400) {
      const body = r.json();
      expect(body.statusCode).toBe(r.statusCode);
      expect(typeof body.message).toBe('string');
      expect((body.message as string).length).toBeGreaterThan(5);
    }
  };

  const body = (keys: string[]) => fc.dictionary(fc.constantFrom(...keys), junk, { maxKeys: keys.length });

  it('POST /v1/models', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          mutatedConfig.map(({ config }) => ({ name: 'x', config })),
          body(['name', 'config', 'tokenizer', 'seed']),
        ),
        async (payload) => {
          const r = await env.app.inject({ method: 'POST', url: '/v1/models', payload });
          answersWell(r);
          if (r.statusCode === 201)
            await env.app.inject({ method: 'DELETE', url: `/v1/models/${r.json().id}` });
        },
      ),
      { numRuns: RUNS, seed: 2 },
    );
  });

  it('POST /v1/models/:id/train', async () => {
    const keys = [
      'datasetId',
      'steps',
      'batchSize',
      'seqLen',
      'learningRate',
      'warmupSteps',
      'weightDecay',
      'gradClip',
      'gradAccumulation',
      'evalEvery',
      'checkpointEvery',
      'seed',
      'extra',
    ];
    await fc.assert(
      fc.asyncProperty(body(keys), fc.boolean(), async (payload, realDataset) => {
        if (realDataset) payload.datasetId = datasetId;
        const r = await env.app.inject({ method: 'POST', url: `/v1/models/${modelId}/train`, payload });
        answersWell(r);
        if (r.statusCode === 202)
          await env.app.inject({ method: 'DELETE', url: `/v1/jobs/${r.json().jobId}` });
      }),
      { numRuns: RUNS, seed: 3 },
    );
  });

  it('POST /v1/models/:id/generate (validation only: no worker runs)', async () => {
    const keys = [
      'prompt',
      'promptTokens',
      'maxTokens',
      'temperature',
      'topK',
      'topP',
      'minP',
      'stop',
      'seed',
      'cacheKv',
      'stream',
      'other',
    ];
    await fc.assert(
      fc.asyncProperty(body(keys), async (payload) => {
        // a valid request would wait for a worker: only invalid ones are sent
        payload.maxTokens = -1;
        const r = await env.app.inject({ method: 'POST', url: `/v1/models/${modelId}/generate`, payload });
        expect(r.statusCode).toBe(400);
        answersWell(r);
      }),
      { numRuns: RUNS, seed: 4 },
    );
  });

  it('GET and DELETE with made-up ids and queries', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom('/v1/models/', '/v1/jobs/', '/v1/datasets/', '/v1/models/'),
        fc.string({ minLength: 1, maxLength: 40 }),
        fc.constantFrom('GET', 'DELETE'),
        async (prefix, id, method) => {
          const r = await env.app.inject({ method: method as 'GET', url: prefix + encodeURIComponent(id) });
          answersWell(r);
        },
      ),
      { numRuns: RUNS, seed: 5 },
    );
  });

  it('the service still answers afterwards', async () => {
    expect((await env.app.inject({ method: 'GET', url: '/healthz' })).statusCode).toBe(200);
  });
});
