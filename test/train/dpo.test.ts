import { describe, expect, it } from 'vitest';
import * as tf from '@tensorflow/tfjs-core';
import { DPO } from '../../src/train/dpo.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { Decoder } from '../../src/layers/attention-layers.js';
import { manualSeed } from '../../src/utils/random.js';

const net = (): TransformerWrapper =>
  new TransformerWrapper({
    numTokens: 12,
    maxSeqLen: 8,
    tieEmbedding: true,
    attnLayers: new Decoder({ dim: 8, depth: 1, heads: 2, attnDimHead: 4 }),
  });

function batch(): { w: tf.Tensor; l: tf.Tensor; prompt: tf.Tensor } {
  return {
    w: tf.tensor2d(
      [
        [1, 2, 3, 4, 5, 6],
        [2, 3, 4, 5, 6, 7],
      ],
      [2, 6],
      'int32',
    ),
    l: tf.tensor2d(
      [
        [1, 2, 9, 9, 9, 9],
        [2, 3, 0, 8, 1, 1],
      ],
      [2, 6],
      'int32',
    ),
    prompt: tf.tensor2d(
      [
        [true, true, false, false, false, false],
        [true, true, false, false, false, false],
      ],
      [2, 6],
      'bool',
    ),
  };
}

describe('DPO', () => {
  it('freezes a copy of the policy: the loss starts at log 2 and training moves only the policy', () => {
    manualSeed(3);
    const dpo = new DPO(net(), { beta: 1 });
    const names = dpo.namedParameters().map(([n]) => n);
    expect(names).toContain('policy_model.token_emb.emb.weight');
    expect(names).toContain('ref_model.token_emb.emb.weight');
    expect(dpo.policyModel.parameters().every((v) => v.trainable)).toBe(true);
    expect(dpo.refModel.parameters().every((v) => !v.trainable)).toBe(true);
    const { w, l, prompt } = batch();
    const loss0 = dpo.forward(w, l, { promptMask: prompt });
    // the policy equals the reference: every margin difference is 0, -log sigmoid(0) = log 2
    expect(loss0.dataSync()[0]).toBeCloseTo(Math.log(2), 6);
    const refBefore = dpo.refModel.stateDict()['token_emb.emb.weight']!.arraySync();
    const vars = dpo.policyParameters();
    const before = tf.memory().numTensors;
    let last = 0;
    for (let i = 0; i < 5; i++) {
      // plain gradient descent on the policy
      const { value, grads } = tf.variableGrads(() => dpo.forward(w, l, { promptMask: prompt }), vars);
      last = value.dataSync()[0]!;
      for (const v of vars) tf.tidy(() => v.assign(tf.sub(v, tf.mul(grads[v.name]!, 0.5))));
      tf.dispose([value, ...Object.values(grads)]);
    }
    expect(last).toBeLessThan(Math.log(2));
    expect(dpo.refModel.stateDict()['token_emb.emb.weight']!.arraySync()).toEqual(refBefore);
    expect(tf.memory().numTensors).toBe(before);
    tf.dispose([w, l, prompt, loss0]);
    dpo.dispose();
  });

  it('rejects bad options and inputs, naming them', () => {
    const m = net();
    expect(() => new DPO(m, { beta: Number.NaN })).toThrow('beta: expected a finite number, got NaN');
    expect(() => new DPO(m, { padId: 1.5 })).toThrow('padId: expected an integer or null, got 1.5');
    expect(() => new DPO(m, { gamma: 1 } as never)).toThrow(
      'gamma: expected an option of DPO, got an unknown option',
    );
    expect(() => new DPO(m, {}, m)).toThrow(
      'refModel: expected a TransformerWrapper other than the policy model',
    );
    const dpo = new DPO(m);
    const { w, l, prompt } = batch();
    const short = tf.zeros([2, 5], 'int32');
    expect(() => dpo.forward(w, short, { promptMask: prompt })).toThrow(
      'unpreferredSeq: expected shape [2, 6], got [2, 5]',
    );
    expect(() => dpo.forward(w, l, {} as never)).toThrow(
      /^promptMask: expected a \[batch, seq\] bool tensor/,
    );
    expect(() => dpo.forward(w, l, { promptMask: w })).toThrow('promptMask: expected dtype bool, got int32');
    tf.dispose([w, l, prompt, short]);
    dpo.dispose();
  });
});
