import * as tf from '@tensorflow/tfjs-core';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { AutoregressiveWrapper } from '../../src/generation/autoregressive-wrapper.js';
import { createTokenizer } from '../../src/io/tokenizer.js';
import { Decoder } from '../../src/layers/attention-layers.js';
import { splitTokens, tokenizeText } from '../../src/train/data.js';
import { Trainer, type TrainerOptions } from '../../src/train/trainer.js';
import { manualSeed } from '../../src/utils/random.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';

const tmp = mkdtempSync(path.join(tmpdir(), 'xt-trainer-ar-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

function model(seed: number): AutoregressiveWrapper {
  manualSeed(seed);
  const net = new TransformerWrapper({
    numTokens: 256,
    maxSeqLen: 16,
    attnLayers: new Decoder({
      dim: 16,
      depth: 1,
      heads: 2,
      attnDimHead: 8,
      rotaryPosEmb: true,
      attnDropout: 0.1,
      ffDropout: 0.1,
    }),
  });
  return new AutoregressiveWrapper(net);
}

const text = 'the cat sat on the mat. the dog sat on the log. '.repeat(20);
const data = splitTokens(tokenizeText(text, createTokenizer('byte')), 0.1);
const opts: TrainerOptions = {
  totalSteps: 6,
  batchSize: 2,
  seqLen: 12,
  learningRate: 3e-3,
  warmupSteps: 2,
  seed: 5,
};

describe('Trainer on a transformer language model', () => {
  it('trains with dropout, frees tensors, and resumes to the same losses', async () => {
    const ref = model(1);
    const t1 = new Trainer(ref, data, opts);
    t1.step();
    const before = tf.memory().numTensors;
    const losses = [t1.step().loss];
    expect(tf.memory().numTensors).toBe(before);
    for (let i = 2; i < 6; i++) losses.push(t1.step().loss);
    const ev = t1.evaluate();
    expect(tf.memory().numTensors).toBe(before);
    expect(Number.isFinite(ev.perplexity)).toBe(true);
    t1.dispose();
    ref.dispose();

    const a = model(1);
    const t2 = new Trainer(a, data, opts);
    const got = [t2.step().loss, t2.step().loss, t2.step().loss];
    await t2.saveCheckpoint(path.join(tmp, 'c'));
    t2.dispose();
    a.dispose();
    const b = model(2);
    const t3 = await Trainer.resume(b, data, opts, path.join(tmp, 'c'));
    while (!t3.done) got.push(t3.step().loss);
    expect(got.slice(1)).toEqual(losses);
    t3.dispose();
    b.dispose();
  });
});
