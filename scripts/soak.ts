/**
 * Soak: one service process (the API and a worker, as `npm start` runs them, on a private Redis)
 * trains a tiny model for 2,000 steps and answers 1,000 generation requests, and reports how its
 * resident memory moves. The first tenth of each (200 steps, 100 generations) is warm-up; the
 * baseline is taken after it, and the run fails when the resident size at the end is 10% or more
 * above that baseline, or when tensors are left behind.
 *
 *   npm run soak -- [--steps 2000] [--generations 1000] [--max-growth 0.10] [--backend torch|wasm|cpu]
 */
import * as tf from '@tensorflow/tfjs-core';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { initBackend } from '../src/backend/index.js';
import { buildApp } from '../routes/app.js';
import { startRedisChild } from '../service/redis-server.js';
import { startWorkers } from '../workers/index.js';

function flag(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && process.argv[i + 1] !== undefined ? process.argv[i + 1]! : def;
}
const STEPS = Number(flag('steps', '2000'));
const GENERATIONS = Number(flag('generations', '1000'));
const MAX_GROWTH = Number(flag('max-growth', '0.10'));
const WARM = 0.1;

setFlagsFromString('--expose-gc');
const gc = runInNewContext('gc') as () => void;
const MiB = 1024 * 1024;
const mib = (n: number) => `${(n / MiB).toFixed(1)} MiB`;

/** Resident size after a full collection (what a leak would leave behind). */
function rss(): number {
  gc();
  gc();
  return process.memoryUsage().rss;
}

async function main(): Promise<void> {
  const info = await initBackend(flag('backend', process.env.XT_BACKEND ?? '') || undefined, () => {});
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'xt-soak-'));
  const redis = await startRedisChild();
  const app = await buildApp({ redisUrl: redis.url, dataDir });
  const workers = await startWorkers({ redisUrl: redis.url, dataDir });
  const samples: { at: string; rss: number }[] = [];
  let peak = 0;
  const sample = (at: string) => {
    const r = process.memoryUsage().rss;
    peak = Math.max(peak, r);
    samples.push({ at, rss: r });
  };
  try {
    const model = await app.inject({
      method: 'POST',
      url: '/v1/models',
      payload: {
        name: 'soak',
        config: {
          wrapper: 'TransformerWrapper',
          numTokens: 256,
          maxSeqLen: 64,
          attnLayers: { type: 'Decoder', dim: 32, depth: 2, heads: 2, rotaryPosEmb: true },
        },
      },
    });
    const modelId = model.json().id as string;
    const data = await app.inject({
      method: 'POST',
      url: '/v1/datasets',
      headers: { 'content-type': 'text/plain' },
      payload: 'the quick brown fox jumps over the lazy dog. '.repeat(500),
    });
    const datasetId = data.json().id as string;

    const train = async (steps: number, offset: number): Promise<void> => {
      const r = await app.inject({
        method: 'POST',
        url: `/v1/models/${modelId}/train`,
        payload: { datasetId, steps, batchSize: 4, seqLen: 32, learningRate: 3e-3, checkpointEvery: 100 },
      });
      const jobId = r.json().jobId as string;
      let last = 0;
      for (;;) {
        const job = (await app.inject({ method: 'GET', url: `/v1/jobs/${jobId}` })).json();
        if (job.state === 'failed' || job.state === 'cancelled')
          throw new Error(`training ${job.state}: ${job.error}`);
        const step = Number(job.progress.step ?? 0);
        if (step >= last + 100) {
          last = step;
          sample(`train step ${offset + step}`);
        }
        if (job.state === 'completed') return;
        await new Promise((res) => setTimeout(res, 20));
      }
    };
    const generate = async (n: number, offset: number): Promise<void> => {
      for (let i = 0; i < n; i++) {
        const r = await app.inject({
          method: 'POST',
          url: `/v1/models/${modelId}/generate`,
          payload: { prompt: 'the quick ', maxTokens: 16, topK: 8, seed: offset + i },
        });
        if (r.statusCode !== 200) throw new Error(`generation ${offset + i}: ${r.statusCode} ${r.body}`);
        if ((offset + i + 1) % 100 === 0) sample(`generation ${offset + i + 1}`);
      }
    };
    const queuesIdle = async () => {
      for (;;) {
        let busy = 0;
        for (const q of [app.svc.trainQueue, app.svc.generateQueue])
          busy += Object.values(await q.getJobCounts('active', 'waiting')).reduce((a, b) => a + b, 0);
        if (!busy) return;
        await new Promise((res) => setTimeout(res, 20));
      }
    };

    const t0 = Date.now();
    const startRss = rss();
    const warmSteps = Math.round(STEPS * WARM);
    const warmGens = Math.round(GENERATIONS * WARM);
    await train(warmSteps, 0);
    await generate(warmGens, 0);
    await queuesIdle();
    const baseline = rss();
    const tensors = tf.memory().numTensors;
    await train(STEPS - warmSteps, warmSteps);
    await generate(GENERATIONS - warmGens, warmGens);
    await queuesIdle();
    const end = rss();
    const growth = (end - baseline) / baseline;
    const leftTensors = tf.memory().numTensors - tensors;
    const seconds = (Date.now() - t0) / 1000;
    console.log(
      `soak (${info.backend}): ${STEPS} training steps and ${GENERATIONS} generations in ${seconds.toFixed(0)} s; ` +
        `RSS at start ${mib(startRss)}, after warm-up (${warmSteps} steps, ${warmGens} generations) ${mib(baseline)}, ` +
        `peak ${mib(peak)}, at the end ${mib(end)}: ${(growth * 100).toFixed(1)}% growth after warm-up ` +
        `(limit ${(MAX_GROWTH * 100).toFixed(0)}%); tensors left behind: ${leftTensors}`,
    );
    for (const s of samples) console.log(`  ${s.at.padEnd(18)} ${mib(s.rss)}`);
    if (growth >= MAX_GROWTH || leftTensors !== 0) {
      console.error('soak: FAILED');
      process.exitCode = 1;
    }
  } finally {
    await workers.close();
    await app.close();
    await redis.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
