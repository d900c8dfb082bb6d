import * as tf from '@tensorflow/tfjs-core';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { AttentionLayers } from '../../src/layers/attention-layers.js';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { AutoregressiveWrapper } from '../../src/generation/autoregressive-wrapper.js';
import { FIXTURES, buildModel, compare, listCases, readCase } from './parity-helpers.js';

const only = process.env.XT_CASE;
const TASKS = ['logits', 'logits_masked', 'logits_cond', 'cross', 'loss_grads', 'xl'];
const files = [...listCases(TASKS), ...listCases(TASKS, FIXTURES)].filter(
  (f) => !only || path.basename(f, '.safetensors') === only,
);

describe('layers parity with the reference (visible cases)', () => {
  for (const file of files) {
    it(`${path.basename(path.dirname(file))}/${path.basename(file, '.safetensors')}`, () => {
      const c = readCase(file);
      const model = buildModel(c);
      const before = tf.memory().numTensors;
      const t = c.tensors;
      const errs: string[] = [];
      const check = (name: string, actual: tf.Tensor, expected: tf.Tensor) => {
        const r = compare(actual, expected);
        if (!r.ok) errs.push(`${name}: max err ${r.maxErr} (shapes ${actual.shape} vs ${expected.shape})`);
      };
      if (c.task === 'logits' || c.task === 'logits_masked') {
        const out = (model as TransformerWrapper).forward(t['input.x']!, { mask: t['input.mask'] });
        check('logits', out, t['output.logits']!);
        out.dispose();
      } else if (c.task === 'logits_cond') {
        const out = (model as TransformerWrapper).forward(t['input.x']!, { condition: t['input.condition'] });
        check('logits', out, t['output.logits']!);
        out.dispose();
      } else if (c.task === 'cross') {
        const r = (model as AttentionLayers).forward(t['input.x']!, {
          context: t['input.context'],
          contextMask: t['input.context_mask'],
        });
        check('out', r.out, t['output.out']!);
        r.out.dispose();
      } else if (c.task === 'xl') {
        let mems: tf.Tensor[] | undefined;
        for (let i = 0; i < 3; i++) {
          const st = (model as TransformerWrapper).forwardWithState(t[`input.seg${i}`]!, {
            mems,
            returnMems: true,
          });
          check(`logits${i}`, st.logits, t[`output.logits${i}`]!);
          tf.dispose([st.logits, st.embeddings, ...(mems ?? [])]);
          mems = st.mems;
        }
        tf.dispose(mems ?? []);
      } else if (c.task === 'loss_grads') {
        const ar = new AutoregressiveWrapper(model as TransformerWrapper);
        const { value, grads } = tf.variableGrads(() => ar.forward(t['input.x']!) as tf.Scalar);
        const flatLoss = tf.reshape(value, t['output.loss']!.shape);
        check('loss', flatLoss, t['output.loss']!);
        flatLoss.dispose();
        const named = new Map((model as TransformerWrapper).namedParameters());
        for (const [k, exp] of Object.entries(t)) {
          if (!k.startsWith('output.grad.')) continue;
          const v = named.get(k.slice('output.grad.'.length));
          if (!v) {
            errs.push(`${k}: no such parameter`);
            continue;
          }
          const g = grads[v.name];
          if (!g) errs.push(`${k}: no gradient`);
          else check(k, g, exp);
        }
        value.dispose();
        tf.dispose(Object.values(grads));
      }
      expect(tf.memory().numTensors).toBe(before);
      model.dispose();
      tf.dispose(Object.values(t));
      expect(errs).toEqual([]);
    });
  }
});
