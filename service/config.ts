import path from 'node:path';
import type { WorkerCpuSetting } from './cpus.js';

/** The service's settings, read from the environment once at start-up. */
export interface ServiceConfig {
  port: number;
  host: string;
  /** Redis to use; undefined: start a private redis-server child (embedded mode only). */
  redisUrl: string | undefined;
  /** Datasets, weights and checkpoints live under this folder (shared by API and workers). */
  dataDir: string;
  /** Tensor backend (`torch|tensorflow|wasm|cpu`); undefined: the first that loads. */
  backend: string | undefined;
  /** Training jobs a worker runs at once. */
  workerConcurrency: number;
  /** Generations a worker decodes together per loaded model (and generation jobs it takes at once). */
  maxBatch: number;
  /** Bearer keys that /v1 routes accept; empty: no authentication. */
  apiKeys: string[];
  /** Key prefix for the registry and the queues, so several deployments can share one Redis. */
  prefix: string;
  /** Loaded models a worker keeps in memory. */
  modelCacheSize: number;
  /** Longest (ms) a training step waits while generations run in the same worker. */
  trainMaxPauseMs: number;
  /** decoding steps whose tokens a worker writes to Redis at once (TOKEN_WRITE_STEPS) */
  tokenWriteSteps: number;
  /** BullMQ lock duration (ms): a worker silent this long is presumed dead and its job is resumed elsewhere. */
  lockDurationMs: number;
  /** How often (ms) workers look for stalled jobs. */
  stalledIntervalMs: number;
  logLevel: string;
  /** `pretty` or `json`; unset: pretty on a terminal, JSON otherwise. */
  logFormat?: 'pretty' | 'json';
  /** The redis-server binary `npm start` runs when REDIS_URL is unset (default: found on PATH). */
  redisServerBin: string | undefined;
  /** `npm run worker` serves its own /metrics on this port when set (the API serves them otherwise). */
  metricsPort: number | undefined;
  /**
   * `npm start` on Linux: the CPU that the API, the private Redis and the worker's background threads
   * keep off, for the worker's compute thread (`auto`: the last one, where there are two or more).
   */
  workerCpu: WorkerCpuSetting;
  limits: ServiceLimits;
}

/** Request limits; each breach is a 400 (or 413 for bodies) that names the limit. */
export interface ServiceLimits {
  maxParameters: number;
  maxSeqLen: number;
  maxBatchSize: number;
  maxSteps: number;
  maxTokens: number;
  /** Largest JSON request body, bytes. */
  maxBodyBytes: number;
  /** Largest dataset or weights upload, bytes. */
  maxUploadBytes: number;
}

export const defaultLimits: ServiceLimits = {
  maxParameters: 50_000_000,
  maxSeqLen: 4096,
  maxBatchSize: 256,
  maxSteps: 1_000_000,
  maxTokens: 4096,
  maxBodyBytes: 1024 * 1024,
  maxUploadBytes: 256 * 1024 * 1024,
};

const BACKEND_NAMES = ['torch', 'tensorflow', 'wasm', 'cpu'];
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

/** Thrown when the environment is invalid; the message lists every problem. */
export class ConfigError extends Error {}

/**
 * Reads and validates the configuration from `env`. Every invalid variable is reported at once,
 * each with what was expected and what came.
 */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): ServiceConfig {
  const problems: string[] = [];
  const int = (name: string, def: number, min: number, max = Number.MAX_SAFE_INTEGER): number => {
    const raw = env[name];
    if (raw === undefined || raw.trim() === '') return def;
    const v = Number(raw);
    if (!Number.isInteger(v) || v < min || v > max) {
      problems.push(`${name}: expected an integer in [${min}, ${max}], got "${raw}"`);
      return def;
    }
    return v;
  };
  const port = int('PORT', 3000, 0, 65535);
  const host = env.HOST?.trim() || '0.0.0.0';
  let redisUrl = env.REDIS_URL?.trim() || undefined;
  if (redisUrl !== undefined && !/^(rediss?:\/\/.+|unix:\/\/\/.+)$/.test(redisUrl)) {
    problems.push(
      `REDIS_URL: expected redis://host:port, rediss://… or unix:///path/to/redis.sock, got "${redisUrl}"`,
    );
    redisUrl = undefined;
  }
  const dataDir = path.resolve(env.DATA_DIR?.trim() || 'data');
  let backend = env.XT_BACKEND?.trim().toLowerCase() || undefined;
  if (backend !== undefined && !BACKEND_NAMES.includes(backend)) {
    problems.push(`XT_BACKEND: expected one of ${BACKEND_NAMES.join(', ')}, got "${env.XT_BACKEND}"`);
    backend = undefined;
  }
  const workerConcurrency = int('WORKER_CONCURRENCY', 1, 1, 64);
  const maxBatch = int('MAX_BATCH', 32, 1, 1024);
  const apiKeys = (env.API_KEYS ?? '')
    .split(',')
    .map((k) => k.trim())
    .filter((k) => k.length > 0);
  const prefix = env.REDIS_PREFIX?.trim() || 'xt';
  if (!/^[A-Za-z0-9_.-]+$/.test(prefix)) {
    problems.push(`REDIS_PREFIX: expected letters, digits, _ . -, got "${prefix}"`);
  }
  const modelCacheSize = int('MODEL_CACHE_SIZE', 4, 1, 1024);
  const trainMaxPauseMs = int('TRAIN_MAX_PAUSE_MS', 2000, 0);
  const tokenWriteSteps = int('TOKEN_WRITE_STEPS', 2, 1, 16);
  const lockDurationMs = int('LOCK_DURATION_MS', 30_000, 500);
  const stalledIntervalMs = int('STALLED_INTERVAL_MS', 15_000, 200);
  const logLevel = env.LOG_LEVEL?.trim() || 'info';
  if (!LOG_LEVELS.includes(logLevel)) {
    problems.push(`LOG_LEVEL: expected one of ${LOG_LEVELS.join(', ')}, got "${logLevel}"`);
  }
  const logFormat = env.LOG_FORMAT?.trim() || undefined;
  if (logFormat !== undefined && logFormat !== 'pretty' && logFormat !== 'json') {
    problems.push(`LOG_FORMAT: expected pretty or json, got "${logFormat}"`);
  }
  const metricsPort = env.METRICS_PORT?.trim() ? int('METRICS_PORT', 0, 1, 65535) : undefined;
  const cpuRaw = env.WORKER_CPU?.trim().toLowerCase() || 'auto';
  let workerCpu: WorkerCpuSetting = 'auto';
  if (cpuRaw === 'off' || cpuRaw === 'auto') workerCpu = cpuRaw;
  else if (/^\d+$/.test(cpuRaw) && Number(cpuRaw) < 4096) workerCpu = Number(cpuRaw);
  else problems.push(`WORKER_CPU: expected auto, off or a CPU number, got "${env.WORKER_CPU}"`);
  const limits: ServiceLimits = {
    maxParameters: int('MAX_PARAMETERS', defaultLimits.maxParameters, 1),
    maxSeqLen: int('MAX_SEQ_LEN', defaultLimits.maxSeqLen, 1),
    maxBatchSize: int('MAX_BATCH_SIZE', defaultLimits.maxBatchSize, 1),
    maxSteps: int('MAX_STEPS', defaultLimits.maxSteps, 1),
    maxTokens: int('MAX_TOKENS', defaultLimits.maxTokens, 1),
    maxBodyBytes: int('MAX_BODY_BYTES', defaultLimits.maxBodyBytes, 1024),
    maxUploadBytes: int('MAX_UPLOAD_BYTES', defaultLimits.maxUploadBytes, 1024),
  };
  if (problems.length) {
    throw new ConfigError(`invalid configuration:\n  ${problems.join('\n  ')}`);
  }
  return {
    port,
    host,
    redisUrl,
    dataDir,
    backend,
    workerConcurrency,
    maxBatch,
    apiKeys,
    prefix,
    modelCacheSize,
    trainMaxPauseMs,
    tokenWriteSteps,
    lockDurationMs,
    stalledIntervalMs,
    logLevel: logLevel,
    ...(logFormat ? { logFormat: logFormat as 'pretty' | 'json' } : {}),
    redisServerBin: env.REDIS_SERVER_BIN?.trim() || undefined,
    metricsPort,
    workerCpu,
    limits,
  };
}
