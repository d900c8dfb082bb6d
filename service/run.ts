import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import type { ServiceWorkers } from '../workers/index.js';
import { ConfigError, loadConfig, type ServiceConfig } from './config.js';
import { allowedCpus, formatCpuList, parseCpuList, planCpus, setAffinity } from './cpus.js';
import { createLogger, defaultLogFormat } from './logger.js';
import { REDIS_INSTALL_HINT, startRedisChild, type RedisChild } from './redis-server.js';

export type Role = 'all' | 'api' | 'worker';

/** Set by `npm start` for its worker: the CPUs the worker's main thread takes back (a CPU list). */
const WORKER_MAIN_CPUS = 'XT_WORKER_MAIN_CPUS';

function fail(message: string): never {
  process.stderr.write(`${message}\n`);
  process.exit(1);
}

/**
 * Runs the service: `all` (the API in this process and a worker in a child process, so training and
 * generation never hold up HTTP; starts a private redis-server under DATA_DIR/redis when REDIS_URL
 * is unset), `api` or `worker` (both need REDIS_URL). SIGTERM/SIGINT
 * drain: the API stops accepting, workers finish or checkpoint their current step, then exit.
 */
export async function run(role: Role): Promise<void> {
  let config: ServiceConfig;
  try {
    config = loadConfig();
  } catch (e) {
    if (e instanceof ConfigError) fail(e.message);
    throw e;
  }
  const log = createLogger({
    level: config.logLevel,
    name: `xt-${role}`,
    format: config.logFormat ?? defaultLogFormat(),
  });
  mkdirSync(config.dataDir, { recursive: true });

  // what a drain closes, as far as the start got
  let redisChild: RedisChild | null = null;
  let workers: ServiceWorkers | null = null;
  let workerChild: { stop(): Promise<void> } | null = null;
  let app: FastifyInstance | null = null;
  let metricsServer: http.Server | null = null;
  // the signal handlers come first: a SIGTERM at any point of the start (or right after the lines
  // that say the service is up) drains what has started, and never kills the process outright
  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'draining');
    const force = setTimeout(() => {
      log.error('drain took over 60 s; exiting');
      process.exit(1);
    }, 60_000);
    force.unref();
    try {
      if (app) await app.close();
      if (workerChild) await workerChild.stop();
      metricsServer?.close();
      if (workers) await workers.close();
      if (redisChild) await redisChild.stop();
    } catch (e) {
      log.error({ err: (e as Error).message }, 'error while draining');
    }
    log.info('stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));

  // npm start: this process (and so the Redis and the worker it starts) keeps off one CPU; the
  // worker's main thread takes every CPU back (see service/cpus.ts)
  let workerCpus: string | null = null;
  if (role === 'all') {
    let plan: ReturnType<typeof planCpus> = null;
    try {
      plan = planCpus(config.workerCpu, allowedCpus());
    } catch (e) {
      fail((e as Error).message);
    }
    if (plan) {
      const why = setAffinity(process.pid, plan.others, true);
      if (why) {
        // the threads it did set (if any) take every CPU back
        setAffinity(process.pid, plan.all, true);
        log.warn({ reason: why }, 'WORKER_CPU: could not keep a CPU for the worker; going on without');
      } else {
        workerCpus = formatCpuList(plan.all);
        log.info(
          { cpu: plan.reserved, others: formatCpuList(plan.others) },
          "the API and Redis keep off a CPU for the worker's compute thread (WORKER_CPU)",
        );
      }
    }
  }
  const mainCpus = process.env[WORKER_MAIN_CPUS]?.trim();
  if (role === 'worker' && mainCpus) {
    let why: string | null;
    try {
      why = setAffinity(process.pid, parseCpuList(mainCpus), false);
    } catch (e) {
      why = (e as Error).message;
    }
    if (why) log.warn({ reason: why }, `${WORKER_MAIN_CPUS}: the compute thread keeps this process's CPUs`);
  }

  let redisUrl = config.redisUrl;
  if (!redisUrl) {
    if (role !== 'all')
      fail(`REDIS_URL is required for \`npm run ${role}\` (e.g. REDIS_URL=redis://localhost:6379).`);
    try {
      redisChild = await startRedisChild({
        dir: path.join(config.dataDir, 'redis'),
        bin: config.redisServerBin,
      });
    } catch (e) {
      const msg = (e as Error).message;
      fail(msg === REDIS_INSTALL_HINT ? msg : `could not start redis-server: ${msg}\n${REDIS_INSTALL_HINT}`);
    }
    // the API, the worker and BullMQ reach it over its Unix socket where it has one
    redisUrl = redisChild.localUrl;
    log.info({ redisUrl }, 'started a private redis-server (data under DATA_DIR/redis)');
  }

  // the library and the app load after the configuration and Redis are known to be usable (fast failure)
  const { initBackend } = await import('../src/index.js');
  const { buildApp } = await import('../routes/app.js');
  const { engineStatus } = await import('../workers/engine.js');
  const { startWorkers } = await import('../workers/index.js');
  const { createMetrics } = await import('../workers/metrics.js');
  // a worker computes on the GPU when its LibTorch has CUDA and sees a device (XT_DEVICE=auto);
  // the API process, which only validates and builds models, stays on the CPU unless told
  if (role === 'worker' && !process.env.XT_DEVICE?.trim()) process.env.XT_DEVICE = 'auto';
  try {
    const info = await initBackend(config.backend, (m) => log.info(m));
    log.info({ backend: info.backend, device: info.device }, 'tensor backend ready');
  } catch (e) {
    fail(`tensor backend: ${(e as Error).message}`);
  }
  const eng = engineStatus();
  if (!eng.ready) log.warn({ reason: eng.reason }, 'engine not ready: /readyz answers 503');

  const metrics = createMetrics(true);
  if (role === 'all') workerChild = startWorkerProcess(redisUrl, log, workerCpus);
  if (role === 'worker') {
    workers = await startWorkers({
      redisUrl,
      dataDir: config.dataDir,
      prefix: config.prefix,
      concurrency: config.workerConcurrency,
      maxBatch: config.maxBatch,
      modelCacheSize: config.modelCacheSize,
      trainMaxPauseMs: config.trainMaxPauseMs,
      tokenWriteSteps: config.tokenWriteSteps,
      lockDurationMs: config.lockDurationMs,
      stalledIntervalMs: config.stalledIntervalMs,
      metrics,
      log: log.child({ part: 'worker' }),
    });
    log.info(
      { concurrency: config.workerConcurrency, maxBatch: config.maxBatch },
      'worker consuming queues train, generate',
    );
  }
  if (role !== 'worker') {
    app = await buildApp({
      redisUrl,
      dataDir: config.dataDir,
      prefix: config.prefix,
      apiKeys: config.apiKeys,
      limits: config.limits,
      metrics,
      loggerInstance: log.child({ part: 'api' }),
    });
    await app.listen({ port: config.port, host: config.host });
    if (config.apiKeys.length) log.info(`API keys required on /v1 (${config.apiKeys.length} configured)`);
  }

  if (role === 'worker' && config.metricsPort) {
    metricsServer = http.createServer((req, res) => {
      if (req.url !== '/metrics') {
        res.writeHead(404).end();
        return;
      }
      void metrics.registry.metrics().then((text) => {
        res.writeHead(200, { 'content-type': metrics.registry.contentType }).end(text);
      });
    });
    metricsServer.listen(config.metricsPort, config.host);
    log.info({ port: config.metricsPort }, 'worker metrics at /metrics');
  }
}

/**
 * Runs `npm run worker`'s entry as a child process on `redisUrl` (its logs go to this process's
 * output). A child that dies is started again after a second; `stop()` drains it with SIGTERM and
 * waits for it to exit. With `mainCpus`, the child's main thread moves to those CPUs as it starts.
 */
function startWorkerProcess(
  redisUrl: string,
  log: { info(o: object, m: string): void; error(o: object, m: string): void },
  mainCpus: string | null,
): { stop(): Promise<void> } {
  let child: ChildProcess | null = null;
  let stopping = false;
  const entry = new URL('./worker.ts', import.meta.url).pathname;
  const launch = () => {
    const c = spawn(process.execPath, ['--import', 'tsx', entry], {
      env: { ...process.env, REDIS_URL: redisUrl, ...(mainCpus ? { [WORKER_MAIN_CPUS]: mainCpus } : {}) },
      stdio: 'inherit',
    });
    child = c;
    log.info({ pid: c.pid }, 'worker process started');
    c.once('exit', (code, signal) => {
      if (child === c) child = null;
      if (stopping) return;
      log.error({ code, signal }, 'worker process exited; starting another in 1 s');
      setTimeout(() => {
        if (!stopping) launch();
      }, 1000);
    });
  };
  launch();
  return {
    async stop() {
      stopping = true;
      const c = child;
      if (!c || c.exitCode !== null) return;
      const exited = new Promise<void>((resolve) => c.once('exit', () => resolve()));
      c.kill('SIGTERM');
      await exited;
    },
  };
}
