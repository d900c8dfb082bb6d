import * as tf from '@tensorflow/tfjs-core';
import { crossEntropy } from '../../../src/nn/losses.js';
import { AutoregressiveWrapper } from '../../../src/generation/autoregressive-wrapper.js';
import type { TransformerWrapper } from '../../../src/wrappers/transformer-wrapper.js';
import { expected, input } from '../case.js';
import { compareTensors, type Comparison } from '../compare.js';
import { asShape, withModel } from '../helpers.js';
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
    const out: Comparison[] = [];
    try {
      const loss = asShape(value, expected(c, 'loss').shape);
      out.push(compareTensors('output.loss', loss, expected(c, 'loss')));
      if (loss !== value) loss.dispose();
      const gradKeys = new Set(
        Object.keys(c.outputs)
          .filter((k) => k.startsWith('grad.'))
          .map((k) => k.slice('grad.'.length)),
      );
      for (const [pname, v] of named) {
        const g = grads[v.name];
        const key = `output.grad.${pname}`;
        if (gradKeys.has(pname)) {
          const actual = g ?? tf.zerosLike(v);
          out.push(compareTensors(key, actual, c.outputs[`grad.${pname}`]!));
          if (!g) actual.dispose();
          gradKeys.delete(pname);
        } else if (g && tf.tidy(() => tf.max(tf.abs(g)).dataSync()[0]!) > 0) {
          out.push({
            name: key,
            ok: false,
            maxAbsErr: Infinity,
            message: `${key}: a gradient the reference does not have`,
          });
        }
      }
      for (const pname of gradKeys)
        out.push({
          name: `output.grad.${pname}`,
          ok: false,
          maxAbsErr: Infinity,
          message: `output.grad.${pname}: the model has no parameter ${pname}`,
        });
    } finally {
      value.dispose();
      tf.dispose(Object.values(grads));
      tf.dispose([inp, target]);
    }
    return out;
  }),
);
