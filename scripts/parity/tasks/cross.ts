import type * as tf from '@tensorflow/tfjs-core';
import type { Module } from '../../../src/nn/module.js';
import { input } from '../case.js';
import { compareOutputs, withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

interface LayersLike extends Module {
  forward(
    x: tf.Tensor,
    opts?: { context?: tf.Tensor; contextMask?: tf.Tensor },
  ): { out: tf.Tensor; hiddens?: tf.Tensor[]; cache?: { dispose(): void } };
}

// cross: bare attention layers, model(input.x, {context, contextMask}) against output.out
registerTask('cross', (c) =>
  withModel<LayersLike, ReturnType<typeof compareOutputs>>(c, (model) => {
    const contextMask = c.inputs.context_mask;
    const res = model.forward(input(c, 'x'), {
      context: input(c, 'context'),
      ...(contextMask ? { contextMask } : {}),
    });
    for (const h of res.hiddens ?? []) if (h !== res.out) h.dispose();
    res.cache?.dispose();
    return compareOutputs(c, { out: res.out });
  }),
);
