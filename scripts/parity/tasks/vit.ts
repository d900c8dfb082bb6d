import type * as tf from '@tensorflow/tfjs-core';
import type { Module } from '../../../src/nn/module.js';
import { input } from '../case.js';
import { compareOutputs, withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

interface ImageModel extends Module {
  forward(img: tf.Tensor, opts?: { returnEmbeddings?: boolean }): tf.Tensor;
}

// vit: model(input.img) against output.logits, model(input.img, {returnEmbeddings}) against output.embeddings
registerTask('vit', (c) =>
  withModel<ImageModel, ReturnType<typeof compareOutputs>>(c, (model) => {
    const img = input(c, 'img');
    const logits = model.forward(img);
    const embeddings = model.forward(img, { returnEmbeddings: true });
    return compareOutputs(c, { logits, embeddings });
  }),
);
