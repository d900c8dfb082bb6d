import * as tf from '@tensorflow/tfjs-core';
import client from 'prom-client';
import { loadAddon } from '../src/backend/torch/native.js';
import { localCuda, type WorkerPresence } from './presence.js';

/**
 * The torch engine's helper threads and the work of batched decoding steps they shared (see
 * XT_HELPER_THREADS), or null where this process computes on another backend.
 */
function computeHelpers(): ReturnType<ReturnType<typeof loadAddon>['helpers']> | null {
  return tf.getBackend() === 'torch' ? loadAddon().helpers() : null;
}

/** The service's Prometheus metrics, on one registry (served at GET /metrics). */
export interface ServiceMetrics {
  registry: client.Registry;
  httpDuration: client.Histogram<'method' | 'route' | 'status_code'>;
  queueDepth: client.Gauge<'queue' | 'state'>;
  jobDuration: client.Histogram<'type' | 'state'>;
  trainSteps: client.Counter<string>;
  generatedTokens: client.Counter<string>;
  generateTokensPerSecond: client.Histogram<string>;
  /** The API: from a generation request's arrival to its first token read back (each choice of it). */
  generateTimeToFirstToken: client.Histogram<string>;
  /** A worker: from a generation's job being queued to a worker taking it. */
  generateQueueWait: client.Histogram<string>;
  /** The decode loops' steps (see GenerationBatcher): how many, how full, and where their time goes. */
  decode: DecodeMetrics;
  /** Sets the worker gauges from the workers' presence in Redis (the API's /metrics). */
  setWorkers(workers: WorkerPresence[]): void;
}

/** What the decode loops of a worker record, one step at a time. */
export interface DecodeMetrics {
  steps: client.Counter<string>;
  rows: client.Counter<string>;
  prefills: client.Counter<string>;
  stepSeconds: client.Histogram<string>;
  betweenSeconds: client.Histogram<string>;
}

/** One decode loop step as a batcher reports it (see GenerationBatcher's `onStep`). */
export interface DecodeStep {
  /**
   * tokens the step gave: one for each generation in the batch, and the first token of each one that
   * joined (prefilled just before the step, which it then takes part in: a second token)
   */
  rows: number;
  /** of them, the first tokens of those that joined: their prompts were prefilled with the step */
  prefills: number;
  /** the step's compute, prefills included */
  seconds: number;
  /** the loop's time between the previous step and this one (null for a loop's first step) */
  betweenSeconds: number | null;
}

/** Records a decode step in `m`. */
export function recordDecodeStep(m: DecodeMetrics, s: DecodeStep): void {
  m.steps.inc();
  m.rows.inc(s.rows);
  if (s.prefills) m.prefills.inc(s.prefills);
  m.stepSeconds.observe(s.seconds);
  if (s.betweenSeconds !== null) m.betweenSeconds.observe(s.betweenSeconds);
}

/** A function that records, on its first call only, the milliseconds `elapsedMs` gives then in `h` (as seconds). */
export function observeOnce(h: client.Histogram<string>, elapsedMs: () => number): () => void {
  let done = false;
  return () => {
    if (done) return;
    done = true;
    h.observe(elapsedMs() / 1000);
  };
}

// milliseconds to a tenth of a second: a step of one row of a small model to one of a large batch
const STEP_BUCKETS = [0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128];

// a few milliseconds (a generation joining a running batch) to seconds (queued behind full batches)
const TTFT_BUCKETS = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/** Creates the metrics on a fresh registry (one per process, or per app in tests). */
export function createMetrics(defaultMetrics = false): ServiceMetrics {
  const registry = new client.Registry();
  if (defaultMetrics) client.collectDefaultMetrics({ register: registry, prefix: 'xt_' });
  const workers = new client.Gauge({
    name: 'xt_workers',
    help: 'Live worker processes, by tensor backend and device',
    labelNames: ['backend', 'device'],
    registers: [registry],
  });
  const workerGpuUsed = new client.Gauge({
    name: 'xt_worker_cuda_memory_used_bytes',
    help: "Memory in use on a worker's CUDA device (every process on it)",
    labelNames: ['worker', 'device_name'],
    registers: [registry],
  });
  const workerGpuTotal = new client.Gauge({
    name: 'xt_worker_cuda_memory_total_bytes',
    help: "Memory of a worker's CUDA device",
    labelNames: ['worker', 'device_name'],
    registers: [registry],
  });
  // this process's own device, read when scraped
  new client.Gauge({
    name: 'xt_cuda_memory_used_bytes',
    help: "Memory in use on this process's CUDA device (every process on it)",
    labelNames: ['device_name'],
    registers: [registry],
    collect() {
      this.reset();
      const cuda = localCuda();
      if (cuda?.memoryUsedBytes !== undefined)
        this.set({ device_name: cuda.name ?? 'cuda' }, cuda.memoryUsedBytes);
    },
  });
  // the torch engine's helper threads, read when scraped: a batched step's products and attention
  // are split in chunks that the decoding thread and the helpers take as they come; where the
  // helpers get little CPU (other processes on their cores), the decoding thread computes most
  new client.Gauge({
    name: 'xt_compute_helper_threads',
    help: "Helper threads of this process's torch engine (XT_HELPER_THREADS)",
    registers: [registry],
    collect() {
      this.reset();
      const h = computeHelpers();
      if (h) this.set(h.threads);
    },
  });
  new client.Counter({
    name: 'xt_compute_shared_chunks_total',
    help: "Chunks of batched decoding steps' shared products and attention, by the thread that computed them: the decoding thread (caller) or a helper",
    labelNames: ['by'],
    registers: [registry],
    collect() {
      this.reset();
      const h = computeHelpers();
      if (!h) return;
      this.inc({ by: 'caller' }, h.chunks - h.helperChunks);
      this.inc({ by: 'helper' }, h.helperChunks);
    },
  });
  new client.Counter({
    name: 'xt_compute_shared_chunks_taken_back_total',
    help: 'Of the chunks computed by the decoding thread, those a helper had taken and not finished in time',
    registers: [registry],
    collect() {
      this.reset();
      const h = computeHelpers();
      if (h) this.inc(h.takenBack);
    },
  });
  return {
    setWorkers(list: WorkerPresence[]) {
      workers.reset();
      workerGpuUsed.reset();
      workerGpuTotal.reset();
      const counts = new Map<string, { backend: string; device: string; n: number }>();
      for (const w of list) {
        const backend = w.backend ?? 'none';
        const device = w.device ?? 'none';
        const k = `${backend}\u0000${device}`;
        const c = counts.get(k) ?? { backend, device, n: 0 };
        c.n++;
        counts.set(k, c);
        const labels = { worker: w.id, device_name: w.cuda?.name ?? 'cuda' };
        if (w.cuda?.memoryUsedBytes !== undefined) workerGpuUsed.set(labels, w.cuda.memoryUsedBytes);
        if (w.cuda?.memoryTotalBytes !== undefined) workerGpuTotal.set(labels, w.cuda.memoryTotalBytes);
      }
      for (const c of counts.values()) workers.set({ backend: c.backend, device: c.device }, c.n);
    },
    registry,
    httpDuration: new client.Histogram({
      name: 'xt_http_request_duration_seconds',
      help: 'HTTP request latency',
      labelNames: ['method', 'route', 'status_code'],
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
      registers: [registry],
    }),
    queueDepth: new client.Gauge({
      name: 'xt_queue_jobs',
      help: 'Jobs per queue and state',
      labelNames: ['queue', 'state'],
      registers: [registry],
    }),
    jobDuration: new client.Histogram({
      name: 'xt_job_duration_seconds',
      help: 'Time a worker spent on a job, by type and outcome',
      labelNames: ['type', 'state'],
      buckets: [0.1, 0.5, 1, 5, 15, 60, 300, 1800, 7200],
      registers: [registry],
    }),
    trainSteps: new client.Counter({
      name: 'xt_train_steps_total',
      help: 'Training steps run by this process',
      registers: [registry],
    }),
    generatedTokens: new client.Counter({
      name: 'xt_generated_tokens_total',
      help: 'Tokens generated (as streamed to clients)',
      registers: [registry],
    }),
    generateTokensPerSecond: new client.Histogram({
      name: 'xt_generate_tokens_per_second',
      help: 'Generation speed per request, tokens per second',
      buckets: [1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000],
      registers: [registry],
    }),
    generateTimeToFirstToken: new client.Histogram({
      name: 'xt_generate_time_to_first_token_seconds',
      help: "From a generation request reaching the API to its first token reaching the API (the queue, a worker's pickup, the prompt's prefill), per generation",
      buckets: TTFT_BUCKETS,
      registers: [registry],
    }),
    generateQueueWait: new client.Histogram({
      name: 'xt_generate_queue_wait_seconds',
      help: 'From a generation job being queued (by the API) to this worker taking it',
      buckets: TTFT_BUCKETS,
      registers: [registry],
    }),
    decode: {
      steps: new client.Counter({
        name: 'xt_decode_steps_total',
        help: 'Decoding steps run by the batched decode loops of this process',
        registers: [registry],
      }),
      rows: new client.Counter({
        name: 'xt_decode_rows_total',
        help: 'Generations advanced by those steps, summed over the steps (over xt_decode_steps_total: the mean batch)',
        registers: [registry],
      }),
      prefills: new client.Counter({
        name: 'xt_decode_prefills_total',
        help: 'Prompts prefilled in those steps (generations that joined a batch)',
        registers: [registry],
      }),
      stepSeconds: new client.Histogram({
        name: 'xt_decode_step_seconds',
        help: 'Compute time of a decoding step, the prefills of generations joining it included',
        buckets: STEP_BUCKETS,
        registers: [registry],
      }),
      betweenSeconds: new client.Histogram({
        name: 'xt_decode_between_steps_seconds',
        help: "A decode loop's time between two steps: its tokens' event writes and the event loop's other work",
        buckets: STEP_BUCKETS,
        registers: [registry],
      }),
    },
  };
}
