import type { TestProject } from 'vitest/node';
import { startRedisChild, type RedisChild } from '../../service/redis-server.js';

declare module 'vitest' {
  export interface ProvidedContext {
    redisUrl: string;
  }
}

let child: RedisChild | null = null;

/**
 * Starts a private, non-persistent redis-server for the service tests unless REDIS_URL is set; the
 * tests reach it as `npm start`'s processes do (its Unix socket, where it has one).
 */
export async function setup(project: TestProject): Promise<void> {
  let url = process.env.REDIS_URL;
  if (!url) {
    child = await startRedisChild();
    url = child.localUrl;
    process.env.REDIS_URL = url;
  }
  project.provide('redisUrl', url);
}

export async function teardown(): Promise<void> {
  if (child) await child.stop();
  child = null;
}
