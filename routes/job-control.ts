import { randomUUID } from 'node:crypto';
import type { ModelRecord } from '../models/schemas.js';
import type { GenerateJobData } from '../workers/queues.js';
import type { ServiceContext } from './context.js';

/** What a generation asks for, besides the model (the prompt is already token ids). */
export type GenerationRequest = Omit<GenerateJobData, 'jobId' | 'modelId' | 'tokenizer'>;

/** Queues a generation of `model` as a `generate` job; returns its job id. */
export async function submitGeneration(
  svc: ServiceContext,
  model: ModelRecord,
  request: GenerationRequest,
): Promise<string> {
  const jobId = randomUUID();
  const data: GenerateJobData = { jobId, modelId: model.id, tokenizer: model.tokenizer, ...request };
  await svc.registry.createJob({ id: jobId, type: 'generate', modelId: model.id });
  await svc.generateQueue.add('generate', data, {
    jobId,
    attempts: 1,
    removeOnComplete: 100,
    removeOnFail: 100,
  });
  return jobId;
}

/**
 * Cancels a job from the API side: asks its worker to stop (a running job stops within one step or
 * token and writes its own `cancelled` event); a job no worker has taken yet is taken off its queue
 * and marked cancelled here, with `endData` as its `cancelled` event.
 */
export async function cancelJob(
  svc: ServiceContext,
  job: { id: string; type: 'train' | 'generate' },
  endData: Record<string, unknown>,
): Promise<void> {
  await svc.registry.requestCancel(job.id);
  const queue = job.type === 'train' ? svc.trainQueue : svc.generateQueue;
  const q = await queue.getJob(job.id);
  if (!q || (await q.getState()) === 'active') return;
  const removed = await q.remove().then(
    () => true,
    () => false,
  );
  if (removed) await svc.registry.endJob(job.id, job.type, { state: 'cancelled', data: endData });
}
