/**
 * The thread that builds models for the API (see build-pool.ts): initialises its tensor backend
 * (`cpu`), then answers each {id, config} with the built model's initial weights as safetensors
 * bytes, its parameter count and sizes, or the error the build threw (its kind kept).
 */
import { parentPort, workerData } from 'node:worker_threads';
import { initBackend } from '../src/index.js';
import { buildModel, DefinitionError, EngineUnavailableError, weightsToBytes } from './engine.js';
import type { BuildReply, BuildRequest } from './build-pool.js';

const port = parentPort!;
await initBackend((workerData as { backend?: string }).backend, () => undefined);

port.on('message', (req: BuildRequest) => {
  let reply: BuildReply;
  try {
    const built = buildModel(req.config, req.seed);
    try {
      const bytes = weightsToBytes(built.model);
      reply = {
        id: req.id,
        ok: true,
        bytes,
        parameters: built.model.numParameters(),
        numTokens: built.numTokens,
        maxSeqLen: built.maxSeqLen,
      };
    } finally {
      built.model.dispose();
    }
  } catch (e) {
    const kind =
      e instanceof DefinitionError ? 'definition' : e instanceof EngineUnavailableError ? 'engine' : 'other';
    reply = { id: req.id, ok: false, kind, message: (e as Error).message };
  }
  port.postMessage(reply, reply.ok ? [reply.bytes.buffer as ArrayBuffer] : []);
});
port.postMessage({ ready: true });
