import * as tf from '@tensorflow/tfjs-core';
import type { Module } from '../../../src/nn/module.js';
import { expected, input } from '../case.js';
import { compareTensors, type Comparison } from '../compare.js';
import { withModel } from '../helpers.js';
import { registerTask } from '../registry.js';

interface XlModel extends Module {
  forwardWithState(
    x: tf.Tensor,
    opts: { mems?: tf.Tensor[]; returnMems?: boolean },
  ): { logits: tf.Tensor; embeddings: tf.Tensor; mems?: tf.Tensor[] };
}

/**
 * xl: model(seg_i, {mems, returnMems: true}) for seg0, seg1, seg2 in order, each step's mems fed to
 * the next; logits of each step against output.logits0..2.
 */
registerTask('xl', (c) =>
  withModel<XlModel, Comparison[]>(c, (model) => {
    const out: Comparison[] = [];
    let mems: tf.Tensor[] | undefined;
    try {
      for (let i = 0; `seg${i}` in c.inputs; i++) {
        const res = model.forwardWithState(input(c, `seg${i}`), { mems, returnMems: true });
        res.embeddings.dispose();
        if (mems) tf.dispose(mems);
        mems = res.mems;
        try {
          out.push(compareTensors(`output.logits${i}`, res.logits, expected(c, `logits${i}`)));
        } finally {
          res.logits.dispose();
        }
      }
    } finally {
      if (mems) tf.dispose(mems);
    }
    if (!out.length) throw new Error(`case ${c.name}: no input.seg0`);
    return out;
  }),
);
