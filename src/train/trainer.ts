/**
 * The training loop: random-window batches, AdamW with decoupled weight decay, gradient
 * accumulation, clipping by global norm, warmup + cosine/constant schedule, evaluation, and
 * checkpoints that resume to exactly the same losses as an uninterrupted run.
 */
import * as tf from '@tensorflow/tfjs-core';
import { variableGradsLean } from './backprop.js';
import { checkPrecision, withPrecision, type Precision } from '../backend/precision.js';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Module } from '../nn/module.js';
import { loadSafetensors, saveSafetensors } from '../io/safetensors.js';
import { manualSeed } from '../utils/random.js';
import { resolveCheckpointDir, sha256, writeDirAtomic } from './checkpoint.js';
import { ensureGradients } from './gradients.js';
import { sequentialBatches, WindowSampler } from './data.js';
import { AdamW, clipByGlobalNorm, defaultDecayFilter } from './optimizer.js';
import { checkScheduleOptions, learningRateAt, type ScheduleName } from './schedule.js';

await ensureGradients();

/** A module whose `forward(batch)` returns a scalar loss; batch: [b, n + 1] int32 token ids. */
export type LossModel = Module & { forward(x: tf.Tensor): tf.Tensor };

export interface TrainerOptions {
  totalSteps: number;
  batchSize: number;
  /** tokens per training window (each batch row holds seqLen + 1 ids) */
  seqLen: number;
  learningRate: number;
  warmupSteps?: number;
  schedule?: ScheduleName;
  minLearningRate?: number;
  weightDecay?: number;
  beta1?: number;
  beta2?: number;
  eps?: number;
  /** clip the global gradient norm to this (0 or undefined: no clipping) */
  gradClip?: number;
  /** micro-batches per optimizer step */
  gradAccumulation?: number;
  /** run `evaluate()` every this many steps inside `run()` (0: never) */
  evalEvery?: number;
  /** validation batches per evaluation */
  evalBatches?: number;
  seed?: number;
  /**
   * `bf16`: forward and backward passes run their matrix products and attention in bfloat16
   * (torch backend); parameters, optimizer state and the loss stay float32. Default `fp32`.
   */
  precision?: Precision;
}

export const trainerDefaults = {
  warmupSteps: 0,
  schedule: 'cosine' as ScheduleName,
  minLearningRate: 0,
  weightDecay: 0.01,
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  gradClip: 1.0,
  gradAccumulation: 1,
  evalEvery: 0,
  evalBatches: 8,
  seed: 0,
  precision: 'fp32' as Precision,
};

type ResolvedOptions = Required<TrainerOptions>;

export interface StepResult {
  /** 1-based number of optimizer steps done after this one */
  step: number;
  loss: number;
  learningRate: number;
  tokensPerSecond: number;
  /** global gradient norm before clipping */
  gradNorm: number;
}

export interface EvalResult {
  loss: number;
  perplexity: number;
}

export interface CheckpointInfo {
  dir: string;
  step: number;
  files: string[];
  bytes: number;
}

export interface RunCallbacks {
  onStep?: (r: StepResult) => void;
  onEval?: (r: EvalResult & { step: number }) => void;
  signal?: AbortSignal;
}

interface TrainerState {
  format: 'x-transformers-ts/trainer';
  version: 1;
  step: number;
  options: ResolvedOptions;
  sampler: { seed: number; drawn: number };
  optimizerStep: number;
  hashes: Record<string, string>;
}

function resolveOptions(o: TrainerOptions): ResolvedOptions {
  if (typeof o !== 'object' || o === null) throw new Error(`options: expected an object, got ${String(o)}`);
  const defined = Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined));
  const merged = { ...trainerDefaults, ...defined } as ResolvedOptions;
  const posInt = (k: keyof ResolvedOptions): void => {
    const v = merged[k];
    if (!Number.isInteger(v) || (v as number) < 1)
      throw new Error(`${k}: expected a positive integer, got ${String(v)}`);
  };
  posInt('totalSteps');
  posInt('batchSize');
  posInt('seqLen');
  posInt('gradAccumulation');
  posInt('evalBatches');
  if (!Number.isInteger(merged.evalEvery) || merged.evalEvery < 0) {
    throw new Error(`evalEvery: expected a non-negative integer, got ${merged.evalEvery}`);
  }
  if (!(merged.gradClip >= 0))
    throw new Error(`gradClip: expected a non-negative number, got ${merged.gradClip}`);
  if (!Number.isFinite(merged.seed)) throw new Error(`seed: expected a finite number, got ${merged.seed}`);
  merged.precision = checkPrecision(merged.precision);
  checkScheduleOptions(merged);
  return merged;
}

/**
 * Trains `model` on `data.train` (a token stream); `data.val` feeds `evaluate()`.
 * Each optimizer step draws `gradAccumulation` batches of [batchSize, seqLen + 1] windows.
 */
export class Trainer {
  readonly options: ResolvedOptions;
  private readonly sampler: WindowSampler;
  private readonly optimizer: AdamW;
  private readonly params: [string, tf.Variable][];
  private steps = 0;
  private disposed = false;

  constructor(
    readonly model: LossModel,
    readonly data: { train: Int32Array; val?: Int32Array },
    options: TrainerOptions,
  ) {
    this.options = resolveOptions(options);
    if (!data || !(data.train instanceof Int32Array)) {
      throw new Error(`data.train: expected an Int32Array of token ids, got ${typeof data?.train}`);
    }
    if (data.val !== undefined && !(data.val instanceof Int32Array)) {
      throw new Error(`data.val: expected an Int32Array of token ids, got ${typeof data.val}`);
    }
    const o = this.options;
    this.sampler = new WindowSampler(data.train, o.batchSize, o.seqLen, o.seed, 'data.train');
    this.params = model.namedParameters().filter(([, v]) => v.trainable);
    this.optimizer = new AdamW(this.params, {
      learningRate: o.learningRate,
      beta1: o.beta1,
      beta2: o.beta2,
      eps: o.eps,
      weightDecay: o.weightDecay,
      decayFilter: defaultDecayFilter,
    });
  }

  /** Optimizer steps taken so far. */
  get stepCount(): number {
    return this.steps;
  }

  /** Whether `totalSteps` steps are done. */
  get done(): boolean {
    return this.steps >= this.options.totalSteps;
  }

  /** The learning rate the next step will use. */
  get learningRate(): number {
    return learningRateAt(this.steps, this.options);
  }

  private checkLive(): void {
    if (this.disposed) throw new Error('Trainer: used after dispose()');
  }

  /** One optimizer step (with accumulation); every intermediate tensor is freed. */
  step(): StepResult {
    this.checkLive();
    const o = this.options;
    const t0 = performance.now();
    const lr = learningRateAt(this.steps, o);
    // dropout and other random choices inside the model draw from a per-step seed, so a resumed
    // run repeats them exactly
    manualSeed((o.seed * 1_000_003 + this.steps + 1) >>> 0);
    this.model.train();
    const vars = this.params.map(([, v]) => v);
    const names = new Map(this.params.map(([n, v]) => [v.name, n]));
    let acc: Record<string, tf.Tensor> = {};
    let lossSum = 0;
    for (let micro = 0; micro < o.gradAccumulation; micro++) {
      const batch = this.sampler.next();
      let value: tf.Scalar;
      let grads: tf.NamedTensorMap;
      try {
        ({ value, grads } = withPrecision(o.precision, () =>
          variableGradsLean(() => {
            const loss = this.model.forward(batch);
            if (loss.rank !== 0)
              throw new Error(`model.forward: expected a scalar loss, got shape [${loss.shape}]`);
            return loss as tf.Scalar;
          }, vars),
        ));
      } finally {
        batch.dispose();
      }
      lossSum += value.dataSync()[0]!;
      value.dispose();
      for (const [vname, g] of Object.entries(grads)) {
        const key = names.get(vname) ?? vname;
        const prev = acc[key];
        if (prev) {
          acc[key] = tf.add(prev, g);
          prev.dispose();
          g.dispose();
        } else acc[key] = g;
      }
    }
    if (o.gradAccumulation > 1) {
      const scaled: Record<string, tf.Tensor> = {};
      for (const [k, g] of Object.entries(acc)) {
        scaled[k] = tf.div(g, o.gradAccumulation);
        g.dispose();
      }
      acc = scaled;
    }
    let gradNorm: number;
    if (o.gradClip > 0) ({ norm: gradNorm, grads: acc } = clipByGlobalNorm(acc, o.gradClip));
    else ({ norm: gradNorm } = clipByGlobalNorm(acc, Infinity));
    try {
      this.optimizer.apply(acc, lr);
    } finally {
      for (const g of Object.values(acc)) g.dispose();
    }
    this.steps++;
    const seconds = (performance.now() - t0) / 1000;
    const tokens = o.batchSize * o.seqLen * o.gradAccumulation;
    return {
      step: this.steps,
      loss: lossSum / o.gradAccumulation,
      learningRate: lr,
      tokensPerSecond: seconds > 0 ? tokens / seconds : 0,
      gradNorm,
    };
  }

  /**
   * Mean loss over up to `evalBatches` consecutive validation windows (data.val, else data.train),
   * in eval mode; perplexity = exp(loss).
   */
  evaluate(): EvalResult {
    this.checkLive();
    const o = this.options;
    const tokens = this.data.val && this.data.val.length > o.seqLen ? this.data.val : this.data.train;
    const wasTraining = this.model.training;
    this.model.eval();
    let total = 0;
    let rows = 0;
    try {
      for (const batch of sequentialBatches(tokens, o.batchSize, o.seqLen, o.evalBatches)) {
        try {
          const l = withPrecision(o.precision, () => tf.tidy(() => this.model.forward(batch)));
          total += l.dataSync()[0]! * batch.shape[0];
          l.dispose();
          rows += batch.shape[0];
        } finally {
          batch.dispose();
        }
      }
    } finally {
      this.model.train(wasTraining);
    }
    if (!rows)
      throw new Error(
        `data.val: expected at least seqLen + 1 = ${o.seqLen + 1} tokens, got ${tokens.length}`,
      );
    const loss = total / rows;
    return { loss, perplexity: Math.exp(loss) };
  }

  /**
   * Steps until `totalSteps` (or the signal aborts), yielding to the event loop between steps,
   * calling `onStep` after each and `onEval` every `evalEvery` steps. Returns the last result.
   */
  async run(callbacks: RunCallbacks = {}): Promise<StepResult | undefined> {
    let last: StepResult | undefined;
    while (!this.done && !callbacks.signal?.aborted) {
      last = this.step();
      callbacks.onStep?.(last);
      const every = this.options.evalEvery;
      if (every > 0 && (this.steps % every === 0 || this.done)) {
        callbacks.onEval?.({ step: this.steps, ...this.evaluate() });
      }
      await new Promise<void>((r) => setImmediate(r));
    }
    return last;
  }

  /**
   * Writes model.safetensors, optimizer.safetensors and trainer.json into `dir`, atomically (a
   * failure leaves the previous checkpoint intact).
   */
  async saveCheckpoint(dir: string): Promise<CheckpointInfo> {
    this.checkLive();
    const model = saveSafetensors(this.model.stateDict(), { format: 'pt' });
    const optim = saveSafetensors(this.optimizer.stateTensors(), { format: 'pt' });
    const state: TrainerState = {
      format: 'x-transformers-ts/trainer',
      version: 1,
      step: this.steps,
      options: this.options,
      sampler: this.sampler.state(),
      optimizerStep: this.optimizer.stepCount,
      hashes: { 'model.safetensors': sha256(model), 'optimizer.safetensors': sha256(optim) },
    };
    const json = JSON.stringify(state, null, 2);
    await writeDirAtomic(dir, {
      'model.safetensors': model,
      'optimizer.safetensors': optim,
      'trainer.json': json,
    });
    return {
      dir: path.resolve(dir),
      step: this.steps,
      files: ['model.safetensors', 'optimizer.safetensors', 'trainer.json'],
      bytes: model.byteLength + optim.byteLength + Buffer.byteLength(json),
    };
  }

  /**
   * A trainer continuing from the checkpoint in `dir`: loads the model weights (strictly), the
   * optimizer moments, the step count and the data position. `options` must keep batchSize, seqLen,
   * gradAccumulation and seed of the saved run (other options, e.g. totalSteps, may change).
   */
  static async resume(
    model: LossModel,
    data: { train: Int32Array; val?: Int32Array },
    options: TrainerOptions,
    dir: string,
  ): Promise<Trainer> {
    const where = await resolveCheckpointDir(dir);
    const read = (n: string): Promise<Buffer> => fs.readFile(path.join(where, n));
    const state = JSON.parse((await read('trainer.json')).toString('utf8')) as TrainerState;
    if (state.format !== 'x-transformers-ts/trainer' || state.version !== 1) {
      throw new Error(
        `dir: ${where}/trainer.json is not a trainer checkpoint (format ${String(state.format)})`,
      );
    }
    const trainer = new Trainer(model, data, options);
    for (const k of ['batchSize', 'seqLen', 'gradAccumulation', 'seed'] as const) {
      if (trainer.options[k] !== state.options[k]) {
        trainer.dispose();
        throw new Error(
          `options.${k}: expected ${state.options[k]} as in the checkpoint, got ${trainer.options[k]}`,
        );
      }
    }
    const files: Record<string, Buffer> = {};
    for (const n of ['model.safetensors', 'optimizer.safetensors']) {
      files[n] = await read(n);
      if (sha256(files[n]) !== state.hashes[n]) {
        trainer.dispose();
        throw new Error(
          `dir: ${where}/${n} does not match the checksum in trainer.json (corrupt checkpoint)`,
        );
      }
    }
    const weights = loadSafetensors(files['model.safetensors']!, 'model.safetensors').tensors;
    const moments = loadSafetensors(files['optimizer.safetensors']!, 'optimizer.safetensors').tensors;
    try {
      model.loadStateDict(weights);
      trainer.optimizer.loadStateTensors(moments, state.optimizerStep);
      trainer.sampler.restore(state.sampler);
      trainer.steps = state.step;
    } catch (e) {
      trainer.dispose();
      throw e;
    } finally {
      for (const t of [...Object.values(weights), ...Object.values(moments)]) t.dispose();
    }
    return trainer;
  }

  /** Frees the optimizer state (the model stays its owner's). */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.optimizer.dispose();
  }
}
