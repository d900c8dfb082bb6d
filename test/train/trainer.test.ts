import * as tf from '@tensorflow/tfjs-core';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Trainer, type TrainerOptions } from '../../src/train/trainer.js';
import { countingTokens, TinyLm } from './helpers.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'xt-trainer-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

const V = 16;
const data = { train: countingTokens(4000, V), val: countingTokens(600, V, 9) };
const opts: TrainerOptions = {
  totalSteps: 12,
  batchSize: 4,
  seqLen: 8,
  learningRate: 0.05,
  warmupSteps: 2,
  weightDecay: 0.1,
  gradClip: 1,
  gradAccumulation: 2,
  seed: 7,
};

describe('Trainer', () => {
  it('lowers the loss and frees every tensor it creates', () => {
    const model = new TinyLm(V, 8);
    const trainer = new Trainer(model, data, { ...opts, totalSteps: 40, gradAccumulation: 1 });
    const before = tf.memory().numTensors;
    const first = trainer.evaluate();
    const losses: number[] = [];
    for (let i = 0; i < 40; i++) losses.push(trainer.step().loss);
    const after = trainer.evaluate();
    // optimizer moments (2 per parameter) are the only new tensors
    expect(tf.memory().numTensors).toBe(before + 2 * model.parameters().length);
    const n = tf.memory().numTensors;
    trainer.step();
    trainer.evaluate();
    expect(tf.memory().numTensors).toBe(n);
    expect(after.loss).toBeLessThan(first.loss - 0.5);
    expect(after.perplexity).toBeCloseTo(Math.exp(after.loss), 5);
    expect(losses.at(-1)!).toBeLessThan(losses[0]!);
    trainer.dispose();
    model.dispose();
  });

  it('reports learning rate, norm and throughput per step', () => {
    const model = new TinyLm(V, 8);
    const trainer = new Trainer(model, data, { ...opts, totalSteps: 4, warmupSteps: 2 });
    const r = [trainer.step(), trainer.step(), trainer.step(), trainer.step()];
    expect(r.map((x) => x.step)).toEqual([1, 2, 3, 4]);
    expect(r[0]!.learningRate).toBeCloseTo(0.025, 10);
    expect(r[1]!.learningRate).toBeCloseTo(0.05, 10);
    expect(r[3]!.learningRate).toBeCloseTo(0, 10); // cosine ends at minLearningRate
    for (const x of r) {
      expect(x.gradNorm).toBeGreaterThan(0);
      expect(x.tokensPerSecond).toBeGreaterThan(0);
    }
    trainer.dispose();
    model.dispose();
  });

  it('resumes from a checkpoint to exactly the same losses', async () => {
    const full = new TinyLm(V, 8);
    const t1 = new Trainer(full, data, opts);
    const ref: number[] = [];
    for (let i = 0; i < 12; i++) ref.push(t1.step().loss);
    const refWeights = full.parameters().map((p) => Array.from(p.dataSync()));
    t1.dispose();
    full.dispose();

    const a = new TinyLm(V, 8);
    const t2 = new Trainer(a, data, opts);
    const got: number[] = [];
    for (let i = 0; i < 5; i++) got.push(t2.step().loss);
    const dir = path.join(tmp, 'ckpt');
    const info = await t2.saveCheckpoint(dir);
    expect(info.step).toBe(5);
    expect(readdirSync(dir).sort()).toEqual(['model.safetensors', 'optimizer.safetensors', 'trainer.json']);
    // later steps of the first run do not change the saved checkpoint
    t2.step();
    t2.dispose();
    a.dispose();

    const b = new TinyLm(V, 8, 99); // different initial weights: the checkpoint must overwrite them
    const t3 = await Trainer.resume(b, data, opts, dir);
    expect(t3.stepCount).toBe(5);
    while (!t3.done) got.push(t3.step().loss);
    expect(got).toEqual(ref);
    expect(b.parameters().map((p) => Array.from(p.dataSync()))).toEqual(refWeights);
    t3.dispose();
    b.dispose();
  });

  it('saving twice replaces the checkpoint and leaves no temporary files', async () => {
    const m = new TinyLm(V, 8);
    const t = new Trainer(m, data, opts);
    const dir = path.join(tmp, 'twice');
    t.step();
    await t.saveCheckpoint(dir);
    t.step();
    await t.saveCheckpoint(dir);
    expect(readdirSync(tmp).filter((n) => n.startsWith('twice'))).toEqual(['twice']);
    const m2 = new TinyLm(V, 8);
    const r = await Trainer.resume(m2, data, opts, dir);
    expect(r.stepCount).toBe(2);
    r.dispose();
    t.dispose();
    m.dispose();
    m2.dispose();
  });

  it('gradient accumulation over micro-batches equals one large batch', () => {
    const a = new TinyLm(V, 8);
    const b = new TinyLm(V, 8);
    const o = { ...opts, totalSteps: 3, gradClip: 0 };
    const big = new Trainer(a, data, { ...o, batchSize: 4, gradAccumulation: 1 });
    const small = new Trainer(b, data, { ...o, batchSize: 2, gradAccumulation: 2 });
    for (let i = 0; i < 3; i++) {
      const r1 = big.step();
      const r2 = small.step();
      expect(r2.loss).toBeCloseTo(r1.loss, 5);
      expect(r2.gradNorm).toBeCloseTo(r1.gradNorm, 4);
    }
    const wa = a.parameters().flatMap((p) => Array.from(p.dataSync()));
    const wb = b.parameters().flatMap((p) => Array.from(p.dataSync()));
    wa.forEach((v, i) => expect(wb[i]!).toBeCloseTo(v, 4));
    big.dispose();
    small.dispose();
    a.dispose();
    b.dispose();
  });

  it('rejects bad options naming them', () => {
    const m = new TinyLm(V, 8);
    expect(() => new Trainer(m, data, { ...opts, batchSize: 0 })).toThrow(/batchSize/);
    expect(() => new Trainer(m, data, { ...opts, totalSteps: 1.5 })).toThrow(/totalSteps/);
    expect(() => new Trainer(m, data, { ...opts, schedule: 'linear' as never })).toThrow(/schedule/);
    expect(() => new Trainer(m, data, { ...opts, seqLen: 5000 })).toThrow(/data\.train/);
    expect(() => new Trainer(m, { train: [1, 2] as never }, opts)).toThrow(/data\.train/);
    m.dispose();
  });
});
