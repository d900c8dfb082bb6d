import { mkdtempSync, rmSync, existsSync, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { descendants } from '../../scripts/proc-cpu.js';
import { allowedCpus } from '../../service/cpus.js';
import { freePort } from '../../service/redis-server.js';
import { createRedis } from '../../workers/queues.js';
import { redisUrl, runServiceEntry, waitFor, type ServiceProcess } from './helpers.js';

const runEntry = runServiceEntry;

/** The thread ids of process `pid`. */
const threadsOf = (pid: number): number[] => readdirSync(`/proc/${pid}/task`).map(Number);

/** Runs `npm run worker` (info logs, a fresh DATA_DIR) through `fn`; kills and cleans up after. */
async function withWorker(env: Record<string, string>, fn: (p: ServiceProcess) => Promise<void>) {
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'xt-worker-'));
  const p = runEntry('worker', { REDIS_URL: redisUrl(), DATA_DIR: dataDir, LOG_LEVEL: 'info', ...env });
  try {
    await fn(p);
  } finally {
    if (p.child.exitCode === null) p.child.kill('SIGKILL');
    rmSync(dataDir, { recursive: true, force: true });
  }
}

/** The process exits 0; a failure shows how it ended and what it wrote. */
async function expectCleanExit(p: ServiceProcess) {
  const end = await p.ended;
  expect(end.code, `ended with ${JSON.stringify(end)}; output:\n${p.out()}`).toBe(0);
}

describe('service processes', () => {
  it('an invalid environment stops start-up with a message naming each variable', async () => {
    const p = runEntry('start', { PORT: 'abc', WORKER_CONCURRENCY: '-1' });
    expect(await p.exited).toBe(1);
    expect(p.out()).toContain('PORT: expected an integer');
    expect(p.out()).toContain('WORKER_CONCURRENCY');
  });

  it('`npm start` without Redis installed says how to install it or set REDIS_URL', async () => {
    const p = runEntry('start', { REDIS_SERVER_BIN: '/nonexistent/redis-server' });
    expect(await p.exited).toBe(1);
    expect(p.out()).toContain('Redis was not found');
    expect(p.out()).toContain('npm run setup');
    expect(p.out()).toContain('apt-get install redis-server');
    expect(p.out()).toContain('REDIS_URL=redis://');
  });

  it('`npm run api` without REDIS_URL says how to set it', async () => {
    const p = runEntry('api', {});
    expect(await p.exited).toBe(1);
    expect(p.out()).toContain('REDIS_URL is required');
  });

  it('`npm start` without REDIS_URL runs a private redis-server under DATA_DIR, the worker in its own process (/healthz p99 under 50 ms while it trains), and drains on SIGTERM', async () => {
    const dataDir = mkdtempSync(path.join(os.tmpdir(), 'xt-start-'));
    const port = await freePort();
    const p = runEntry('start', { DATA_DIR: dataDir, PORT: String(port), HOST: '127.0.0.1' });
    try {
      const ready = await waitFor(
        async () => {
          if (p.child.exitCode !== null) throw new Error(`start exited: ${p.out()}`);
          try {
            const r = await fetch(`http://127.0.0.1:${port}/readyz`);
            return r.status === 200 ? ((await r.json()) as Record<string, unknown>) : null;
          } catch {
            return null;
          }
        },
        60_000,
        'readyz',
      );
      expect(ready).toMatchObject({ status: 'ok', backend: 'cpu', redis: 'ok' });
      expect(existsSync(path.join(dataDir, 'redis'))).toBe(true);
      // the API and the worker reach it over its Unix socket there
      const socket = path.join(dataDir, 'redis', 'redis.sock');
      expect(existsSync(socket)).toBe(true);
      const models = await fetch(`http://127.0.0.1:${port}/v1/models`);
      expect(models.status).toBe(200);

      // the worker runs in its own process: while it trains, /healthz answers within 50 ms (p99)
      const B = `http://127.0.0.1:${port}/v1`;
      const post = async (url: string, body: unknown, type = 'application/json') =>
        (await fetch(url, {
          method: 'POST',
          headers: { 'content-type': type },
          body: typeof body === 'string' ? body : JSON.stringify(body),
        }).then((r) => r.json())) as Record<string, string>;
      const model = await post(`${B}/models`, {
        name: 'm',
        config: {
          wrapper: 'TransformerWrapper',
          numTokens: 256,
          maxSeqLen: 64,
          attnLayers: { type: 'Decoder', dim: 64, depth: 2, heads: 4 },
        },
      });
      const data = await post(`${B}/datasets`, 'the quick brown fox. '.repeat(400), 'text/plain');
      const { jobId } = await post(`${B}/models/${model.id}/train`, {
        datasetId: data.id,
        steps: 100000,
        batchSize: 8,
        seqLen: 64,
      });
      await waitFor(
        async () => {
          const j = (await (await fetch(`${B}/jobs/${jobId}`)).json()) as { progress: { step?: number } };
          return (j.progress.step ?? 0) >= 2;
        },
        60_000,
        'training steps',
      );
      // WORKER_CPU=auto (read once the worker trains, so it has started): with two CPUs or more, the
      // API and Redis keep off the last one; the worker's main thread (its compute) may use every
      // CPU, its threads from before it took them back may not
      const cpus = allowedCpus()!;
      const apiPid = p.child.pid!;
      const kids = descendants(apiPid);
      const redisPid = kids.find((k) => k.comm === 'redis-server')!.pid;
      const workerPid = kids.find((k) => k.cmdline.includes('service/worker.ts'))!.pid;
      const others = cpus.length >= 2 ? cpus.slice(0, -1) : cpus;
      for (const t of threadsOf(apiPid)) expect(allowedCpus(apiPid, t)).toEqual(others);
      for (const t of threadsOf(redisPid)) expect(allowedCpus(redisPid, t)).toEqual(others);
      expect(allowedCpus(workerPid)).toEqual(cpus);
      const workerThreads = threadsOf(workerPid).map((t) => allowedCpus(workerPid, t));
      expect(workerThreads).toContainEqual(others);
      const conn = createRedis(`unix://${socket}`);
      try {
        const clients = String(await conn.client('LIST'))
          .split('\n')
          .filter((l) => l.trim());
        // the API's and the training worker's connections besides this one, none over TCP
        expect(clients.filter((l) => l.includes(`laddr=${socket}`)).length).toBeGreaterThan(3);
        expect(clients.filter((l) => /laddr=127\.0\.0\.1:/.test(l))).toEqual([]);
      } finally {
        conn.disconnect();
      }
      const times: number[] = [];
      for (let i = 0; i < 200; i++) {
        const t0 = performance.now();
        expect((await fetch(`http://127.0.0.1:${port}/healthz`)).status).toBe(200);
        times.push(performance.now() - t0);
      }
      const job = (await (await fetch(`${B}/jobs/${jobId}`)).json()) as { state: string };
      expect(job.state).toBe('active');
      times.sort((a, b) => a - b);
      expect(times[Math.ceil(times.length * 0.99) - 1]).toBeLessThan(50);

      p.child.kill('SIGTERM');
      await expectCleanExit(p);
      // the API stopped listening
      await expect(fetch(`http://127.0.0.1:${port}/healthz`)).rejects.toThrow();
    } finally {
      if (p.child.exitCode === null) p.child.kill('SIGKILL');
      rmSync(dataDir, { recursive: true, force: true });
    }
  });

  it('`npm run worker` with REDIS_URL starts, serves METRICS_PORT, and exits 0 on SIGTERM', async () => {
    const metricsPort = await freePort();
    const env = { REDIS_PREFIX: 'proc', METRICS_PORT: String(metricsPort), HOST: '127.0.0.1' };
    await withWorker(env, async (p) => {
      await waitFor(async () => p.out().includes('worker metrics at /metrics'), 60_000, 'worker start');
      const m = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
      expect(m).toContain('xt_job_duration_seconds');
      expect(m).toContain('xt_train_steps_total');
      p.child.kill('SIGTERM');
      await expectCleanExit(p);
      expect(p.out()).toContain('stopped');
      // standard output is a pipe here, not a terminal: one JSON object per line
      const lines = p.stdout().trim().split('\n');
      expect(lines.length).toBeGreaterThan(2);
      for (const line of lines) expect(JSON.parse(line)).toHaveProperty('level');
    });
  });

  it('a SIGTERM while a worker starts drains it: the signal is handled from its first log line on', async () => {
    await withWorker({ REDIS_PREFIX: 'proc-early' }, async (p) => {
      // the signal goes as soon as the line arrives: the backend is ready, the queues not consumed yet
      const signalled = new Promise<void>((resolve) => {
        const onData = () => {
          if (!p.stdout().includes('tensor backend ready')) return;
          p.child.stdout!.off('data', onData);
          p.child.kill('SIGTERM');
          resolve();
        };
        p.child.stdout!.on('data', onData);
      });
      await Promise.race([signalled, p.ended]);
      await expectCleanExit(p);
      expect(p.stdout()).toContain('draining');
    });
  });

  it('LOG_FORMAT=pretty writes one readable line per message instead of JSON', async () => {
    await withWorker({ LOG_FORMAT: 'pretty', REDIS_PREFIX: 'proc-pretty' }, async (p) => {
      await waitFor(async () => p.stdout().includes('worker consuming queues'), 60_000, 'worker start');
      p.child.kill('SIGTERM');
      await expectCleanExit(p);
      const line = p
        .stdout()
        .split('\n')
        .find((l) => l.includes('worker consuming queues'))!;
      expect(() => JSON.parse(line)).toThrow();
      expect(line).toMatch(/\d\d:\d\d:\d\d\.\d{3}.*INFO.*xt-worker.*worker consuming queues/);
    });
  });
});
