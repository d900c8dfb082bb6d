import { WaitingError, UnrecoverableError, type Job } from 'bullmq';
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import type { CheckpointRecord, TokenizerName } from '../models/schemas.js';
import { splitTokens } from '../src/index.js';
import { autoregressive, buildModel, loadWeights, Trainer } from './engine.js';
import { JobRun, yieldToLoop, type WorkerContext } from './context.js';
import type { TrainJobData } from './queues.js';

/** Result of a finished training job. */
export interface TrainResult {
  steps: number;
  firstLoss: number | null;
  finalLoss: number | null;
  checkpointId: string | null;
  resumedFromStep: number | null;
  [k: string]: unknown;
}

/**
 * The training and validation parts of a dataset's tokens: the library's split (10% for validation)
 * when evaluation is asked and both parts hold a window, else every token for training.
 */
function trainValParts(
  all: Int32Array,
  wantVal: boolean,
  seqLen: number,
): { train: Int32Array; val?: Int32Array } {
  if (!wantVal) return { train: all };
  const { train, val } = splitTokens(all, 0.1);
  if (val.length < seqLen + 2 || train.length < seqLen + 2) return { train: all };
  return { train, val };
}

/**
 * The dataset's tokens under the model's tokenizer: read from the token file, or tokenized first on
 * a worker thread with `tokenizing` events ({progress: 0..1, tokens}, at most two a second); then a
 * `tokens` event {tokenizer, tokens, cached, tokenizeMs, loadMs}.
 */
async function datasetTokens(
  ctx: WorkerContext,
  d: TrainJobData,
  tokenizer: TokenizerName,
): Promise<Int32Array> {
  let lastSent = 0;
  const pending: Promise<unknown>[] = [];
  const got = await ctx.tokens.tokens(d.datasetId, tokenizer, (p) => {
    const now = Date.now();
    if (now - lastSent < 500 && p.progress < 1) return;
    lastSent = now;
    pending.push(ctx.registry.appendEvent(d.jobId, 'tokenizing', p));
  });
  await Promise.all(pending);
  const info = {
    tokenizer,
    tokens: got.tokens.length,
    cached: got.cached,
    tokenizeMs: Math.round(got.tokenizeMs),
    loadMs: Math.round(got.loadMs),
  };
  ctx.log.info({ jobId: d.jobId, datasetId: d.datasetId, ...info }, 'dataset tokens ready');
  await ctx.registry.appendEvent(d.jobId, 'tokens', info);
  return got.tokens;
}

/**
 * Runs one training job: builds the model from its definition and current weights, resumes from the
 * job's own last checkpoint when there is one (a worker died, or shut down mid-job), then steps,
 * streaming `progress` events and checkpointing every `checkpointEvery` steps and at the end.
 * Cancellation is checked before every step; on shutdown the job is checkpointed and handed back.
 */
export async function processTrain(
  ctx: WorkerContext,
  job: Job<TrainJobData>,
  token: string | undefined,
  bullSignal?: AbortSignal,
): Promise<TrainResult | { cancelled: true }> {
  const d = job.data;
  const { registry, storage, log } = ctx;
  const run = new JobRun(ctx, 'train', d.jobId, bullSignal);
  let trainer: Trainer | null = null;
  let disposeModel: (() => void) | null = null;
  const finishCancelled = (step: number) => run.cancelled({ step, steps: d.steps });
  try {
    if (await run.cancelRequested()) return await finishCancelled(0);
    const model = await registry.getModel(d.modelId);
    if (!model) throw new UnrecoverableError(`model ${d.modelId} no longer exists`);
    const dataset = await registry.getDataset(d.datasetId);
    if (!dataset) throw new UnrecoverableError(`dataset ${d.datasetId} no longer exists`);
    await run.begin();

    const built = buildModel(model.config);
    disposeModel = () => built.model.dispose();
    loadWeights(built.model, await storage.read(model.weightsFile), model.weightsFile);
    built.model.train();
    const ar = autoregressive(built.model);
    const data = trainValParts(
      await datasetTokens(ctx, d, model.tokenizer),
      (d.evalEvery ?? 0) > 0,
      d.seqLen,
    );
    if (data.train.length < d.seqLen + 2) {
      throw new UnrecoverableError(
        `dataset ${d.datasetId}: ${data.train.length} tokens is too few for seqLen ${d.seqLen} (needs at least ${d.seqLen + 2})`,
      );
    }
    const options = {
      totalSteps: d.steps,
      batchSize: d.batchSize,
      seqLen: d.seqLen,
      learningRate: d.learningRate,
      warmupSteps: d.warmupSteps,
      weightDecay: d.weightDecay,
      gradClip: d.gradClip,
      gradAccumulation: d.gradAccumulation,
      evalEvery: d.evalEvery,
      seed: d.seed,
      precision: d.precision,
    };
    const last = await registry.latestCheckpoint(d.modelId, d.jobId);
    let resumedFromStep: number | null = null;
    if (last) {
      trainer = await Trainer.resume(ar, data, options, storage.abs(last.dir));
      resumedFromStep = trainer.stepCount;
      await registry.appendEvent(d.jobId, 'resumed', {
        step: trainer.stepCount,
        steps: d.steps,
        checkpointId: last.id,
      });
      log.info({ jobId: d.jobId, step: trainer.stepCount }, 'training resumed from checkpoint');
    } else {
      trainer = new Trainer(ar, data, options);
    }
    const prev = await registry.getJob(d.jobId);
    let firstLoss = typeof prev?.progress.firstLoss === 'number' ? prev.progress.firstLoss : null;
    let lastLoss: number | null = typeof prev?.progress.loss === 'number' ? prev.progress.loss : null;
    let lastCkpt: CheckpointRecord | null = last;
    const every = d.checkpointEvery ?? 0;

    const checkpoint = async (): Promise<CheckpointRecord> => {
      const step = trainer!.stepCount;
      const dir = storage.checkpointDir(d.modelId, d.jobId, step);
      try {
        await trainer!.saveCheckpoint(storage.abs(dir));
      } catch (e) {
        const kept = lastCkpt ? `the checkpoint of step ${lastCkpt.step} is kept` : 'no earlier checkpoint';
        throw new UnrecoverableError(
          `checkpoint of step ${step} could not be written (${(e as Error).message}); ${kept}`,
        );
      }
      const rec: CheckpointRecord = {
        id: randomUUID(),
        modelId: d.modelId,
        jobId: d.jobId,
        step,
        loss: lastLoss,
        createdAt: new Date().toISOString(),
        dir,
      };
      await registry.addCheckpoint(rec);
      await registry.setModelWeights(d.modelId, path.join(dir, 'model.safetensors'));
      await registry.appendEvent(d.jobId, 'checkpoint', { step, checkpointId: rec.id, loss: lastLoss });
      lastCkpt = rec;
      return rec;
    };

    while (trainer.stepCount < d.steps) {
      if (await run.cancelRequested()) return await finishCancelled(trainer.stepCount);
      if (ctx.draining) {
        if (!lastCkpt || lastCkpt.step !== trainer.stepCount) await checkpoint();
        log.info(
          { jobId: d.jobId, step: trainer.stepCount },
          'shutting down: job checkpointed and handed back',
        );
        await registry.updateJob(d.jobId, { state: 'waiting' });
        await job.moveToWait(token);
        throw new WaitingError();
      }
      await ctx.priority.beforeTrainStep(run.signal);
      if (run.signal.aborted) continue; // cancelled while waiting: handled at the top of the loop
      const r = await trainer.step();
      lastLoss = r.loss;
      if (firstLoss === null) firstLoss = r.loss;
      ctx.metrics?.trainSteps.inc();
      const progress = {
        step: r.step,
        steps: d.steps,
        loss: r.loss,
        learningRate: r.learningRate,
        tokensPerSecond: r.tokensPerSecond,
      };
      await registry.appendEvent(d.jobId, 'progress', progress);
      await registry.updateJob(d.jobId, { progress: { ...progress, firstLoss } });
      await job.updateProgress(progress).catch(() => undefined);
      if (d.evalEvery && r.step % d.evalEvery === 0) {
        const ev = await trainer.evaluate();
        await registry.appendEvent(d.jobId, 'eval', {
          step: r.step,
          loss: ev.loss,
          perplexity: ev.perplexity,
        });
      }
      if (every > 0 && r.step % every === 0 && r.step < d.steps) await checkpoint();
      await yieldToLoop();
    }
    const final = lastCkpt && lastCkpt.step === trainer.stepCount ? lastCkpt : await checkpoint();
    const result: TrainResult = {
      steps: trainer.stepCount,
      firstLoss,
      finalLoss: lastLoss,
      checkpointId: final.id,
      resumedFromStep,
    };
    return await run.completed(result);
  } catch (e) {
    if (e instanceof WaitingError) throw e;
    throw await run.failed('training', e);
  } finally {
    run.close();
    trainer?.dispose();
    disposeModel?.();
  }
}
