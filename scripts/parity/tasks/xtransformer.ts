import type * as tf from '@tensorflow/tfjs-core';
import type { Module } from '../../../src/nn/module.js';
import { expected, input, modelSpec } from '../case.js';
import { asShape, compareOutputs, withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

interface Seq2Seq extends Module {
  forward(
    src: tf.Tensor,
    tgt: tf.Tensor,
    opts?: { mask?: tf.Tensor; srcPrependEmbeds?: tf.Tensor },
  ): tf.Tensor;
}

// xtransformer: model(input.src, input.tgt, {mask, srcPrependEmbeds?}) returns the loss; against output.loss
registerTask('xtransformer', (c) =>
  withModel<Seq2Seq, ReturnType<typeof compareOutputs>>(c, (model) => {
    const opts: { mask?: tf.Tensor; srcPrependEmbeds?: tf.Tensor } = {};
    if (c.inputs.mask) opts.mask = c.inputs.mask;
    if (modelSpec(c).prepend || c.inputs.src_prepend_embeds)
      opts.srcPrependEmbeds = input(c, 'src_prepend_embeds');
    const loss = model.forward(input(c, 'src'), input(c, 'tgt'), opts);
    const shaped = asShape(loss, expected(c, 'loss').shape);
    if (shaped !== loss) loss.dispose();
    return compareOutputs(c, { loss: shaped });
  }),
);
