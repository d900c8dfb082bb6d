import { Redis, type RedisOptions } from 'ioredis';
import type { TokenizerName } from '../models/schemas.js';

export const TRAIN_QUEUE = 'train';
export const GENERATE_QUEUE = 'generate';

/** What a `train` job carries (the model and dataset are read from the registry when it starts). */
export interface TrainJobData {
  jobId: string;
  modelId: string;
  datasetId: string;
  steps: number;
  batchSize: number;
  seqLen: number;
  learningRate: number;
  warmupSteps?: number;
  weightDecay?: number;
  gradClip?: number;
  gradAccumulation?: number;
  evalEvery?: number;
  checkpointEvery?: number;
  seed?: number;
  precision?: 'fp32' | 'bf16';
}

/** What a `generate` job carries. */
export interface GenerateJobData {
  jobId: string;
  modelId: string;
  tokenizer: TokenizerName;
  promptTokens: number[];
  maxTokens: number;
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  stop?: string[];
  seed?: number;
  cacheKv?: boolean;
  precision?: 'fp32' | 'bf16';
}

/**
 * An ioredis connection as BullMQ wants it (commands wait for reconnection instead of failing), to
 * redis://host:port, rediss://… or a Unix socket, unix:///path/to/redis.sock.
 */
export function createRedis(url: string, options: RedisOptions = {}): Redis {
  const base = { maxRetriesPerRequest: null, enableReadyCheck: true, ...options };
  const socket = unixSocketOf(url);
  return socket ? new Redis({ ...base, path: socket }) : new Redis(url, base);
}

/** The socket path of a unix:///path URL, or null for another URL. */
export function unixSocketOf(url: string): string | null {
  const m = /^unix:\/\/(\/.+)$/.exec(url);
  return m ? m[1]! : null;
}

/** Closes a connection: a clean QUIT when connected, an immediate disconnect otherwise. */
export async function closeRedis(conn: Redis): Promise<void> {
  if (conn.status === 'ready') {
    await Promise.race([conn.quit().catch(() => undefined), new Promise((r) => setTimeout(r, 2000))]);
  }
  conn.disconnect();
}

/** Resolves `p`, or gives up after `ms` (for shutdown steps that must not hang). */
export async function within(p: Promise<unknown>, ms: number): Promise<void> {
  let t: NodeJS.Timeout | undefined;
  await Promise.race([p.catch(() => undefined), new Promise((r) => (t = setTimeout(r, ms)))]);
  clearTimeout(t);
}
