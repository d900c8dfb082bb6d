import * as tf from '@tensorflow/tfjs-core';
import { AutoregressiveWrapper } from '../../../src/generation/autoregressive-wrapper.js';
import type { TransformerWrapper } from '../../../src/wrappers/transformer-wrapper.js';
import { expected, input } from '../case.js';
import { compareTensors, type Comparison } from '../compare.js';
import { asShape, withModel } from '../helpers.js';
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
    const out: Comparison[] = [];
    try {
      const loss = asShape(value, expected(c, 'loss').shape);
      out.push(compareTensors('output.loss', loss, expected(c, 'loss')));
      if (loss !== value) loss.dispose();
      const byName = new Map(named.map(([n, v]) => [n, v]));
      const gradKeys = Object.keys(c.outputs).filter((k) => k.startsWith('grad.'));
      for (const key of gradKeys) {
        const pname = key.slice('grad.'.length);
        const v = byName.get(pname);
        if (!v) {
          out.push({
            name: `output.${key}`,
            ok: false,
            maxAbsErr: Infinity,
            message: `output.${key}: the model has no parameter ${pname}`,
          });
          continue;
        }
        const g = grads[v.name];
        if (g) out.push(compareTensors(`output.${key}`, g, c.outputs[key]!));
        else {
          const zero = tf.zerosLike(v);
          out.push(compareTensors(`output.${key} (no gradient reached it)`, zero, c.outputs[key]!));
          zero.dispose();
        }
      }
      const expectedNames = new Set(gradKeys.map((k) => k.slice('grad.'.length)));
      for (const [n] of named) {
        const g = grads[byName.get(n)!.name];
        if (!expectedNames.has(n) && g && tf.max(tf.abs(g)).dataSync()[0]! > 0) {
          out.push({
            name: `output.grad.${n}`,
            ok: false,
            maxAbsErr: Infinity,
            message: `parameter ${n} has a gradient but the reference lists none`,
          });
        }
      }
    } finally {
      value.dispose();
      tf.dispose(Object.values(grads));
    }
    return out;
  }),
);
