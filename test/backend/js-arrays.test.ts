import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { registerTorchBackend } from '../../src/backend/torch/register.js';
import type { TorchBackend } from '../../src/backend/torch/backend.js';
import type { TorchAddon } from '../../src/backend/torch/native.js';
import { ensureGradients } from '../../src/train/gradients.js';
import { Trainer } from '../../src/train/trainer.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { Decoder } from '../../src/layers/attention-layers.js';
import { AutoregressiveWrapper } from '../../src/generation/autoregressive-wrapper.js';
import { manualSeed, Rng } from '../../src/utils/random.js';
import { setFusedKernels } from '../../src/nn/fused.js';

// At a real vocabulary, every value crossing between JavaScript and LibTorch during training and
// generation must be small: a tensor-sized array built in JavaScript (a `ones` in a gradient, a
// zero gradient for an unused output) costs more than the kernels themselves.

const VOCAB = 32000;
const SEQ = 32;
const BATCH = 2;
/** the largest array allowed to cross, in elements: far below one row of logits (VOCAB) */
const BOUND = 4096;

let previous = '';
let addon: TorchAddon;
const crossed: { op: string; size: number }[] = [];
const original: Partial<TorchAddon> = {};

beforeAll(async () => {
  previous = tf.getBackend();
  const r = registerTorchBackend();
  if (!r.ok) throw new Error(r.reason);
  await tf.setBackend('torch');
  await ensureGradients();
  addon = (tf.backend() as TorchBackend).N;
  // every upload (fromData) and download (toData) of tensor data goes through these two
  original.fromData = addon.fromData;
  original.toData = addon.toData;
  addon.fromData = (values, shape, dtype) => {
    crossed.push({ op: 'fromData', size: (values as Float32Array).length });
    return original.fromData!.call(addon, values, shape, dtype);
  };
  addon.toData = (id) => {
    const out = original.toData!.call(addon, id);
    crossed.push({ op: 'toData', size: out.length });
    return out;
  };
});

afterAll(async () => {
  addon.fromData = original.fromData!;
  addon.toData = original.toData!;
  if (previous) await tf.setBackend(previous);
});

function largest(): { op: string; size: number } {
  return crossed.reduce((a, b) => (b.size > a.size ? b : a), { op: 'none', size: 0 });
}

describe('no tensor-sized arrays built in JavaScript (torch backend, vocabulary 32,000)', () => {
  manualSeed(0);
  const net = new TransformerWrapper({
    numTokens: VOCAB,
    maxSeqLen: SEQ,
    attnLayers: new Decoder({ dim: 32, depth: 1, heads: 2, rotaryPosEmb: true, attnFlash: true }),
  });
  const model = new AutoregressiveWrapper(net);
  const rng = new Rng(1);
  const tokens = Int32Array.from({ length: 4000 }, () => rng.int(0, VOCAB));

  it('the instrumentation sees a large upload and a large download', () => {
    crossed.length = 0;
    const big = tf.tensor1d(new Float32Array(BOUND * 4));
    big.dataSync();
    big.dispose();
    expect(crossed.map((c) => c.op)).toEqual(['fromData', 'toData']);
    expect(largest().size).toBe(BOUND * 4);
  });

  const trainSteps = (): void => {
    const trainer = new Trainer(
      model,
      { train: tokens },
      {
        totalSteps: 3,
        batchSize: BATCH,
        seqLen: SEQ,
        learningRate: 1e-3,
        weightDecay: 0.1,
        gradClip: 1,
        seed: 3,
      },
    );
    trainer.step(); // first step: optimizer moments are created
    crossed.length = 0;
    const r1 = trainer.step();
    const r2 = trainer.step();
    expect(Number.isFinite(r1.loss) && Number.isFinite(r2.loss)).toBe(true);
    // the batches themselves are uploaded (BATCH x (SEQ + 1) ids), and the loss is read back
    expect(crossed.length).toBeGreaterThan(0);
    expect(largest().size).toBeLessThanOrEqual(BOUND);
    trainer.dispose();
  };

  it('in training steps (forward, backward, clipping, AdamW)', trainSteps);

  it('in training steps through the ordinary ops (fused kernels off: composite cross-entropy)', () => {
    const prev = setFusedKernels(false);
    try {
      trainSteps();
    } finally {
      setFusedKernels(prev);
    }
  });

  it('in KV-cached generation, greedy and sampled with top-k', async () => {
    model.eval();
    crossed.length = 0;
    const greedy = await model.generate([[1, 2, 3]], 8, { temperature: 0 });
    const sampled = await model.generate([[1, 2, 3]], 8, { filterLogitsFn: 'topK', seed: 1 });
    expect(greedy.shape).toEqual([1, 8]);
    expect(sampled.shape).toEqual([1, 8]);
    tf.dispose([greedy, sampled]);
    expect(largest().size).toBeLessThanOrEqual(BOUND);
  });
});
