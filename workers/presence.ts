import { hostname } from 'node:os';
import * as tf from '@tensorflow/tfjs-core';
import type { Redis } from 'ioredis';
import { backendInfo } from '../src/index.js';

/** A GPU as its worker reports it (the driver's figures; memory in use counts every process). */
export interface CudaDevice {
  name?: string;
  memoryUsedBytes?: number;
  memoryTotalBytes?: number;
}

/** What a running worker process says of itself, refreshed in Redis while it lives. */
export interface WorkerPresence {
  id: string;
  host: string;
  pid: number;
  backend: string | null;
  device: string | null;
  queues: string[];
  cuda?: CudaDevice;
  updatedAt: string;
}

/** The CUDA device of this process's tensor engine, or undefined when it computes elsewhere. */
export function localCuda(): CudaDevice | undefined {
  if (backendInfo()?.device !== 'cuda') return undefined;
  const b = tf.findBackend(backendInfo()!.backend) as unknown as {
    deviceInfo?: () => CudaDevice | null;
  } | null;
  const info = b?.deviceInfo?.();
  if (!info) return undefined;
  const { name, memoryUsedBytes, memoryTotalBytes } = info;
  return { name, memoryUsedBytes, memoryTotalBytes };
}

const keyPrefix = (prefix: string): string => `${prefix}:workers:`;

/**
 * Keeps this process's presence in Redis: written now, refreshed every `everyMs`, expiring after
 * three periods without a refresh (a worker that died leaves the list by itself); `stop()` removes it.
 */
export function startPresence(
  redis: Redis,
  prefix: string,
  queues: string[],
  everyMs = 10_000,
): { id: string; stop(): Promise<void>; refresh(): Promise<void> } {
  const id = `${hostname()}:${process.pid}`;
  const key = keyPrefix(prefix) + id;
  const refresh = async (): Promise<void> => {
    const info = backendInfo();
    const presence: WorkerPresence = {
      id,
      host: hostname(),
      pid: process.pid,
      backend: info?.backend ?? null,
      device: info?.device ?? null,
      queues,
      cuda: localCuda(),
      updatedAt: new Date().toISOString(),
    };
    await redis.set(key, JSON.stringify(presence), 'PX', 3 * everyMs);
  };
  const timer = setInterval(() => void refresh().catch(() => undefined), everyMs);
  timer.unref();
  void refresh().catch(() => undefined);
  return {
    id,
    refresh,
    async stop() {
      clearInterval(timer);
      await redis.del(key).catch(() => undefined);
    },
  };
}

/** The workers whose presence is current, by id. */
export async function listWorkers(redis: Redis, prefix: string): Promise<WorkerPresence[]> {
  const keys: string[] = [];
  let cursor = '0';
  do {
    const [next, found] = await redis.scan(cursor, 'MATCH', `${keyPrefix(prefix)}*`, 'COUNT', 200);
    cursor = next;
    keys.push(...found);
  } while (cursor !== '0');
  if (!keys.length) return [];
  const values = await redis.mget(...keys);
  const out: WorkerPresence[] = [];
  for (const v of values) {
    if (!v) continue;
    try {
      out.push(JSON.parse(v) as WorkerPresence);
    } catch {
      // a value another program wrote under our prefix: not a worker
    }
  }
  return out.sort((a, b) => a.id.localeCompare(b.id));
}
