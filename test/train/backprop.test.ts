import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { describe, expect, it } from 'vitest';
import { variableGradsLean } from '../../src/train/backprop.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { Decoder } from '../../src/layers/attention-layers.js';
import { AutoregressiveWrapper } from '../../src/generation/autoregressive-wrapper.js';
import { manualSeed } from '../../src/utils/random.js';

function bits(t: tf.Tensor): number[] {
  return Array.from(new Uint32Array(new Float32Array(t.dataSync()).buffer));
}

describe('variableGradsLean', () => {
  it('gives the loss and gradients of tf.variableGrads bit for bit, and leaks nothing', () => {
    manualSeed(3);
    const net = new TransformerWrapper({
      numTokens: 24,
      maxSeqLen: 12,
      attnLayers: new Decoder({
        dim: 32,
        depth: 2,
        heads: 2,
        attnDimHead: 16,
        rotaryPosEmb: true,
        ffGlu: true,
      }),
    });
    const model = new AutoregressiveWrapper(net);
    model.train();
    const params = model.namedParameters();
    const vars = params.map(([, v]) => v);
    const x = tf.tensor2d(
      Array.from({ length: 2 * 11 }, (_, i) => (i * 7) % 24),
      [2, 11],
      'int32',
    );
    const f = (): tf.Scalar => model.forward(x);
    const ref = tf.variableGrads(f, vars);
    const before = tf.memory().numTensors;
    const lean = variableGradsLean(f, vars);
    expect(bits(lean.value)).toEqual(bits(ref.value));
    expect(Object.keys(lean.grads).sort()).toEqual(Object.keys(ref.grads).sort());
    for (const [name, g] of Object.entries(ref.grads)) expect(bits(lean.grads[name]!)).toEqual(bits(g));
    const created = 1 + Object.keys(lean.grads).length;
    expect(tf.memory().numTensors - before).toBe(created);
    tf.dispose([ref.value, lean.value, ...Object.values(ref.grads), ...Object.values(lean.grads)]);
    x.dispose();
    model.dispose();
  });

  it('frees the tape when f throws or returns a non-scalar', () => {
    const v = tf.variable(tf.tensor1d([1, 2, 3]));
    const before = tf.memory().numTensors;
    expect(() =>
      variableGradsLean(() => {
        tf.mul(v, 2);
        throw new Error('boom');
      }, [v]),
    ).toThrow('boom');
    expect(() => variableGradsLean(() => tf.mul(v, 2) as unknown as tf.Scalar, [v])).toThrow(
      /expected a scalar loss/,
    );
    expect(tf.memory().numTensors).toBe(before);
    // and works afterwards
    const { value, grads } = variableGradsLean(() => tf.sum(tf.square(v)), [v]);
    expect(Array.from(grads[v.name]!.dataSync())).toEqual([2, 4, 6]);
    tf.dispose([value, ...Object.values(grads), v]);
  });
});
