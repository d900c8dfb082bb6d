import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import os from 'node:os';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { inject } from 'vitest';
import type { FastifyInstance } from 'fastify';
import type { Registry } from '../../models/registry.js';
import { buildApp, type AppOptions } from '../../routes/app.js';
import { startWorkers, type ServiceWorkers, type WorkerOptions } from '../../workers/index.js';

/** The private Redis the global setup started (or REDIS_URL when given). */
export function redisUrl(): string {
  return process.env.REDIS_URL ?? inject('redisUrl');
}

export interface TestEnv {
  app: FastifyInstance;
  dataDir: string;
  prefix: string;
  workers: ServiceWorkers | null;
  startWorkers(extra?: Partial<WorkerOptions>): Promise<ServiceWorkers>;
  /** Workers started in this process so far. */
  workersStarted(): ServiceWorkers[];
  close(): Promise<void>;
}

/** An app on the real Redis with its own key prefix and data folder; optionally an in-process worker. */
export async function makeEnv(
  opts: { app?: Partial<AppOptions>; workers?: boolean | Partial<WorkerOptions> } = {},
): Promise<TestEnv> {
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'xt-svc-'));
  const prefix = `t${randomUUID().slice(0, 8)}`;
  const url = redisUrl();
  const app = await buildApp({ redisUrl: url, dataDir, prefix, ...opts.app });
  await app.ready();
  const started: ServiceWorkers[] = [];
  const env: TestEnv = {
    app,
    dataDir,
    prefix,
    workers: null,
    async startWorkers(extra = {}) {
      const w = await startWorkers({ redisUrl: url, dataDir, prefix, ...extra });
      started.push(w);
      return w;
    },
    workersStarted: () => [...started],
    async close() {
      for (const w of started) await w.close();
      await app.close();
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
  if (opts.workers) env.workers = await env.startWorkers(opts.workers === true ? {} : opts.workers);
  return env;
}

/** A tiny decoder definition (byte tokenizer: 256 tokens). */
export function tinyDecoder(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    wrapper: 'TransformerWrapper',
    numTokens: 256,
    maxSeqLen: 64,
    attnLayers: { type: 'Decoder', dim: 32, depth: 1, heads: 2, ...((overrides.attnLayers as object) ?? {}) },
    ...Object.fromEntries(Object.entries(overrides).filter(([k]) => k !== 'attnLayers')),
  };
}

/** One parsed server-sent event. */
export interface SseEvent {
  id?: string;
  event: string;
  data: Record<string, unknown>;
}

/** Parses an SSE body into events (comments skipped). */
export function parseSse(body: string): SseEvent[] {
  const out: SseEvent[] = [];
  for (const block of body.split('\n\n')) {
    const ev: { id?: string; event?: string; data?: string } = {};
    for (const line of block.split('\n')) {
      if (!line || line.startsWith(':')) continue;
      const i = line.indexOf(':');
      const k = line.slice(0, i);
      const v = line.slice(i + 1).replace(/^ /, '');
      if (k === 'id') ev.id = v;
      else if (k === 'event') ev.event = v;
      else if (k === 'data') ev.data = (ev.data ? ev.data + '\n' : '') + v;
    }
    if (ev.event || ev.data)
      out.push({ id: ev.id, event: ev.event ?? 'message', data: JSON.parse(ev.data ?? '{}') });
  }
  return out;
}

/**
 * Reads an SSE response incrementally from a listening server; calls `onEvent` for each event and
 * stops when it returns true (aborting the request) or the stream ends.
 */
export async function readSse(
  url: string,
  init: RequestInit,
  onEvent: (ev: SseEvent, all: SseEvent[]) => boolean | void,
): Promise<SseEvent[]> {
  const ac = new AbortController();
  const res = await fetch(url, { ...init, signal: ac.signal });
  if (!res.ok || !res.body) throw new Error(`SSE ${url}: HTTP ${res.status} ${await res.text()}`);
  const all: SseEvent[] = [];
  const decoder = new TextDecoder();
  let buf = '';
  const reader = res.body.getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut: number;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, cut + 2);
        buf = buf.slice(cut + 2);
        for (const ev of parseSse(block)) {
          all.push(ev);
          if (onEvent(ev, all)) {
            ac.abort();
            return all;
          }
        }
      }
    }
  } catch (e) {
    if (!ac.signal.aborted) throw e;
  }
  return all;
}

export async function waitFor<T>(
  fn: () => Promise<T | undefined | null | false>,
  timeoutMs = 60_000,
  what = 'condition',
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Waits until neither queue has a waiting or active job: every processor has returned, so an
 * in-process worker has disposed what its jobs allocated (a job's recorded state can turn final a
 * moment before its processor returns).
 */
export async function queuesIdle(app: FastifyInstance, timeoutMs = 60_000): Promise<void> {
  const { trainQueue, generateQueue } = app.svc;
  await waitFor(
    async () => {
      for (const q of [trainQueue, generateQueue]) {
        const c = await q.getJobCounts('active', 'waiting', 'delayed', 'prioritized');
        if (Object.values(c).some((n) => n > 0)) return false;
      }
      return true;
    },
    timeoutMs,
    'idle queues',
  );
}

/** Creates a tiny decoder named `name` and a text dataset through the API; returns their ids. */
export async function createModelAndDataset(
  env: TestEnv,
  name: string,
  text: string,
  datasetQuery = '',
): Promise<{ modelId: string; datasetId: string }> {
  const model = await env.app.inject({
    method: 'POST',
    url: '/v1/models',
    payload: { name, config: tinyDecoder() },
  });
  const dataset = await env.app.inject({
    method: 'POST',
    url: `/v1/datasets${datasetQuery}`,
    headers: { 'content-type': 'text/plain' },
    payload: text,
  });
  return { modelId: model.json().id, datasetId: dataset.json().id };
}

/** A service entrypoint running as a child process. */
export interface ServiceProcess {
  child: ChildProcess;
  /** its exit code */
  exited: Promise<number | null>;
  /** its exit code and the signal that ended it */
  ended: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** stdout and stderr so far */
  out(): string;
  stdout(): string;
}

/**
 * Runs `node --import tsx service/<name>.ts` (one node process, so signals reach it) in a plain
 * environment: none of the test runner's variables (VITEST changes module loading) and no REDIS_URL
 * unless `env` gives one; the cpu backend and warn-level logs unless `env` says otherwise.
 */
export function runServiceEntry(
  name: 'api' | 'worker' | 'start',
  env: Record<string, string>,
): ServiceProcess {
  const base = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith('VITEST') && k !== 'REDIS_URL'),
  );
  const child = spawn(process.execPath, ['--import', 'tsx', `service/${name}.ts`], {
    cwd: fileURLToPath(new URL('../../', import.meta.url)),
    env: { ...base, XT_BACKEND: 'cpu', LOG_LEVEL: 'warn', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let stdout = '';
  child.stdout!.on('data', (d: Buffer) => {
    out += d.toString();
    stdout += d.toString();
  });
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const ended = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => resolve({ code, signal })),
  );
  return { child, ended, exited: ended.then((e) => e.code), out: () => out, stdout: () => stdout };
}

/**
 * Records the script commands a registry sends (by digest: EVALSHA) until `restore()`, so that a test
 * can send one again as Redis's client does after reconnecting (`again(i)`, the reply of a resend).
 */
export function captureScripts(registry: Registry): {
  sent: unknown[][];
  again(i: number): Promise<unknown>;
  restore(): void;
} {
  const redis = registry.redis as unknown as { evalsha: (...a: unknown[]) => Promise<unknown> };
  const evalsha = redis.evalsha.bind(redis);
  const sent: unknown[][] = [];
  redis.evalsha = (...a: unknown[]) => {
    sent.push(a);
    return evalsha(...a);
  };
  return {
    sent,
    again: (i) => evalsha(...sent[i]!),
    restore: () => {
      redis.evalsha = evalsha;
    },
  };
}
