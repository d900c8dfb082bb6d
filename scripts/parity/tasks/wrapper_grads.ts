import * as tf from '@tensorflow/tfjs-core';
import { crossEntropy } from '../../../src/nn/losses.js';
import { AutoregressiveWrapper } from '../../../src/generation/autoregressive-wrapper.js';
import type { TransformerWrapper } from '../../../src/wrappers/transformer-wrapper.js';
import { input } from '../case.js';
import type { Comparison } from '../compare.js';
import { compareLossAndGrads, withModel } from '../helpers.js';
import { registerTask } from '../registry.js';
import { forwardOptions } from './wrapper_forward.js';

/** Mean negative log-likelihood: logProbs [b, n, v], target [b, n] int32 -> scalar. */
function nll(logProbs: tf.Tensor, target: tf.Tensor): tf.Tensor {
  const v = logProbs.shape[logProbs.rank - 1]!;
  return tf.neg(tf.mean(tf.sum(tf.mul(logProbs, tf.oneHot(target, v)), -1)));
}

/**
 * wrapper_grads: the model on input.x[:, :-1] with the case's forward arguments (eval mode); loss =
 * the mean cross-entropy against input.x[:, 1:] (the negative log-likelihood where the model outputs
 * log-probabilities) summed over output heads, plus the attention z-loss where the case asks for it.
 * The loss against output.loss and every parameter's gradient against output.grad.<name>.
 */
registerTask('wrapper_grads', (c) =>
  withModel<TransformerWrapper, Comparison[]>(c, (model) => {
    const x = input(c, 'x');
    const [b, n1] = x.shape as [number, number];
    const inp = tf.slice(x, [0, 0], [b, n1 - 1]);
    const target = tf.slice(x, [0, 1], [b, n1 - 1]);
    const opts = forwardOptions(c);
    opts.returnAttnZLoss = c.inputs.attn_z_loss_weight !== undefined;
    const named = model.namedParameters().filter(([, v]) => v.trainable);
    // the z-loss cases are the reference AutoregressiveWrapper's add_attn_z_loss: run ours
    const zLoss = opts.returnAttnZLoss && !model.outputIsLogProb && model.options.numOutputHeads === 1;
    const ar = zLoss ? new AutoregressiveWrapper(model, { addAttnZLoss: true }) : null;
    const { value, grads } = tf.variableGrads(
      () =>
        tf.tidy(() => {
          if (ar) {
            const { returnAttnZLoss: _, ...rest } = opts;
            return ar.forward(x, rest);
          }
          const st = model.forwardWithState(inp, opts);
          const heads = st.headLogits ?? [st.logits];
          let loss = tf.addN(
            heads.map((h) => (model.outputIsLogProb ? nll(h, target) : crossEntropy(h, target))),
          );
          if (st.attnZLoss) loss = tf.add(loss, st.attnZLoss);
          return loss as tf.Scalar;
        }),
      named.map(([, v]) => v),
    );
    tf.dispose([inp, target]);
    return compareLossAndGrads(c, value, grads, named);
  }),
);
