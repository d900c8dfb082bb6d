import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { fromConfig } from '../../src/io/config.js';
import { parameterLowerBound } from '../../models/parameter-bound.js';
import { createModelAndDataset, makeEnv, tinyDecoder, type TestEnv } from '../service/helpers.js';

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

describe('the parameter bound the API checks before building, fuzzed', () => {
  /** Valid definitions of many shapes (the sizes that hold parameters). */
  const definition = fc.record({
    numTokens: fc.integer({ min: 1, max: 300 }),
    maxSeqLen: fc.integer({ min: 1, max: 64 }),
    embDim: fc.option(fc.integer({ min: 1, max: 24 }), { nil: undefined }),
    tieEmbedding: fc.boolean(),
    layers: fc.record({
      type: fc.constantFrom('Decoder', 'Encoder'),
      dim: fc.integer({ min: 1, max: 24 }),
      depth: fc.integer({ min: 1, max: 3 }),
      heads: fc.integer({ min: 1, max: 4 }),
      attn_dim_head: fc.option(fc.integer({ min: 1, max: 16 }), { nil: undefined }),
      ffMult: fc.option(fc.double({ min: 0.1, max: 6, noNaN: true }), { nil: undefined }),
      ffGlu: fc.boolean(),
      crossAttend: fc.boolean(),
      attnKvHeads: fc.option(fc.constant(1), { nil: undefined }),
      attn_use_latent_q: fc.option(fc.constant(true), { nil: undefined }),
      attn_dim_latent_q: fc.integer({ min: 1, max: 24 }),
      customLayers: fc.option(fc.array(fc.constantFrom('a', 'f'), { minLength: 1, maxLength: 4 }), {
        nil: undefined,
      }),
    }),
  });
  it('is never more than the parameters the definition builds into', () => {
    let built = 0;
    const runs = Math.min(RUNS, 300);
    fc.assert(
      fc.property(definition, (d) => {
        const layers = Object.fromEntries(Object.entries(d.layers).filter(([, v]) => v !== undefined));
        if (layers.customLayers) delete layers.depth;
        const config = {
          wrapper: 'TransformerWrapper',
          numTokens: d.numTokens,
          maxSeqLen: d.maxSeqLen,
          tieEmbedding: d.tieEmbedding && d.embDim === undefined,
          ...(d.embDim !== undefined ? { embDim: d.embDim } : {}),
          attnLayers: layers,
        };
        let model: { numParameters(): number; dispose(): void };
        try {
          model = fromConfig(config) as unknown as typeof model;
        } catch (e) {
          // combinations the library refuses (e.g. a floor(dim * ffMult) of 0) build nothing
          expect((e as Error).message).toMatch(/^[A-Za-z.]+: /);
          return;
        }
        built++;
        try {
          const bound = parameterLowerBound(config);
          expect(bound.total).toBeGreaterThan(0);
          expect(bound.total).toBeLessThanOrEqual(model.numParameters());
        } finally {
          model.dispose();
        }
      }),
      { numRuns: runs, seed: 6 },
    );
    // most definitions are valid: the bound was compared with real models, not skipped
    expect(built).toBeGreaterThan(runs / 2);
  });
});

describe('request bodies and queries, fuzzed (real Redis, no worker)', () => {
  let env: TestEnv;
  let modelId = '';
  let datasetId = '';
  beforeAll(async () => {
    env = await makeEnv();
    ({ modelId, datasetId } = await createModelAndDataset(env, 'f', 'abc '.repeat(200), '?name=f'));
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

  it('a definition over MAX_PARAMETERS is refused before anything is allocated', async () => {
    // 6 x 2 x 512 x (512 x 2^20) feedforward parameters: 3.3e12, 13 TB of float32 if it were built
    const config = tinyDecoder({ attnLayers: { dim: 512, depth: 6, ffMult: 2 ** 20 } });
    const rssBefore = process.memoryUsage().rss;
    const r = await env.app.inject({ method: 'POST', url: '/v1/models', payload: { name: 'big', config } });
    expect(r.statusCode).toBe(400);
    expect(r.json().message).toMatch(
      /^config: the model would have at least \d+ parameters .*feedforward \d+\), over the limit MAX_PARAMETERS=50000000$/,
    );
    // building even one of its feedforward weights would have taken 1 GiB
    expect(process.memoryUsage().rss - rssBefore).toBeLessThan(256 * 1024 * 1024);
    // a factor that makes no size at all is named by the library's rule, with the key path
    const bad = tinyDecoder({ attnLayers: { ffMult: 2 ** 53 } });
    const r2 = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'x', config: bad },
    });
    expect(r2.statusCode).toBe(400);
    expect(r2.json().message).toMatch(/^config\.attnLayers\.ffMult: expected a factor/);
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
