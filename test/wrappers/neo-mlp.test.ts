import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { NeoMLP } from '../../src/wrappers/neo-mlp.js';
import { fromConfig, toConfig } from '../../src/io/config.js';

const base = { dimIn: 3, dimHidden: 4, dimOut: 2, dimModel: 8, depth: 1 };

describe('NeoMLP', () => {
  it('names and shapes its parameters as the reference, with the Fourier projection frozen', () => {
    const m = new NeoMLP(base);
    const s = Object.fromEntries(m.namedParameters().map(([n, v]) => [n, [v.shape, v.trainable]]));
    expect(s['input_embed']).toEqual([[3, 8], true]);
    expect(s['hidden_embed']).toEqual([[4, 8], true]);
    expect(s['output_embed']).toEqual([[2, 8], true]);
    expect(s['random_fourier.0.proj.weight']).toEqual([[8, 1], false]);
    expect(s['random_fourier.0.proj.bias']).toEqual([[8], false]);
    expect(s['random_fourier.1.weight']).toEqual([[8, 8], true]);
    expect(s['to_output_weights']).toEqual([[2, 8], true]);
    expect(s['to_output_bias']).toEqual([[2], true]);
    // the default encoder: 4 heads of 16
    expect(s['transformer.layers.0.1.to_q.weight']).toEqual([[64, 8], true]);
    m.dispose();
  });

  it('maps [b, dimIn] to [b, dimOut] and [dimIn] to [dimOut], leaking nothing', () => {
    const m = new NeoMLP(base).eval();
    const before = tf.memory().numTensors;
    const x = tf.tensor2d([
      [0.1, -0.2, 0.3],
      [1, 2, 3],
    ]);
    const y = m.forward(x);
    expect(y.shape).toEqual([2, 2]);
    const row = tf.tensor1d([1, 2, 3]);
    const y1 = m.forward(row);
    expect(y1.shape).toEqual([2]);
    // rows are independent: the unbatched row equals the second row of the batch
    const second = y.dataSync().slice(2);
    y1.dataSync().forEach((v, i) => expect(v).toBeCloseTo(second[i]!, 5));
    tf.dispose([x, y, row, y1]);
    expect(tf.memory().numTensors).toBe(before);
    m.dispose();
  });

  it('rejects bad options and inputs, naming them', () => {
    expect(() => new NeoMLP({ ...base, dimHidden: 0 })).toThrow(
      'dimHidden: expected a positive integer, got 0',
    );
    expect(() => new NeoMLP({ ...base, encoderKwargs: { dim: 4 } as never })).toThrow(
      /^encoderKwargs\.dim: expected none \(NeoMLP sets it: dimModel, depth; an Encoder is not causal\), got 4$/,
    );
    expect(() => new NeoMLP({ ...base, encoderKwargs: { heads: 0 } })).toThrow(
      /^encoderKwargs\.heads: expected a positive integer/,
    );
    expect(() => new NeoMLP({ ...base, width: 3 } as never)).toThrow(
      'width: expected an option of NeoMLP, got an unknown option',
    );
    const m = new NeoMLP(base);
    const x = tf.zeros([2, 4]);
    expect(() => m.forward(x)).toThrow('x: expected 3 features (dimIn) in the last dimension, got [2, 4]');
    const ids = tf.zeros([2, 3], 'int32');
    expect(() => m.forward(ids)).toThrow('x: expected dtype float32, got int32');
    tf.dispose([x, ids]);
    m.dispose();
  });

  it('builds from JSON with the reference snake_case keys and gives its config back', () => {
    const m = fromConfig({
      wrapper: 'NeoMLP',
      dim_in: 3,
      dim_hidden: 4,
      dim_out: 2,
      dim_model: 8,
      depth: 2,
      encoder_kwargs: { heads: 2, attn_dim_head: 4, ff_glu: true },
    }) as NeoMLP;
    expect(m).toBeInstanceOf(NeoMLP);
    expect(toConfig(m)).toEqual({
      wrapper: 'NeoMLP',
      dimIn: 3,
      dimHidden: 4,
      dimOut: 2,
      dimModel: 8,
      depth: 2,
      encoderKwargs: { heads: 2, attnDimHead: 4, ffGlu: true },
    });
    m.dispose();
    expect(() => fromConfig({ ...toConfig(m), encoderKwargs: { attn_dim_head: -1 } })).toThrow(
      'encoderKwargs.attnDimHead: expected a positive integer, got -1',
    );
    expect(() => fromConfig({ wrapper: 'NeoMLP', dimIn: 3, dimHidden: 4, dimOut: 2, dimModel: 8 })).toThrow(
      'depth: expected a positive integer, got undefined',
    );
  });
});
