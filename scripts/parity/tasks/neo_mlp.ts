import * as tf from '@tensorflow/tfjs-core';
import type { NeoMLP } from '../../../src/wrappers/neo-mlp.js';
import { input } from '../case.js';
import type { Comparison } from '../compare.js';
import { compareLossAndGrads, compareOutputs, withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

/**
 * neo_mlp: NeoMLP.forwardWithEmbeds(input.x) against output.output and output.{input,hidden,output}_embed,
 * and NeoMLP.forward(input.x1) (one unbatched row) against output.output1.
 */
registerTask('neo_mlp', (c) =>
  withModel<NeoMLP, Comparison[]>(c, (model) => {
    const r = model.forwardWithEmbeds(input(c, 'x'));
    return compareOutputs(c, {
      output: r.output,
      output1: model.forward(input(c, 'x1')),
      input_embed: r.inputEmbed,
      hidden_embed: r.hiddenEmbed,
      output_embed: r.outputEmbed,
    });
  }),
);

/**
 * neo_mlp_grads: loss = the mean squared error of NeoMLP.forward(input.x) against input.target;
 * the loss against output.loss and every trainable parameter's gradient against output.grad.<name>.
 */
registerTask('neo_mlp_grads', (c) =>
  withModel<NeoMLP, Comparison[]>(c, (model) => {
    const named = model.namedParameters().filter(([, v]) => v.trainable);
    const { value, grads } = tf.variableGrads(
      () =>
        tf.tidy(() =>
          tf.mean(tf.squaredDifference(model.forward(input(c, 'x')), input(c, 'target'))),
        ) as tf.Scalar,
      named.map(([, v]) => v),
    );
    return compareLossAndGrads(c, value, grads, named);
  }),
);
