import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { backendInfo, loadSafetensors, saveSafetensors } from '../../src/index.js';
import { makeEnv, readSse, tinyDecoder, waitFor, type SseEvent, type TestEnv } from './helpers.js';

const TEXT = 'abcdefgh '.repeat(400);

describe('end to end: define, upload, train, stream, cancel (real Redis, in-process worker)', () => {
  let env: TestEnv;
  let base: string;
  let modelId: string;
  let datasetId: string;

  beforeAll(async () => {
    env = await makeEnv({
      app: {
        limits: {
          maxParameters: 200_000,
          maxTokens: 600,
          maxSeqLen: 48,
          maxBatchSize: 16,
          maxSteps: 100_000,
        },
      },
      workers: true,
    });
    base = await env.app.listen({ port: 0, host: '127.0.0.1' });
  });
  afterAll(async () => env?.close());

  it('creates a model from a JSON definition (snake_case accepted)', async () => {
    const r = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: {
        name: 'tiny',
        config: {
          wrapper: 'TransformerWrapper',
          num_tokens: 256,
          max_seq_len: 64,
          attn_layers: { type: 'Decoder', dim: 32, depth: 1, heads: 2 },
        },
      },
    });
    expect(r.statusCode).toBe(201);
    const m = r.json();
    expect(m).toMatchObject({ name: 'tiny', tokenizer: 'byte' });
    expect(m.parameters).toBeGreaterThan(256 * 32);
    expect(Date.parse(m.createdAt)).not.toBeNaN();
    modelId = m.id;
    const got = await env.app.inject({ method: 'GET', url: `/v1/models/${modelId}` });
    expect(got.json()).toEqual(m);
    const list = await env.app.inject({ method: 'GET', url: '/v1/models' });
    expect(list.json().models.map((x: { id: string }) => x.id)).toContain(modelId);
  });

  it('rejects bad definitions with 400 naming the field', async () => {
    const depth = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'bad', config: tinyDecoder({ attnLayers: { depth: -1 } }) },
    });
    expect(depth.statusCode).toBe(400);
    expect(depth.json().message).toContain('attnLayers.depth');
    const unknown = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'bad', config: tinyDecoder({ attnLayers: { dimm: 3 } }) },
    });
    expect(unknown.statusCode).toBe(400);
    expect(unknown.json().message).toContain('dimm');
    const vocab = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'bad', config: tinyDecoder({ numTokens: 100 }) },
    });
    expect(vocab.statusCode).toBe(400);
    expect(vocab.json().message).toContain('numTokens');
    const bpe = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'bad', config: tinyDecoder(), tokenizer: 'cl100k_base' },
    });
    expect(bpe.statusCode).toBe(400);
    expect(bpe.json().message).toMatch(/numTokens: expected at least 10\d{4}/);
    const big = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'big', config: tinyDecoder({ attnLayers: { dim: 128, depth: 2 } }) },
    });
    expect(big.statusCode).toBe(400);
    expect(big.json().message).toContain('MAX_PARAMETERS=200000');
    const tok = await env.app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: { name: 'bad', config: tinyDecoder(), tokenizer: 'gpt2' },
    });
    expect(tok.statusCode).toBe(400);
    expect(tok.json().message).toContain('tokenizer');
  });

  it('uploads text and trains: progress events stream, loss falls, checkpoints are kept', async () => {
    const d = await env.app.inject({
      method: 'POST',
      url: '/v1/datasets?name=rep',
      headers: { 'content-type': 'text/plain' },
      payload: TEXT,
    });
    expect(d.statusCode).toBe(201);
    datasetId = d.json().id;

    const over: [Record<string, number>, string][] = [
      [{ seqLen: 49 }, 'seqLen: 49 is over the limit MAX_SEQ_LEN=48'],
      [{ batchSize: 17 }, 'batchSize: 17 is over the limit MAX_BATCH_SIZE=16'],
      [{ steps: 100_001 }, 'steps: 100001 is over the limit MAX_STEPS=100000'],
      [{ warmupSteps: 20 }, 'warmupSteps'],
    ];
    for (const [change, message] of over) {
      const r = await env.app.inject({
        method: 'POST',
        url: `/v1/models/${modelId}/train`,
        payload: { datasetId, steps: 10, batchSize: 4, seqLen: 16, learningRate: 0.01, ...change },
      });
      expect(r.statusCode, JSON.stringify(change)).toBe(400);
      expect(r.json().message).toContain(message);
    }
    const unknownData = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/train`,
      payload: { datasetId: 'nope', steps: 10, batchSize: 4, seqLen: 16, learningRate: 0.01 },
    });
    expect(unknownData.statusCode).toBe(404);

    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/train`,
      payload: {
        datasetId,
        steps: 40,
        batchSize: 8,
        seqLen: 16,
        learningRate: 0.01,
        warmupSteps: 2,
        checkpointEvery: 10,
        seed: 1,
      },
    });
    expect(t.statusCode).toBe(202);
    const { jobId } = t.json();

    let deleteWhileBusy = 0;
    const events = await readSse(`${base}/v1/jobs/${jobId}/events`, {}, (ev, all) => {
      if (ev.event === 'progress' && all.filter((e) => e.event === 'progress').length === 1) {
        void env.app
          .inject({ method: 'DELETE', url: `/v1/models/${modelId}` })
          .then((r) => (deleteWhileBusy = r.statusCode));
      }
      return false;
    });
    expect(deleteWhileBusy).toBe(409);
    expect(events.every((e) => typeof e.id === 'string' && /^\d+-\d+$/.test(e.id!))).toBe(true);
    const progress = events.filter((e) => e.event === 'progress').map((e) => e.data);
    expect(progress.map((p) => p.step)).toEqual(Array.from({ length: 40 }, (_, i) => i + 1));
    for (const p of progress) {
      expect(p).toMatchObject({ steps: 40 });
      for (const k of ['loss', 'learningRate', 'tokensPerSecond']) expect(typeof p[k]).toBe('number');
    }
    expect(events.at(-1)!.event).toBe('completed');
    const first = progress.slice(0, 3).reduce((a, p) => a + (p.loss as number), 0) / 3;
    const last = progress.slice(-3).reduce((a, p) => a + (p.loss as number), 0) / 3;
    expect(last).toBeLessThan(first * 0.7);

    const job = (await env.app.inject({ method: 'GET', url: `/v1/jobs/${jobId}` })).json();
    expect(job).toMatchObject({ id: jobId, type: 'train', modelId, state: 'completed' });
    expect(job.result.steps).toBe(40);
    expect(job.result.finalLoss).toBeLessThan(job.result.firstLoss);

    const ck = (await env.app.inject({ method: 'GET', url: `/v1/models/${modelId}/checkpoints` })).json();
    expect(ck.checkpoints.map((c: { step: number }) => c.step)).toEqual([10, 20, 30, 40]);
    expect(ck.checkpoints.every((c: { jobId: string }) => c.jobId === jobId)).toBe(true);
  });

  it('a training request needs only datasetId and steps: batchSize, seqLen and learningRate default', async () => {
    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/train`,
      payload: { datasetId, steps: 2 },
    });
    expect(t.statusCode).toBe(202);
    const { jobId } = t.json();
    // the defaults that the job runs with: batch 8, lr 3e-4, seqLen = min(maxSeqLen 64, 256, MAX_SEQ_LEN 48)
    const queued = await env.app.svc.trainQueue.getJob(jobId);
    expect(queued!.data).toMatchObject({ batchSize: 8, seqLen: 48, learningRate: 3e-4, steps: 2 });
    const events = await readSse(`${base}/v1/jobs/${jobId}/events`, {}, () => false);
    expect(events.at(-1)!.event).toBe('completed');
  });

  it('training and generation take a precision: bf16 on a torch worker, fp32 anywhere; others are refused', async () => {
    for (const [url, payload] of [
      [`/v1/models/${modelId}/train`, { datasetId, steps: 2, precision: 'fp16' }],
      [`/v1/models/${modelId}/generate`, { prompt: 'ab', maxTokens: 2, precision: 'half' }],
    ] as const) {
      const r = await env.app.inject({ method: 'POST', url, payload });
      expect(r.statusCode, url).toBe(400);
      expect(r.json().message).toContain('precision');
    }
    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/train`,
      payload: { datasetId, steps: 2, batchSize: 2, seqLen: 16, precision: 'bf16' },
    });
    expect(t.statusCode).toBe(202);
    const events = await readSse(`${base}/v1/jobs/${t.json().jobId}/events`, {}, () => false);
    const g = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/generate`,
      payload: { prompt: 'abcd', maxTokens: 6, temperature: 0, precision: 'bf16' },
    });
    if (backendInfo()!.backend === 'torch') {
      expect(events.at(-1)!.event).toBe('completed');
      expect(events.filter((e) => e.event === 'progress').every((e) => Number.isFinite(e.data.loss))).toBe(
        true,
      );
      expect(g.statusCode).toBe(200);
      expect(g.json().tokens).toHaveLength(6);
    } else {
      expect(events.at(-1)!.event).toBe('failed');
      expect(events.at(-1)!.data.error).toContain('bf16 needs the torch backend');
      expect(g.statusCode).toBeGreaterThanOrEqual(400);
    }
  });

  it('a client that reconnects with Last-Event-ID gets exactly the events it missed', async () => {
    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/train`,
      payload: { datasetId, steps: 10, batchSize: 2, seqLen: 8, learningRate: 0.001, checkpointEvery: 5 },
    });
    const { jobId } = t.json();
    const firstPart = await readSse(
      `${base}/v1/jobs/${jobId}/events`,
      {},
      (ev) => ev.event === 'progress' && ev.data.step === 3,
    );
    const lastId = firstPart.at(-1)!.id!;
    await new Promise((r) => setTimeout(r, 300)); // events go on while the client is away
    const rest = await readSse(
      `${base}/v1/jobs/${jobId}/events`,
      { headers: { 'last-event-id': lastId } },
      () => false,
    );
    const all = [...firstPart, ...rest];
    const steps = all.filter((e) => e.event === 'progress').map((e) => e.data.step);
    expect(steps).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    expect(new Set(all.map((e) => e.id)).size).toBe(all.length);
    expect(all.at(-1)!.event).toBe('completed');
  });

  it('a job that fails ends its stream with `failed` and reports the error', async () => {
    const small = await env.app.inject({
      method: 'POST',
      url: '/v1/datasets?name=small',
      headers: { 'content-type': 'text/plain' },
      payload: 'abc',
    });
    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/train`,
      payload: { datasetId: small.json().id, steps: 5, batchSize: 2, seqLen: 16, learningRate: 0.01 },
    });
    const { jobId } = t.json();
    const events = await readSse(`${base}/v1/jobs/${jobId}/events`, {}, () => false);
    expect(events.at(-1)!.event).toBe('failed');
    expect(events.at(-1)!.data.error).toContain('too few');
    const job = (await env.app.inject({ method: 'GET', url: `/v1/jobs/${jobId}` })).json();
    expect(job).toMatchObject({ state: 'failed', error: expect.stringContaining('seqLen 16') });
    // the model's checkpoints from earlier jobs are untouched
    const ck = (await env.app.inject({ method: 'GET', url: `/v1/models/${modelId}/checkpoints` })).json();
    expect(ck.checkpoints.length).toBeGreaterThanOrEqual(4);
  });

  let streamed: SseEvent[] = [];
  it('streams a generation as token events then done (SSE), and JSON gives the same tokens', async () => {
    const body = { prompt: 'abcd', maxTokens: 24, temperature: 0 };
    streamed = await readSse(
      `${base}/v1/models/${modelId}/generate`,
      {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ ...body, stream: true }),
      },
      () => false,
    );
    expect(streamed.every((e) => typeof e.id === 'string')).toBe(true);
    const tokens = streamed.filter((e) => e.event === 'token');
    expect(tokens.map((e) => e.data.index)).toEqual(Array.from({ length: 24 }, (_, i) => i));
    const done = streamed.find((e) => e.event === 'done')!;
    expect(done.data.tokens).toEqual(tokens.map((e) => e.data.tokenId));
    expect(done.data.text).toBe(tokens.map((e) => e.data.text).join(''));
    expect(done.data.tokensPerSecond as number).toBeGreaterThan(0);
    expect(typeof done.data.timeToFirstTokenMs).toBe('number');
    // the model learnt the repetition: greedy decoding continues it
    expect(done.data.text as string).toContain('efgh');

    const viaAccept = await readSse(
      `${base}/v1/models/${modelId}/generate`,
      {
        method: 'POST',
        headers: { 'content-type': 'application/json', accept: 'text/event-stream' },
        body: JSON.stringify(body),
      },
      () => false,
    );
    expect(viaAccept.find((e) => e.event === 'done')!.data.tokens).toEqual(done.data.tokens);

    const json = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/generate`,
      payload: body,
    });
    expect(json.statusCode).toBe(200);
    expect(json.json()).toMatchObject({
      tokens: done.data.tokens,
      text: done.data.text,
      finishReason: 'length',
    });

    const sampled = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/generate`,
      payload: { promptTokens: [97, 98], maxTokens: 8, temperature: 1, topK: 5, seed: 3, stop: ['zzz'] },
    });
    expect(sampled.statusCode).toBe(200);
    expect(sampled.json().tokens).toHaveLength(8);
  });

  it('stop strings end generation early', async () => {
    const r = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/generate`,
      payload: { prompt: 'abcd', maxTokens: 40, temperature: 0, stop: ['h'] },
    });
    const full = streamed.find((e) => e.event === 'done')!.data.text as string;
    expect(r.statusCode).toBe(200);
    expect(r.json().finishReason).toBe('stop');
    expect(r.json().text).toBe(full.slice(0, full.indexOf('h')));
  });

  it('generation requests are validated', async () => {
    const cases: [Record<string, unknown>, string][] = [
      [{ prompt: 'a', maxTokens: 601 }, 'MAX_TOKENS=600'],
      [{ maxTokens: 3 }, 'prompt'],
      [{ prompt: 'a', promptTokens: [1], maxTokens: 3 }, 'prompt'],
      [{ promptTokens: [300], maxTokens: 3 }, 'promptTokens[0]'],
      [{ prompt: '', maxTokens: 3 }, 'prompt'],
      [{ prompt: 'a', maxTokens: 0 }, 'maxTokens'],
    ];
    for (const [payload, needle] of cases) {
      const r = await env.app.inject({ method: 'POST', url: `/v1/models/${modelId}/generate`, payload });
      expect(r.statusCode, JSON.stringify(payload)).toBe(400);
      expect(r.json().message).toContain(needle);
    }
  });

  it('a client that disconnects cancels its generation', async () => {
    let jobId = '';
    const seen = await readSse(
      `${base}/v1/models/${modelId}/generate`,
      {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ prompt: 'abc', maxTokens: 600, stream: true }),
      },
      (ev) => {
        if (ev.event === 'start') jobId = ev.data.jobId as string;
        return ev.event === 'token' && (ev.data.index as number) >= 2;
      },
    );
    expect(seen.filter((e) => e.event === 'token').length).toBe(3);
    const job = await waitFor(
      async () => {
        const j = (await env.app.inject({ method: 'GET', url: `/v1/jobs/${jobId}` })).json();
        return j.state === 'cancelled' ? j : null;
      },
      30_000,
      'generation cancelled',
    );
    expect(job.type).toBe('generate');
    expect(job.progress.tokens as number).toBeLessThan(600);
  });

  it('DELETE /v1/jobs/:id cancels a training job within one step; it keeps its checkpoints', async () => {
    // far more steps than can run before the request lands: the job is still active when it does
    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${modelId}/train`,
      payload: {
        datasetId,
        steps: 100_000,
        batchSize: 2,
        seqLen: 8,
        learningRate: 0.001,
        checkpointEvery: 3,
      },
    });
    const { jobId } = t.json();
    let deleted: Promise<{
      statusCode: number;
      json(): { state: string; progress: { step?: number } };
    }> | null = null;
    const events = await readSse(`${base}/v1/jobs/${jobId}/events`, {}, (ev) => {
      if (ev.event === 'checkpoint' && !deleted)
        deleted = env.app.inject({ method: 'DELETE', url: `/v1/jobs/${jobId}` });
      return false;
    });
    const del = await deleted!;
    expect(del.statusCode).toBe(202);
    // the job as it was once the request was recorded: the worker was at most one step further on,
    // and it checks for cancellation before every step
    const recorded = del.json().progress.step ?? 0;
    const end = events.at(-1)!;
    expect(end.event).toBe('cancelled');
    expect(end.data.step as number).toBeGreaterThanOrEqual(recorded);
    expect(end.data.step as number).toBeLessThanOrEqual(recorded + 1);
    const job = (await env.app.inject({ method: 'GET', url: `/v1/jobs/${jobId}` })).json();
    expect(job.state).toBe('cancelled');
    const again = await env.app.inject({ method: 'DELETE', url: `/v1/jobs/${jobId}` });
    expect(again.statusCode).toBe(409);
    const ck = (await env.app.inject({ method: 'GET', url: `/v1/models/${modelId}/checkpoints` })).json();
    expect(ck.checkpoints.filter((c: { jobId: string }) => c.jobId === jobId).length).toBeGreaterThanOrEqual(
      1,
    );
  });

  it('downloads weights as safetensors and uploads them back, checked strictly', async () => {
    const w = await env.app.inject({ method: 'GET', url: `/v1/models/${modelId}/weights` });
    expect(w.statusCode).toBe(200);
    expect(w.headers['content-type']).toBe('application/octet-stream');
    const bytes = new Uint8Array(w.rawPayload);
    const { tensors } = loadSafetensors(bytes);
    const names = Object.keys(tensors);
    expect(names.length).toBeGreaterThan(3);
    const put = await env.app.inject({
      method: 'PUT',
      url: `/v1/models/${modelId}/weights`,
      headers: { 'content-type': 'application/octet-stream' },
      payload: Buffer.from(bytes),
    });
    expect(put.statusCode).toBe(200);
    expect(put.json().id).toBe(modelId);
    const boundary = '----xtweights';
    const multipart = Buffer.concat([
      Buffer.from(
        `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="w.safetensors"\r\n` +
          'Content-Type: application/octet-stream\r\n\r\n',
      ),
      Buffer.from(bytes),
      Buffer.from(`\r\n--${boundary}--\r\n`),
    ]);
    const viaForm = await env.app.inject({
      method: 'PUT',
      url: `/v1/models/${modelId}/weights`,
      headers: { 'content-type': `multipart/form-data; boundary=${boundary}` },
      payload: multipart,
    });
    expect(viaForm.statusCode).toBe(200);
    const back = await env.app.inject({ method: 'GET', url: `/v1/models/${modelId}/weights` });
    expect(Buffer.compare(back.rawPayload, Buffer.from(bytes))).toBe(0);

    // one key renamed, one mis-shaped, one missing
    const bad: Record<string, tf.Tensor> = { ...tensors };
    const [a, b, c] = names;
    bad[`${a}_extra`] = bad[a!]!;
    delete bad[a!];
    bad[b!] = tf.zeros([3, 3]);
    delete bad[c!];
    const r = await env.app.inject({
      method: 'PUT',
      url: `/v1/models/${modelId}/weights`,
      headers: { 'content-type': 'application/octet-stream' },
      payload: Buffer.from(saveSafetensors(bad)),
    });
    expect(r.statusCode).toBe(400);
    const msg = r.json().message as string;
    expect(msg).toContain('missing keys');
    expect(msg).toContain(`${a}_extra`);
    expect(msg).toContain('mis-shaped');
    bad[b!]!.dispose();
    for (const t of Object.values(tensors)) t.dispose();
    const junk = await env.app.inject({
      method: 'PUT',
      url: `/v1/models/${modelId}/weights`,
      headers: { 'content-type': 'application/octet-stream' },
      payload: Buffer.from('not safetensors'),
    });
    expect(junk.statusCode).toBe(400);
  });

  it('deletes a model once no job uses it', async () => {
    const del = await env.app.inject({ method: 'DELETE', url: `/v1/models/${modelId}` });
    expect(del.statusCode).toBe(204);
    expect((await env.app.inject({ method: 'GET', url: `/v1/models/${modelId}` })).statusCode).toBe(404);
  });
});
