import * as tf from '@tensorflow/tfjs-core';
import { DPO } from '../../../src/train/dpo.js';
import type { TransformerWrapper } from '../../../src/wrappers/transformer-wrapper.js';
import { input, modelSpec, specToConfig } from '../case.js';
import { compareLossAndGrads } from '../helpers.js';
import { registerTask } from '../registry.js';

/**
 * dpo: DPO(model of the spec, {beta: input.beta, padId: input.pad_id}) with every param.* (policy_model.*
 * and ref_model.*) loaded strictly, in eval mode; forward(input.preferred, input.unpreferred,
 * {promptMask, preferredSeqMask, unpreferredSeqMask}) against output.loss, and every gradient of the
 * policy against output.grad.<name>.
 */
registerTask('dpo', async (c) => {
  const { fromConfig } = await import('../../../src/io/config.js');
  const net = fromConfig(specToConfig(modelSpec(c))) as TransformerWrapper;
  const padId = c.inputs.pad_id ? c.inputs.pad_id.dataSync()[0]! : null;
  const dpo = new DPO(net, { beta: input(c, 'beta').dataSync()[0]!, padId });
  try {
    dpo.loadStateDict(c.params, { strict: true });
    dpo.eval();
    const named = dpo.namedParameters().filter(([, v]) => v.trainable);
    const { value, grads } = tf.variableGrads(
      () =>
        dpo.forward(input(c, 'preferred'), input(c, 'unpreferred'), {
          promptMask: input(c, 'prompt_mask'),
          preferredSeqMask: c.inputs.preferred_mask,
          unpreferredSeqMask: c.inputs.unpreferred_mask,
        }),
      named.map(([, v]) => v),
    );
    return compareLossAndGrads(c, value, grads, named);
  } finally {
    dpo.dispose();
  }
});
