import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { TransformerWrapper } from '../../src/wrappers/transformer-wrapper.js';
import { AutoregressiveWrapper } from '../../src/generation/autoregressive-wrapper.js';
import { buildModel, compare, readCase, VISIBLE } from '../layers/parity-helpers.js';

// The attention-related reference cases (logits, logits_masked, loss_grads tasks).
const CASES = [
  'alibi_pos_bias',
  'attn_flash',
  'attn_gate_values',
  'attn_hard',
  'attn_head_scale',
  'attn_kv_heads',
  'attn_num_mem_kv',
  'attn_on_attn',
  'attn_one_kv_head',
  'attn_qk_norm_dim_scale',
  'attn_qk_norm_groups',
  'attn_qk_norm_scale',
  'attn_sparse_topk',
  'attn_sparse_topk_straight_through_grads',
  'dynamic_pos_bias',
  'dynamic_pos_bias_log_distance',
  'rel_pos_bias',
  'rotary_pos_emb',
  'rotary_xpos',
  'talking_heads',
  'residual_attn_post_norm',
];

describe('attention options match the reference', () => {
  for (const name of CASES) {
    it(name, () => {
      const c = readCase(path.join(VISIBLE, `${name}.safetensors`));
      const model = buildModel(c) as TransformerWrapper;
      const t = c.tensors;
      const errs: string[] = [];
      const check = (label: string, actual: tf.Tensor, expected: tf.Tensor): void => {
        const r = compare(actual, expected);
        if (!r.ok) errs.push(`${label}: max err ${r.maxErr} (shapes ${actual.shape} vs ${expected.shape})`);
      };
      const before = tf.memory().numTensors;
      if (c.task === 'logits' || c.task === 'logits_masked') {
        const out = model.forward(t['input.x']!, { mask: t['input.mask'] });
        check('logits', out, t['output.logits']!);
        out.dispose();
      } else if (c.task === 'loss_grads') {
        const ar = new AutoregressiveWrapper(model);
        const { value, grads } = tf.variableGrads(() => ar.forward(t['input.x']!) as tf.Scalar);
        const loss = tf.reshape(value, t['output.loss']!.shape);
        check('loss', loss, t['output.loss']!);
        loss.dispose();
        const named = new Map(model.namedParameters());
        for (const [k, exp] of Object.entries(t)) {
          if (!k.startsWith('output.grad.')) continue;
          const v = named.get(k.slice('output.grad.'.length));
          const g = v ? grads[v.name] : undefined;
          if (!g) errs.push(`${k}: no gradient`);
          else check(k, g, exp);
        }
        value.dispose();
        tf.dispose(Object.values(grads));
      } else throw new Error(`unexpected task ${c.task}`);
      expect(tf.memory().numTensors).toBe(before);
      model.dispose();
      tf.dispose(Object.values(t));
      expect(errs).toEqual([]);
    });
  }
});
