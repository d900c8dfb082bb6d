import * as tf from '@tensorflow/tfjs-core';
import type {
  TransformerForwardOptions,
  TransformerWrapper,
} from '../../../src/wrappers/transformer-wrapper.js';
import { input, type ParityCase } from '../case.js';
import { asShape, compareOutputs, withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

/**
 * The forward arguments a case names by its inputs: `input.mask`, `input.embed_ids.<name>`,
 * `input.recycle_steps` ([1]), `input.attn_z_loss_weight` ([1]); the z-loss is asked for when the
 * case expects `output.attn_z_loss`.
 */
export function forwardOptions(c: ParityCase): TransformerForwardOptions {
  const opts: TransformerForwardOptions = {};
  const embedIds: Record<string, tf.Tensor> = {};
  for (const [k, t] of Object.entries(c.inputs))
    if (k.startsWith('embed_ids.')) embedIds[k.slice('embed_ids.'.length)] = t;
  if (Object.keys(embedIds).length) opts.embedIds = embedIds;
  if (c.inputs.mask) opts.mask = c.inputs.mask;
  if (c.inputs.recycle_steps) opts.recycleSteps = c.inputs.recycle_steps.dataSync()[0]!;
  if (c.inputs.attn_z_loss_weight) opts.attnZLossWeight = c.inputs.attn_z_loss_weight.dataSync()[0]!;
  if ('attn_z_loss' in c.outputs) opts.returnAttnZLoss = true;
  return opts;
}

/**
 * wrapper_forward: TransformerWrapper.forwardWithState(input.x, forwardOptions(c)) against
 * output.logits (output.logits.<i> for each output head) and output.attn_z_loss.
 */
registerTask('wrapper_forward', (c) =>
  withModel<TransformerWrapper, ReturnType<typeof compareOutputs>>(c, (model) => {
    const st = model.forwardWithState(input(c, 'x'), forwardOptions(c));
    const actual: Record<string, tf.Tensor> = {};
    if (st.headLogits) st.headLogits.forEach((l, i) => (actual[`logits.${i}`] = l));
    else actual.logits = st.logits;
    if (st.attnZLoss) actual.attn_z_loss = asShape(st.attnZLoss, [1]);
    const compared = compareOutputs(c, actual);
    tf.dispose([st.embeddings, st.logits, ...(st.headLogits ?? []), ...(st.attnZLoss ? [st.attnZLoss] : [])]);
    return compared;
  }),
);
