import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { registerTorchBackend } from '../../src/backend/torch/register.js';
import { FALLBACK_USED, NATIVE_KERNELS } from '../../src/backend/torch/kernels.js';
import { listCases, runCase } from '../../scripts/parity/run.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { Decoder } from '../../src/layers/attention-layers.js';
import { AutoregressiveWrapper } from '../../src/generation/autoregressive-wrapper.js';
import { AdamW } from '../../src/train/optimizer.js';
import { PARITY_CASES } from '../../scripts/parity/paths.js';

// Every kernel that a parity run, a training step and generation dispatch on the torch backend
// must be native (none may go through the cpu fallback).

const dispatched = new Set<string>();
let previous = '';
type RunKernel = (
  name: string,
  inputs: tf.NamedTensorMap,
  attrs?: tf.NamedAttrMap,
) => tf.Tensor | tf.Tensor[];
let original: RunKernel | null = null;

beforeAll(async () => {
  previous = tf.getBackend();
  const r = registerTorchBackend();
  if (!r.ok) throw new Error(r.reason);
  await tf.setBackend('torch');
  const engine = tf.engine() as unknown as { runKernel: RunKernel };
  original = engine.runKernel.bind(engine);
  engine.runKernel = (name, inputs, attrs) => {
    dispatched.add(name);
    return original!(name, inputs, attrs);
  };
  FALLBACK_USED.clear();
});

afterAll(async () => {
  if (original) (tf.engine() as unknown as { runKernel: RunKernel }).runKernel = original;
  if (previous) await tf.setBackend(previous);
});

describe('torch backend kernel coverage', () => {
  it('runs the visible parity cases natively', async () => {
    const files = listCases(PARITY_CASES);
    expect(files.length).toBeGreaterThan(0);
    const failed: string[] = [];
    for (const f of files) {
      const r = await runCase(f);
      if (!r.ok) failed.push(f);
    }
    expect(failed).toEqual([]);
    expect(dispatched.has('XtAttention')).toBe(true);
  });

  it('runs a training step and sampled generation natively', async () => {
    const net = new TransformerWrapper({
      numTokens: 32,
      maxSeqLen: 16,
      attnLayers: new Decoder({
        dim: 16,
        depth: 2,
        heads: 2,
        attnDimHead: 8,
        rotaryPosEmb: true,
        attnFlash: true,
      }),
    });
    const model = new AutoregressiveWrapper(net);
    const params = model.namedParameters();
    const opt = new AdamW(params, { learningRate: 1e-3 });
    const names = new Map(params.map(([n, v]) => [v.name, n]));
    const x = tf.tensor2d(
      Array.from({ length: 2 * 17 }, (_, k) => (k * 7) % 32),
      [2, 17],
      'int32',
    );
    model.train();
    const { value, grads } = tf.variableGrads(
      () => model.forward(x) as tf.Scalar,
      params.map(([, v]) => v),
    );
    expect(Number.isFinite(value.dataSync()[0])).toBe(true);
    const named: Record<string, tf.Tensor> = {};
    for (const [k, g] of Object.entries(grads)) named[names.get(k) ?? k] = g;
    opt.apply(named);
    tf.dispose([value, x, ...Object.values(grads)]);
    model.eval();
    for (const cacheKv of [true, false]) {
      const out = await model.generate([[1, 2, 3]], 5, { temperature: 1, cacheKv, seed: 3 });
      expect(out.shape).toEqual([1, 5]);
      out.dispose();
    }
    opt.dispose();
    model.dispose();
  });

  it('dispatched only native kernels', () => {
    const notNative = [...dispatched].filter((k) => !NATIVE_KERNELS.has(k)).sort();
    expect([...FALLBACK_USED].sort()).toEqual([]);
    expect(notNative).toEqual([]);
    expect(dispatched.size).toBeGreaterThan(20);
  });
});
