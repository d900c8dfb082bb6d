import type * as tf from '@tensorflow/tfjs-core';
import type { Module } from '../../../src/nn/module.js';
import { input } from '../case.js';
import { compareOutputs, withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

interface TokenModel extends Module {
  forward(x: tf.Tensor, opts?: { mask?: tf.Tensor }): tf.Tensor;
}

// logits_masked: model(input.x, {mask: input.mask}) against output.logits
registerTask('logits_masked', (c) =>
  withModel<TokenModel, ReturnType<typeof compareOutputs>>(c, (model) =>
    compareOutputs(c, { logits: model.forward(input(c, 'x'), { mask: input(c, 'mask') }) }),
  ),
);
