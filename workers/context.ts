import type { Registry } from '../models/registry.js';
import type { Storage } from '../models/storage.js';
import type { ServiceMetrics } from './metrics.js';
import type { ModelCache } from './model-cache.js';

/** Minimal logger (pino's shape). */
export interface Logger {
  info(obj: object | string, msg?: string): void;
  warn(obj: object | string, msg?: string): void;
  error(obj: object | string, msg?: string): void;
}

/** What the processors share inside one worker process. */
export interface WorkerContext {
  registry: Registry;
  storage: Storage;
  cache: ModelCache;
  metrics?: ServiceMetrics;
  log: Logger;
  /** Abort controllers of the jobs running here, by job id (cancel requests abort them). */
  running: Map<string, AbortController>;
  /** Set when the process is shutting down: training checkpoints and hands its job back. */
  draining: boolean;
}

/** Yields to the event loop so timers (lock renewal, heartbeats) and I/O run between steps. */
export function yieldToLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
