/**
 * `npm run bench:service`: the service under streaming load. Starts `npm start` (private Redis,
 * a fresh DATA_DIR), creates a model, then at 1, 8 and 32 concurrent clients streams completions
 * from /openai/v1/completions over SSE and reports time to first token, tokens/s per stream and in
 * all, and p50/p99 request latency. Before any level is timed, the levels take untimed turns (one
 * request per client each) for --warmup seconds (default 15; 0: one turn).
 * Options: --tokens N (per request, default 32), --rounds N (requests per client, default 2),
 * --concurrency 1,8,32, --repeat N (passes over the levels, which take turns; each level's figures
 * are over all its passes, and a line after the table gives each pass's tokens/s in all against the
 * one-stream pass of the same turn; default 1), --json, --while-training (a training job of a larger model
 * runs in the same worker throughout, started before the first request and cancelled after the
 * last), --dim N and --depth N (the model streamed from: a byte-level decoder with rotary positions,
 * default dim 256, depth 4), --cpu (Linux: a second table of the CPU time each process spent per
 * token at each level, and how many cores that kept busy: the API, the worker's decode thread, its
 * helper threads and its other threads, Redis, and this benchmark's own clients; and a third, from
 * the worker's /metrics on a port of its own, of its decode loop's steps: how many, their mean batch,
 * their compute and the time between them, and the share of their shared work its helper threads
 * computed). WORKER_CONCURRENCY, MAX_BATCH, WORKER_CPU, TOKEN_WRITE_STEPS and XT_BACKEND pass through
 * to the service.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { freePort } from '../service/redis-server.js';
import { nonNegativeNumber, option, positiveInt, positiveInts } from './args.js';
import {
  CPU_PARTS,
  cpuBetween,
  procCpuAvailable,
  snapshotCpu,
  type CpuPart,
  type CpuSnapshot,
} from './proc-cpu.js';

const ROOT = fileURLToPath(new URL('../', import.meta.url));

const tokens = positiveInt('tokens', option('tokens', '32'));
const rounds = positiveInt('rounds', option('rounds', '2'));
const repeat = positiveInt('repeat', option('repeat', '1'));
const dim = positiveInt('dim', option('dim', '256'));
const depth = positiveInt('depth', option('depth', '4'));
const warmup = nonNegativeNumber('warmup', option('warmup', '15'));
const levels = positiveInts('concurrency', '1,8,32');
const cpu = process.argv.includes('--cpu');
if (cpu && !procCpuAvailable())
  throw new Error(
    `--cpu: expected Linux's /proc to read processes' CPU time, but this is ${process.platform} without it`,
  );

/** The worker's decode loop counters (its /metrics), summed since it started. */
interface DecodeCounters {
  steps: number;
  rows: number;
  stepSeconds: number;
  between: number;
  betweenSeconds: number;
  helperChunks: number;
  callerChunks: number;
}

/** The worker's decode loop counters, read from its /metrics on `port`. */
async function decodeCounters(port: number): Promise<DecodeCounters> {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const value = (name: string) => {
    const m = new RegExp(`^${name.replace(/[{}]/g, '\\$&')} (\\S+)$`, 'm').exec(text);
    return m ? Number(m[1]) : 0;
  };
  return {
    steps: value('xt_decode_steps_total'),
    rows: value('xt_decode_rows_total'),
    stepSeconds: value('xt_decode_step_seconds_sum'),
    between: value('xt_decode_between_steps_seconds_count'),
    betweenSeconds: value('xt_decode_between_steps_seconds_sum'),
    helperChunks: value('xt_compute_shared_chunks_total{by="helper"}'),
    callerChunks: value('xt_compute_shared_chunks_total{by="caller"}'),
  };
}

interface Sample {
  ttftMs: number;
  latencyMs: number;
  tokens: number;
  streamTokensPerSecond: number;
}

// the clients' connections, kept open between requests as a load tool's are
const agent = new http.Agent({ keepAlive: true });

/**
 * One streamed completion: reads the SSE body as it arrives. Over node:http rather than fetch: the
 * load runs on the machine it measures, and fetch's web streams cost it about twice the CPU per
 * token.
 */
function streamOnce(base: string, model: string, prompt: string): Promise<Sample> {
  const t0 = performance.now();
  const body = JSON.stringify({
    model,
    prompt,
    max_tokens: tokens,
    temperature: 1,
    stream: true,
    stream_options: { include_usage: true },
  });
  return new Promise<Sample>((resolve, reject) => {
    const req = http.request(
      `${base}/openai/v1/completions`,
      {
        method: 'POST',
        agent,
        headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        res.setEncoding('utf8');
        if (res.statusCode !== 200) {
          let text = '';
          res.on('data', (d: string) => (text += d));
          res.on('end', () => reject(new Error(`HTTP ${res.statusCode}: ${text}`)));
          return;
        }
        let buf = '';
        let first = 0;
        let count = 0;
        let done = false;
        let failed: Error | null = null;
        res.on('data', (chunk: string) => {
          buf += chunk;
          let cut: number;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            if (!block.startsWith('data: ')) continue;
            const payload = block.slice(6);
            if (payload === '[DONE]') {
              done = true;
              continue;
            }
            const msg = JSON.parse(payload) as {
              error?: { message: string };
              choices: { text: string }[];
              usage?: { completion_tokens: number };
            };
            if (msg.error) failed ??= new Error(msg.error.message);
            if (!first && msg.choices.some((c) => c.text)) first = performance.now();
            if (msg.usage) count = msg.usage.completion_tokens;
          }
        });
        res.on('error', reject);
        res.on('end', () => {
          if (failed) return reject(failed);
          if (!done) return reject(new Error('stream ended without [DONE]'));
          const end = performance.now();
          resolve({
            ttftMs: (first || end) - t0,
            latencyMs: end - t0,
            tokens: count,
            // the stream's own rate, from its first token to its end (queueing shows in TTFT)
            streamTokensPerSecond: count / Math.max(1e-6, (end - (first || t0)) / 1000),
          });
        });
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!;
};

/**
 * Starts a training job of a larger model (dim 256, depth 4, batch 16 of 128 tokens) and waits for
 * its first step; `stop` cancels it and returns the steps it made.
 */
async function startTraining(base: string): Promise<{ stop(): Promise<number> }> {
  const json = async (url: string, init: RequestInit) => {
    const r = await fetch(`${base}${url}`, init);
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status} ${await r.text()}`);
    return (await r.json()) as Record<string, unknown>;
  };
  const post = (url: string, body: unknown) =>
    json(url, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
  const model = await post('/v1/models', {
    name: 'bench-train',
    config: {
      wrapper: 'TransformerWrapper',
      numTokens: 256,
      maxSeqLen: 128,
      attnLayers: { type: 'Decoder', dim: 256, depth: 4, heads: 4 },
    },
  });
  const dataset = await json('/v1/datasets?name=bench', {
    method: 'POST',
    headers: { 'content-type': 'text/plain' },
    body: 'the quick brown fox jumps over the lazy dog. '.repeat(2000),
  });
  const job = await post(`/v1/models/${model.id}/train`, {
    datasetId: dataset.id,
    steps: 100_000,
    batchSize: 16,
    seqLen: 128,
    checkpointEvery: 100_000,
  });
  const step = async () =>
    Number(((await json(`/v1/jobs/${job.jobId}`, {})).progress as { step?: number }).step ?? 0);
  const deadline = Date.now() + 120_000;
  while ((await step()) < 1) {
    if (Date.now() > deadline) throw new Error('the training job made no step in 120 s');
    await new Promise((r) => setTimeout(r, 200));
  }
  return {
    async stop() {
      const steps = await step();
      await fetch(`${base}/v1/jobs/${job.jobId}`, { method: 'DELETE' });
      return steps;
    },
  };
}

async function main() {
  const dataDir = mkdtempSync(path.join(os.tmpdir(), 'xt-bench-service-'));
  const port = await freePort();
  // --cpu: the worker's own /metrics, for its decode loop's counters
  const metricsPort = cpu ? await freePort() : null;
  const child = spawn(process.execPath, ['--import', 'tsx', 'service/start.ts'], {
    cwd: ROOT,
    env: {
      ...process.env,
      DATA_DIR: dataDir,
      PORT: String(port),
      HOST: '127.0.0.1',
      LOG_LEVEL: 'warn',
      ...(metricsPort ? { METRICS_PORT: String(metricsPort) } : {}),
    },
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  const base = `http://127.0.0.1:${port}`;
  try {
    const deadline = Date.now() + 120_000;
    for (;;) {
      if (child.exitCode !== null) throw new Error(`npm start exited with ${child.exitCode}`);
      const ok = await fetch(`${base}/readyz`).then(
        (r) => r.status === 200,
        () => false,
      );
      if (ok) break;
      if (Date.now() > deadline) throw new Error('the service did not become ready in 120 s');
      await new Promise((r) => setTimeout(r, 200));
    }
    const ready = (await (await fetch(`${base}/readyz`)).json()) as { backend: string };
    const created = await fetch(`${base}/v1/models`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({
        name: 'bench',
        config: {
          wrapper: 'TransformerWrapper',
          numTokens: 256,
          maxSeqLen: 128,
          attnLayers: { type: 'Decoder', dim, depth, heads: 4, rotaryPosEmb: true },
        },
      }),
    });
    const model = ((await created.json()) as { id: string }).id;
    await streamOnce(base, model, 'warm up '); // loads the model into the worker's cache
    const training = process.argv.includes('--while-training') ? await startTraining(base) : null;

    // each level's samples and wall time, summed over the passes: the levels take turns, so a slow
    // stretch of the machine falls on all of them rather than on one
    const acc = new Map(
      levels.map((c) => [
        c,
        {
          samples: [] as Sample[],
          wall: 0,
          // each pass's tokens/s in all, in pass order
          passes: [] as number[],
          // CPU seconds of each part of the service, and of this process (the clients), in the timed windows
          cpu: Object.fromEntries(CPU_PARTS.map((k) => [k, 0])) as Record<CpuPart, number | null>,
          clients: 0,
          // the worker's decode loop over the timed windows (--cpu)
          decode: {
            steps: 0,
            rows: 0,
            stepSeconds: 0,
            between: 0,
            betweenSeconds: 0,
            helperChunks: 0,
            callerChunks: 0,
          } as DecodeCounters,
        },
      ]),
    );
    // untimed turns over every level (one request per client each) before any level is timed, for
    // --warmup seconds (at least one turn): the decoding paths of each number of rows get compiled and
    // their buffers allocated. V8 keeps optimizing a process's hot code for 10 to 20 s of decoding, and
    // until then the first level timed would find the code least warmed up.
    const warmStart = performance.now();
    do {
      for (const c of levels)
        await Promise.all(
          Array.from({ length: c }, (_, i) => streamOnce(base, model, `client ${i} warms up `)),
        );
    } while (performance.now() - warmStart < warmup * 1000);
    for (let pass = 0; pass < repeat; pass++) {
      for (const c of levels) {
        const level = acc.get(c)!;
        const cpu0 = cpu ? snapshotCpu(child.pid!) : null;
        const decode0 = metricsPort ? await decodeCounters(metricsPort) : null;
        const own0 = process.cpuUsage();
        const t0 = performance.now();
        await Promise.all(
          Array.from({ length: c }, async (_, i) => {
            for (let r = 0; r < rounds; r++)
              level.samples.push(await streamOnce(base, model, `client ${i} says `));
          }),
        );
        const passWall = (performance.now() - t0) / 1000;
        level.wall += passWall;
        level.passes.push(level.samples.slice(-c * rounds).reduce((n, x) => n + x.tokens, 0) / passWall);
        if (decode0) {
          const decode1 = await decodeCounters(metricsPort!);
          for (const k of Object.keys(decode0) as (keyof DecodeCounters)[])
            level.decode[k] += decode1[k] - decode0[k];
        }
        if (cpu0) {
          const own = process.cpuUsage(own0);
          level.clients += (own.user + own.system) / 1e6;
          const used: CpuSnapshot = cpuBetween(cpu0, snapshotCpu(child.pid!));
          for (const k of CPU_PARTS) {
            const u = used[k];
            const sum = level.cpu[k];
            level.cpu[k] = u === null || sum === null ? null : sum + u;
          }
        }
      }
    }
    const rows = levels.map((c) => {
      const { samples, wall, cpu: used, clients, passes, decode } = acc.get(c)!;
      const total = samples.reduce((s, x) => s + x.tokens, 0);
      const of = (k: keyof Sample, p: number) =>
        pct(
          samples.map((x) => x[k]),
          p,
        );
      return {
        concurrency: c,
        requests: samples.length,
        ttftP50Ms: of('ttftMs', 50),
        ttftP99Ms: of('ttftMs', 99),
        streamTokensPerSecond: of('streamTokensPerSecond', 50),
        totalTokensPerSecond: total / wall,
        latencyP50Ms: of('latencyMs', 50),
        latencyP99Ms: of('latencyMs', 99),
        passTokensPerSecond: passes,
        // per part: CPU microseconds per token generated, and cores kept busy (CPU seconds per second)
        cpu: cpu
          ? Object.fromEntries(
              [...CPU_PARTS, 'clients' as const].map((k) => {
                const s = k === 'clients' ? clients : used[k];
                return [k, s === null ? null : { usPerToken: (s * 1e6) / total, cores: s / wall }];
              }),
            )
          : undefined,
        // the worker's decode loop (--cpu): steps, mean batch, ms of compute a step and between
        // steps, the share of the steps' shared chunks its helper threads computed
        decode: metricsPort
          ? {
              steps: decode.steps,
              rowsPerStep: decode.steps ? decode.rows / decode.steps : null,
              stepMs: decode.steps ? (1000 * decode.stepSeconds) / decode.steps : null,
              betweenMs: decode.between ? (1000 * decode.betweenSeconds) / decode.between : null,
              helperShare:
                decode.helperChunks + decode.callerChunks
                  ? decode.helperChunks / (decode.helperChunks + decode.callerChunks)
                  : null,
            }
          : undefined,
      };
    });
    const trainedSteps = training ? await training.stop() : null;
    if (process.argv.includes('--json')) {
      console.log(
        JSON.stringify(
          { backend: ready.backend, model: { dim, depth }, tokens, rounds, repeat, trainedSteps, rows },
          null,
          2,
        ),
      );
      return;
    }
    console.log(
      `backend ${ready.backend}, decoder dim ${dim} depth ${depth}, ${tokens} tokens per request, ${rounds} requests per client` +
        (repeat > 1 ? ` in each of ${repeat} passes over the levels` : '') +
        ', ' +
        `WORKER_CONCURRENCY=${process.env.WORKER_CONCURRENCY ?? 1}, MAX_BATCH=${process.env.MAX_BATCH ?? 32}, ` +
        `WORKER_CPU=${process.env.WORKER_CPU?.trim() || 'auto'}` +
        (training ? `, a training job ran throughout (${trainedSteps} steps)` : '') +
        '\n',
    );
    console.log(
      '| streams | requests | TTFT p50 / p99 (ms) | tokens/s per stream (p50) | tokens/s in all | latency p50 / p99 (ms) |',
    );
    console.log('| ---: | ---: | ---: | ---: | ---: | ---: |');
    const f = (x: number) => x.toFixed(x < 100 ? 1 : 0);
    // tokens/s in all against one stream's, when one stream was measured
    const one = rows.find((r) => r.concurrency === 1)?.totalTokensPerSecond;
    for (const r of rows) {
      const ratio = one && r.concurrency > 1 ? ` (${(r.totalTokensPerSecond / one).toFixed(1)}x)` : '';
      console.log(
        `| ${r.concurrency} | ${r.requests} | ${f(r.ttftP50Ms)} / ${f(r.ttftP99Ms)} | ${f(r.streamTokensPerSecond)} | ` +
          `${f(r.totalTokensPerSecond)}${ratio} | ${f(r.latencyP50Ms)} / ${f(r.latencyP99Ms)} |`,
      );
    }
    // each pass against the one-stream pass of the same turn: the machine's speed drifts between
    // turns, and a pair taken within one turn shares its stretch
    const onePasses = rows.find((r) => r.concurrency === 1)?.passTokensPerSecond;
    if (onePasses && repeat > 1) {
      const lines = rows
        .filter((r) => r.concurrency > 1)
        .map(
          (r) =>
            `${r.concurrency} streams ` +
            r.passTokensPerSecond.map((t, i) => `${(t / onePasses[i]!).toFixed(1)}x`).join(', '),
        );
      console.log(`\nagainst one stream, pass by pass: ${lines.join('; ')}`);
    }
    if (cpu) {
      console.log(
        '\nCPU per token generated, in microseconds, and the cores that kept busy (CPU seconds per second), ' +
          'over the timed windows\n',
      );
      console.log(
        '| streams | API | worker: decode thread | worker: helpers | worker: other threads | Redis | clients | in all |',
      );
      console.log('| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
      for (const r of rows) {
        const parts = [...CPU_PARTS, 'clients' as const].map((k) => r.cpu![k]);
        const cell = (p: { usPerToken: number; cores: number } | null) =>
          p ? `${p.usPerToken.toFixed(0)} (${p.cores.toFixed(2)})` : '-';
        const all = { usPerToken: 0, cores: 0 };
        for (const p of parts) {
          if (!p) continue;
          all.usPerToken += p.usPerToken;
          all.cores += p.cores;
        }
        console.log(`| ${r.concurrency} | ${parts.map(cell).join(' | ')} | ${cell(all)} |`);
      }
      console.log(
        "\nThe worker's decode loop over the timed windows (its /metrics): steps, their mean batch, the " +
          'compute of a step (prefills of joining generations included) and the time between steps, and ' +
          "the share of the steps' shared products and attention that its helper threads computed\n",
      );
      console.log('| streams | steps | rows a step | ms a step | ms between steps | by helpers |');
      console.log('| ---: | ---: | ---: | ---: | ---: | ---: |');
      const n = (x: number | null | undefined, digits: number) => (x == null ? '-' : x.toFixed(digits));
      for (const r of rows) {
        const d = r.decode!;
        const share = d.helperShare == null ? '-' : `${(100 * d.helperShare).toFixed(1)}%`;
        console.log(
          `| ${r.concurrency} | ${d.steps} | ${n(d.rowsPerStep, 2)} | ${n(d.stepMs, 3)} | ${n(d.betweenMs, 3)} | ${share} |`,
        );
      }
    }
  } finally {
    agent.destroy();
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
    rmSync(dataDir, { recursive: true, force: true });
  }
}

await main();
