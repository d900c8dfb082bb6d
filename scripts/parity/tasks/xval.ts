import type * as tf from '@tensorflow/tfjs-core';
import type { Module } from '../../../src/nn/module.js';
import { input } from '../case.js';
import { compareOutputs, withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

interface XValModel extends Module {
  forward(ids: tf.Tensor, nums: tf.Tensor): { logits: tf.Tensor; numerical: tf.Tensor };
}

// xval: model(input.ids, input.nums) against output.logits and output.nums
registerTask('xval', (c) =>
  withModel<XValModel, ReturnType<typeof compareOutputs>>(c, (model) => {
    const { logits, numerical } = model.forward(input(c, 'ids'), input(c, 'nums'));
    return compareOutputs(c, { logits, nums: numerical });
  }),
);
