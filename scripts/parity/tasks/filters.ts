import type * as tf from '@tensorflow/tfjs-core';
import { contrastiveDecode, minP, topA, topK, topP } from '../../../src/generation/filters.js';
import { input } from '../case.js';
import { compareOutputs } from '../helpers.js';
import { registerTask } from '../registry.js';

/**
 * filters: no model; the sampling filters on input.logits [3, V] (top-k default and k 5, top-p 0.9
 * and 0.5, top-a defaults, min-p 0.1) and contrastive decoding against input.amateur_logits.
 */
registerTask('filters', (c) => {
  const logits = input(c, 'logits');
  const amateur = input(c, 'amateur_logits');
  const actual: Record<string, tf.Tensor> = {};
  try {
    actual.top_k_default = topK(logits);
    actual.top_k_k5 = topK(logits, { k: 5 });
    actual['top_p_0.9'] = topP(logits, { thres: 0.9 });
    actual['top_p_0.5'] = topP(logits, { thres: 0.5 });
    actual.top_a = topA(logits);
    actual['min_p_0.1'] = minP(logits, { minP: 0.1 });
    actual.contrastive = contrastiveDecode(logits, amateur, { alpha: 0.1, beta: 0.5 });
  } catch (e) {
    for (const t of Object.values(actual)) t.dispose();
    throw e;
  }
  return Promise.resolve(compareOutputs(c, actual));
});
