import * as tf from '@tensorflow/tfjs-core';
import type {
  MultiInputForwardOptions,
  MultiInputTransformerWrapper,
} from '../../../src/wrappers/multi-input.js';
import { crossEntropy } from '../../../src/nn/losses.js';
import type { ParityCase } from '../case.js';
import type { Comparison } from '../compare.js';
import { asShape, compareLossAndGrads, compareOutputs, withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

/** The case's inputs named `<prefix><input name>`, by input name. */
function idsOf(c: ParityCase, prefix: string): Record<string, tf.Tensor> {
  const out: Record<string, tf.Tensor> = {};
  for (const [k, t] of Object.entries(c.inputs)) if (k.startsWith(prefix)) out[k.slice(prefix.length)] = t;
  if (!Object.keys(out).length) throw new Error(`case ${c.name}: no input.${prefix}*`);
  return out;
}

/** returnAttnZLoss with the case's weight, where it gives input.attn_z_loss_weight. */
function zLossOptions(c: ParityCase): MultiInputForwardOptions {
  const w = c.inputs.attn_z_loss_weight;
  return w ? { returnAttnZLoss: true, attnZLossWeight: w.dataSync()[0]! } : {};
}

/** Logits by input name as outputs `<prefix><name>`. */
function named(prefix: string, logits: Record<string, tf.Tensor>): Record<string, tf.Tensor> {
  return Object.fromEntries(Object.entries(logits).map(([k, t]) => [`${prefix}${k}`, t]));
}

/**
 * multi_input: forwardWithState(input.x.*, {mask, sumEmbeds, prependEmbeds, prependMask, posOverride,
 * returnAttnZLoss}) against output.logits.<name>, output.embeddings and output.attn_z_loss.
 */
registerTask('multi_input', (c) =>
  withModel<MultiInputTransformerWrapper, Comparison[]>(c, (model) => {
    const i = c.inputs;
    const opts: MultiInputForwardOptions = {
      mask: i.mask,
      sumEmbeds: i.sum_embeds,
      prependEmbeds: i.prepend_embeds,
      prependMask: i.prepend_mask,
      posOverride: i.pos,
      ...zLossOptions(c),
    };
    const st = model.forwardWithState(idsOf(c, 'x.'), opts);
    const z = st.attnZLoss ? asShape(st.attnZLoss, [1]) : null;
    if (z && z !== st.attnZLoss) st.attnZLoss!.dispose();
    return compareOutputs(c, {
      ...named('logits.', st.logits),
      embeddings: st.embeddings,
      ...(z ? { attn_z_loss: z } : {}),
    });
  }),
);

/** multi_input_xl: input.x.* with returnMems, then input.seg1.* with those mems (output.logits0.* / logits1.*). */
registerTask('multi_input_xl', (c) =>
  withModel<MultiInputTransformerWrapper, Comparison[]>(c, (model) => {
    const s0 = model.forwardWithState(idsOf(c, 'x.'), { returnMems: true });
    const logits1 = model.forward(idsOf(c, 'seg1.'), { mems: s0.mems });
    tf.dispose([s0.embeddings, ...(s0.mems ?? [])]);
    return compareOutputs(c, { ...named('logits0.', s0.logits), ...named('logits1.', logits1) });
  }),
);

/**
 * multi_input_grads: loss = the sum over inputs of the mean cross-entropy of the logits of
 * input.x.<name>[:, :-1] against input.x.<name>[:, 1:] (plus the attention z-loss where the case
 * gives its weight); the loss and every gradient.
 */
registerTask('multi_input_grads', (c) =>
  withModel<MultiInputTransformerWrapper, Comparison[]>(c, (model) => {
    const x = idsOf(c, 'x.');
    const [b, n1] = Object.values(x)[0]!.shape as [number, number];
    const inp = Object.fromEntries(Object.entries(x).map(([k, t]) => [k, tf.slice(t, [0, 0], [b, n1 - 1])]));
    const tgt = Object.fromEntries(Object.entries(x).map(([k, t]) => [k, tf.slice(t, [0, 1], [b, n1 - 1])]));
    const params = model.namedParameters().filter(([, v]) => v.trainable);
    const { value, grads } = tf.variableGrads(
      () =>
        tf.tidy(() => {
          const st = model.forwardWithState(inp, zLossOptions(c));
          const ce = Object.keys(x).map((k) => crossEntropy(st.logits[k]!, tgt[k]!));
          return tf.addN(st.attnZLoss ? [...ce, st.attnZLoss] : ce) as tf.Scalar;
        }),
      params.map(([, v]) => v),
    );
    tf.dispose([...Object.values(inp), ...Object.values(tgt)]);
    return compareLossAndGrads(c, value, grads, params);
  }),
);
