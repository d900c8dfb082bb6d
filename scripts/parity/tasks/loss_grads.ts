import * as tf from '@tensorflow/tfjs-core';
import { AutoregressiveWrapper } from '../../../src/generation/autoregressive-wrapper.js';
import type { TransformerWrapper } from '../../../src/wrappers/transformer-wrapper.js';
import { input } from '../case.js';
import type { Comparison } from '../compare.js';
import { compareLossAndGrads, withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

/**
 * loss_grads: AutoregressiveWrapper(model) on input.x ([b, n+1]) in eval mode; the loss against
 * output.loss and the gradient of every parameter against output.grad.<name>.
 */
registerTask('loss_grads', (c) =>
  withModel<TransformerWrapper, Comparison[]>(c, (model) => {
    const ar = new AutoregressiveWrapper(model);
    ar.eval();
    const named = model.namedParameters().filter(([, v]) => v.trainable);
    const x = input(c, 'x');
    const { value, grads } = tf.variableGrads(
      () => ar.forward(x),
      named.map(([, v]) => v),
    );
    return compareLossAndGrads(c, value, grads, named);
  }),
);
