import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import { loadSafetensors } from '../../src/io/safetensors.js';
import { freePort, startRedisChild, type RedisChild } from '../../service/redis-server.js';
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
} from '../service/helpers.js';
import { closeRedis, createRedis } from '../../workers/queues.js';

// Faults injected while jobs run; every wait is for a state (an event seen, a process gone), and
// every check compares what clients received with what the job's Redis Stream holds.

const TEXT = 'the quick brown fox jumps over the lazy dog. '.repeat(200);

/** Progress steps, in the order received. */
const steps = (events: SseEvent[]) =>
  events.filter((e) => e.event === 'progress').map((e) => e.data.step as number);

/** Every event id of a job's stream in Redis, oldest first. */
async function streamIds(env: TestEnv, jobId: string): Promise<string[]> {
  const entries = await env.app.svc.redis.xrange(env.app.svc.registry.eventsKey(jobId), '-', '+');
  return entries.map(([id]) => id);
}

async function setUp(env: TestEnv): Promise<{ modelId: string; datasetId: string }> {
  const m = await env.app.inject({
    method: 'POST',
    url: '/v1/models',
    payload: { name: 'f', config: tinyDecoder() },
  });
  const d = await env.app.inject({
    method: 'POST',
    url: '/v1/datasets',
    headers: { 'content-type': 'text/plain' },
    payload: TEXT,
  });
  return { modelId: m.json().id, datasetId: d.json().id };
}

describe('Redis restarted mid-job (append-only persistence)', () => {
  let redis: RedisChild;
  let dir: string;
  let env: TestEnv;
  let base: string;
  let ids: { modelId: string; datasetId: string };

  /**
   * Kills Redis outright, keeps it down until the service's connections have noticed and for
   * OUTAGE_MS more (long enough for commands to fail, not only to wait), then starts it again on
   * the same port and data folder.
   */
  const OUTAGE_MS = 1500;
  async function restartRedis(): Promise<void> {
    const port = redis.port;
    const exited = new Promise((r) => redis.process.once('exit', r));
    redis.process.kill('SIGKILL');
    await exited;
    await waitFor(async () => env.app.svc.redis.status !== 'ready', 10_000, 'the API to see Redis gone');
    await new Promise((r) => setTimeout(r, OUTAGE_MS));
    redis = await startRedisChild({ dir, port });
  }

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'xt-aof-'));
    redis = await startRedisChild({ dir });
    // the restart is a SIGKILL: at appendfsync everysec, Redis may acknowledge (and serve to readers)
    // a write it has not yet written to its file (postponed while a background fsync runs), which the
    // kill then loses; these tests check that the service loses nothing that Redis kept
    const admin = createRedis(redis.url);
    await admin.config('SET', 'appendfsync', 'always');
    await closeRedis(admin);
    env = await makeEnv({ app: { redisUrl: redis.url }, workers: { redisUrl: redis.url } });
    base = await env.app.listen({ port: 0, host: '127.0.0.1' });
    ids = await setUp(env);
  });
  afterAll(async () => {
    await env?.close();
    await redis?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('training goes on: every step arrives once, in order, and the job completes', async () => {
    const STEPS = 150;
    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${ids.modelId}/train`,
      payload: {
        datasetId: ids.datasetId,
        steps: STEPS,
        batchSize: 2,
        seqLen: 16,
        checkpointEvery: 25,
        seed: 1,
      },
    });
    const { jobId } = t.json();
    let restarted: Promise<void> | null = null;
    const events = await readSse(`${base}/v1/jobs/${jobId}/events`, {}, (ev) => {
      if (!restarted && ev.event === 'progress' && (ev.data.step as number) >= 10) restarted = restartRedis();
    });
    expect(restarted).not.toBeNull();
    await restarted;
    // one stream from before the restart to the end: no gap, no repeat, no error event
    expect(events.map((e) => e.event)).not.toContain('error');
    const got = steps(events);
    const resumed = events.find((e) => e.event === 'resumed');
    if (resumed) {
      // handed to a new run of the job: the steps after its checkpoint come again, from there on
      const from = resumed.data.step as number;
      const at = events.indexOf(resumed);
      expect(steps(events.slice(at))).toEqual(Array.from({ length: STEPS - from }, (_, i) => from + 1 + i));
    } else {
      expect(got).toEqual(Array.from({ length: STEPS }, (_, i) => i + 1));
    }
    expect(events.at(-1)!.event).toBe('completed');
    expect(events.map((e) => e.id)).toEqual(await streamIds(env, jobId));
    const job = (await env.app.inject({ method: 'GET', url: `/v1/jobs/${jobId}` })).json();
    expect(job).toMatchObject({ state: 'completed', result: { steps: STEPS } });
  });

  it('generation goes on: every token arrives once and the result holds them all', async () => {
    let restarted: Promise<void> | null = null;
    const events = await readSse(
      `${base}/v1/models/${ids.modelId}/generate`,
      {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        // far more tokens than are made while the restart is under way: it lands mid-generation
        body: JSON.stringify({ prompt: 'the ', maxTokens: 3000, temperature: 0, stream: true }),
      },
      (ev) => {
        if (!restarted && ev.event === 'token' && (ev.data.index as number) >= 5) restarted = restartRedis();
      },
    );
    expect(restarted).not.toBeNull();
    await restarted;
    expect(events.map((e) => e.event)).not.toContain('error');
    const tokens = events.filter((e) => e.event === 'token');
    expect(tokens.map((e) => e.data.index)).toEqual(tokens.map((_, i) => i));
    const done = events.at(-1)!;
    expect(done.event).toBe('done');
    expect(done.data.tokens).toEqual(tokens.map((e) => e.data.tokenId));
    expect((done.data.tokens as number[]).length).toBe(3000);
    const jobId = events[0]!.data.jobId as string;
    expect(events.slice(1).map((e) => e.id)).toEqual(await streamIds(env, jobId));
  });
});

/** Runs `npm run api`'s entrypoint as a child process on `port`. */
function spawnApi(env: TestEnv, port: number): ServiceProcess {
  return runServiceEntry('api', {
    REDIS_URL: redisUrl(),
    REDIS_PREFIX: env.prefix,
    DATA_DIR: env.dataDir,
    PORT: String(port),
    HOST: '127.0.0.1',
  });
}

async function ready(port: number, api: ServiceProcess): Promise<void> {
  await waitFor(
    async () => {
      if (api.child.exitCode !== null) throw new Error(`api exited: ${api.out()}`);
      try {
        return (await fetch(`http://127.0.0.1:${port}/readyz`)).status === 200;
      } catch {
        return false;
      }
    },
    60_000,
    'the API to be ready',
  );
}

describe('the API restarted while a client follows a job', () => {
  let env: TestEnv;
  let ids: { modelId: string; datasetId: string };
  const children: ChildProcess[] = [];
  beforeAll(async () => {
    env = await makeEnv({ workers: true });
    ids = await setUp(env);
  });
  afterAll(async () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    await env?.close();
  });

  it('the client is told, reconnects with Last-Event-ID (after a drain and after a kill) and loses nothing', async () => {
    // a job far longer than the restarts: cancelled at the end, so its stream ends with `cancelled`
    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${ids.modelId}/train`,
      payload: { datasetId: ids.datasetId, steps: 1_000_000, batchSize: 2, seqLen: 8, checkpointEvery: 0 },
    });
    const { jobId } = t.json();
    const port = await freePort();
    const received: SseEvent[][] = [];
    let lastId: string | undefined;
    /** Follows the job from Last-Event-ID; calls onReached at a step; keeps what arrived even if the server dies. */
    const follow = async (untilStep: number, onReached: () => void, dies = false): Promise<SseEvent[]> => {
      const got: SseEvent[] = [];
      try {
        await readSse(
          `http://127.0.0.1:${port}/v1/jobs/${jobId}/events`,
          { headers: lastId ? { 'last-event-id': lastId } : {} },
          (ev) => {
            got.push(ev);
            if (ev.id) lastId = ev.id;
            if (ev.event === 'progress' && (ev.data.step as number) >= untilStep) onReached();
            return false;
          },
        );
      } catch (e) {
        if (!dies) throw e; // a killed server cuts the stream mid-way
      }
      return got;
    };

    for (const how of ['SIGTERM', 'SIGKILL'] as const) {
      const api = spawnApi(env, port);
      children.push(api.child);
      await ready(port, api);
      const from = lastId
        ? Number(
            received
              .flat()
              .filter((e) => e.event === 'progress')
              .at(-1)!.data.step,
          )
        : 0;
      let signalled = false;
      const events = await follow(
        from + 5,
        () => {
          if (!signalled) {
            signalled = true;
            api.child.kill(how);
          }
        },
        how === 'SIGKILL',
      );
      const code = await api.exited;
      received.push(events);
      if (how === 'SIGTERM') {
        // drained at once (not at the 60 s limit), and the stream said why it ended
        expect(code, api.out()).toBe(0);
        expect(events.at(-1)).toMatchObject({ event: 'error', id: undefined });
        expect(events.at(-1)!.data.message).toMatch(/shutting down; reconnect with Last-Event-ID/);
      }
    }
    // a third API: read to the end after a cancel
    const api = spawnApi(env, port);
    children.push(api.child);
    await ready(port, api);
    await env.app.inject({ method: 'DELETE', url: `/v1/jobs/${jobId}` });
    received.push(await follow(Infinity, () => undefined));
    api.child.kill('SIGTERM');
    await api.exited;

    const all = received.flat().filter((e) => e.id !== undefined);
    expect(all.at(-1)!.event).toBe('cancelled');
    // what the client holds is exactly the job's stream: nothing lost, nothing twice
    expect(all.map((e) => e.id)).toEqual(await streamIds(env, jobId));
    const s = steps(all);
    expect(s).toEqual(Array.from({ length: s.length }, (_, i) => i + 1));
    expect(received.map((r) => r.length).every((n) => n > 0)).toBe(true);
  });
});

describe('a checkpoint that cannot be written', () => {
  let env: TestEnv;
  let base: string;
  let ids: { modelId: string; datasetId: string };
  beforeAll(async () => {
    env = await makeEnv({ workers: true });
    base = await env.app.listen({ port: 0, host: '127.0.0.1' });
    ids = await setUp(env);
  });
  afterEach(() => vi.restoreAllMocks());
  afterAll(async () => env?.close());

  it('fails the job with a clear error; the previous checkpoint stays intact, loadable and current', async () => {
    // the disk "fills up" for every checkpoint after the first: writes into it fail with ENOSPC
    const open = fs.promises.open;
    let refused = 0;
    vi.spyOn(fs.promises, 'open').mockImplementation(async (file, ...rest) => {
      const m = /step-(\d+)\.tmp-/.exec(String(file));
      if (m && Number(m[1]) !== 10) {
        refused++;
        throw Object.assign(new Error(`ENOSPC: no space left on device, open '${String(file)}'`), {
          code: 'ENOSPC',
        });
      }
      return open(file, ...(rest as [fs.OpenMode]));
    });
    const t = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${ids.modelId}/train`,
      payload: {
        datasetId: ids.datasetId,
        steps: 40,
        batchSize: 2,
        seqLen: 16,
        checkpointEvery: 10,
        seed: 3,
      },
    });
    const { jobId } = t.json();
    const events = await readSse(`${base}/v1/jobs/${jobId}/events`, {}, () => false);
    expect(refused).toBeGreaterThan(0);
    const last = events.at(-1)!;
    expect(last.event).toBe('failed');
    expect(last.data.error).toMatch(
      /^checkpoint of step 20 could not be written \(ENOSPC: no space left on device, .*\); the checkpoint of step 10 is kept$/,
    );
    const job = (await env.app.inject({ method: 'GET', url: `/v1/jobs/${jobId}` })).json();
    expect(job).toMatchObject({ state: 'failed', error: last.data.error });
    // the model's weights are the step-10 checkpoint's, whole: its files match their recorded hashes
    const ckpts = (
      await env.app.inject({ method: 'GET', url: `/v1/models/${ids.modelId}/checkpoints` })
    ).json();
    expect(ckpts.checkpoints.map((c: { step: number }) => c.step)).toEqual([10]);
    const stepDir = env.app.svc.storage.abs(env.app.svc.storage.checkpointDir(ids.modelId, jobId, 10));
    const dirs = fs.readdirSync(path.dirname(stepDir));
    expect(dirs).toEqual([path.basename(stepDir)]); // no half-written folder left beside it
    const w = await env.app.inject({ method: 'GET', url: `/v1/models/${ids.modelId}/weights` });
    expect(w.statusCode).toBe(200);
    const { tensors } = loadSafetensors(new Uint8Array(w.rawPayload));
    const onDisk = loadSafetensors(new Uint8Array(fs.readFileSync(path.join(stepDir, 'model.safetensors'))));
    try {
      expect(Object.keys(tensors).length).toBeGreaterThan(0);
      for (const [k, v] of Object.entries(tensors))
        expect([k, Array.from(v.dataSync())]).toEqual([
          k,
          Array.from(onDisk.tensors[`net.${k}`]!.dataSync()),
        ]);
    } finally {
      for (const v of [...Object.values(tensors), ...Object.values(onDisk.tensors)]) v.dispose();
    }
    // and it resumes: with the disk back, a new job trains from those weights
    vi.restoreAllMocks();
    const again = await env.app.inject({
      method: 'POST',
      url: `/v1/models/${ids.modelId}/train`,
      payload: { datasetId: ids.datasetId, steps: 5, batchSize: 2, seqLen: 16, seed: 3 },
    });
    const next = again.json().jobId as string;
    await waitFor(async () => {
      const j = (await env.app.inject({ method: 'GET', url: `/v1/jobs/${next}` })).json();
      return j.state === 'completed' || j.state === 'failed' ? j : null;
    }).then((j) => expect(j.state).toBe('completed'));
  });
});
