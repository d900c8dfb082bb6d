import type * as tf from '@tensorflow/tfjs-core';
import type { Module } from '../../../src/nn/module.js';
import { input } from '../case.js';
import { compareOutputs, withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

interface ContinuousModel extends Module {
  forward(x: tf.Tensor, opts?: { mask?: tf.Tensor }): tf.Tensor;
}

// continuous: model(input.x, {mask: input.mask}) against output.out
registerTask('continuous', (c) =>
  withModel<ContinuousModel, ReturnType<typeof compareOutputs>>(c, (model) => {
    const mask = c.inputs.mask;
    return compareOutputs(c, { out: model.forward(input(c, 'x'), mask ? { mask } : {}) });
  }),
);
