import { Worker } from 'node:worker_threads';
import { DefinitionError, EngineUnavailableError } from './engine.js';

export interface BuildRequest {
  id: number;
  config: Record<string, unknown>;
  seed?: number;
}

export type BuildReply =
  | { id: number; ok: true; bytes: Uint8Array; parameters: number; numTokens: number; maxSeqLen: number }
  | { id: number; ok: false; kind: 'definition' | 'engine' | 'other'; message: string };

/** A model built off the caller's event loop: its initial weights (safetensors) and sizes. */
export type BuiltWeights = Omit<Extract<BuildReply, { ok: true }>, 'id' | 'ok'>;

// the thread runs TypeScript: tsx's loader is registered inside it before its module loads
const BOOT = `
const { workerData } = require('node:worker_threads');
import('tsx/esm/api').then((tsx) => { tsx.register(); return import(workerData.entry); });
`;

/**
 * Builds models from their definitions in a worker thread, so that weight initialisation (seconds
 * for a large model) never holds up the API's event loop. The thread computes on the pure-JavaScript
 * `cpu` backend: the torch addon's state is per process, and a second JavaScript environment calling
 * it beside the main one corrupts the main one's tensors. Requests
 * run one at a time in order; the thread starts on first use and ends with `close()`. Throws what
 * the build threw: DefinitionError (a bad definition, naming the field), EngineUnavailableError.
 */
export class ModelBuilder {
  private worker: Worker | null = null;
  private ready: Promise<void> | null = null;
  private next = 1;
  private pending = new Map<number, { resolve(r: BuiltWeights): void; reject(e: Error): void }>();

  private start(): Promise<void> {
    if (this.ready) return this.ready;
    const entry = new URL('./build-thread.ts', import.meta.url).href;
    const worker = new Worker(BOOT, {
      eval: true,
      workerData: { entry, backend: 'cpu' },
    });
    worker.unref();
    this.worker = worker;
    this.ready = new Promise((resolve, reject) => {
      worker.once('message', () => resolve());
      worker.once('error', reject);
    });
    worker.on('message', (r: BuildReply | { ready: true }) => {
      if (!('id' in r)) return;
      const p = this.pending.get(r.id);
      this.pending.delete(r.id);
      if (!p) return;
      if (r.ok) {
        const { id: _id, ok: _ok, ...built } = r;
        p.resolve(built);
      } else if (r.kind === 'definition') p.reject(new DefinitionError(r.message));
      else if (r.kind === 'engine') p.reject(new EngineUnavailableError(r.message));
      else p.reject(new Error(r.message));
    });
    const fail = (e: Error) => {
      for (const p of this.pending.values()) p.reject(e);
      this.pending.clear();
      this.worker = null;
      this.ready = null;
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`the model-building thread exited (code ${code})`)));
    return this.ready;
  }

  /** Builds `config` (seeded when `seed` is given) and returns its initial weights and sizes. */
  async build(config: Record<string, unknown>, seed?: number): Promise<BuiltWeights> {
    await this.start();
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker!.postMessage({ id, config, seed } satisfies BuildRequest);
    });
  }

  async close(): Promise<void> {
    const w = this.worker;
    this.worker = null;
    this.ready = null;
    if (w) await w.terminate();
  }
}
