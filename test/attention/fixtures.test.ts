import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-core/dist/register_all_gradients.js';
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { Attention } from '../../src/attention/attention.js';
import { AlibiPositionalBias } from '../../src/attention/alibi.js';
import { DynamicPositionBias } from '../../src/attention/dynamic-position-bias.js';
import { RelativePositionBias } from '../../src/attention/relative-position-bias.js';
import { RotaryEmbedding } from '../../src/attention/rotary.js';
import type { AttentionForwardOptions, AttentionOptions, PositionBias } from '../../src/attention/types.js';
import { loadSafetensors } from '../../src/io/safetensors.js';
import type { Module } from '../../src/nn/module.js';

// Module-level reference fixtures written by fixtures/generate.py from the reference Attention.
const DIR = path.join(path.dirname(fileURLToPath(import.meta.url)), 'fixtures');

interface Spec {
  dim: number;
  kwargs: Record<string, unknown>;
  relpos?: { type: 't5' | 'dynamic' | 'alibi'; kwargs: Record<string, number | boolean> };
  rotary?: Record<string, number | boolean>;
}

function camel(o: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(
    Object.entries(o).map(([k, v]) => [k.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase()), v]),
  );
}

function prefixed(t: Record<string, tf.Tensor>, prefix: string): Record<string, tf.Tensor> {
  const out: Record<string, tf.Tensor> = {};
  for (const [k, v] of Object.entries(t)) if (k.startsWith(prefix)) out[k.slice(prefix.length)] = v;
  return out;
}

function makeRelPos(spec: NonNullable<Spec['relpos']>): Module & PositionBias {
  const kw = camel(spec.kwargs) as Record<string, number & boolean>;
  if (spec.type === 't5') return new RelativePositionBias(kw['scale'], kw);
  if (spec.type === 'dynamic') return new DynamicPositionBias(kw['dim'], kw);
  return new AlibiPositionalBias(kw['heads'], { totalHeads: kw['totalHeads'] });
}

/** Errors where |a - b| > 1e-4 + 1e-3 |b| (the parity tolerance). */
function mismatch(label: string, actual: tf.Tensor | undefined, expected: tf.Tensor): string | null {
  if (!actual) return `${label}: missing`;
  if (actual.shape.join() !== expected.shape.join())
    return `${label}: shape [${actual.shape.join(', ')}] vs [${expected.shape.join(', ')}]`;
  const a = actual.dataSync();
  const e = expected.dataSync();
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i]! - e[i]!);
    if (!(d <= 1e-4 + 1e-3 * Math.abs(e[i]!))) worst = Math.max(worst, Number.isNaN(d) ? Infinity : d);
  }
  return worst > 0 ? `${label}: max err ${worst}` : null;
}

const files = readdirSync(DIR)
  .filter((f) => f.endsWith('.safetensors'))
  .sort();

describe('Attention matches reference module fixtures', () => {
  it('has fixtures', () => expect(files.length).toBeGreaterThan(20));
  for (const file of files) {
    it(path.basename(file, '.safetensors'), () => {
      const { metadata, tensors: t } = loadSafetensors(
        new Uint8Array(readFileSync(path.join(DIR, file))),
        file,
      );
      const meta = JSON.parse(metadata['case']!) as { spec: Spec; cache: boolean; grads: boolean };
      const spec = meta.spec;
      const kwargs = camel(spec.kwargs);
      if (kwargs['dataDependentAlibiKwargs'])
        kwargs['dataDependentAlibiKwargs'] = camel(
          kwargs['dataDependentAlibiKwargs'] as Record<string, unknown>,
        );
      const attn = new Attention(spec.dim, kwargs as Partial<AttentionOptions>);
      attn.loadStateDict(prefixed(t, 'param.'));
      attn.eval();
      const relPos = spec.relpos ? makeRelPos(spec.relpos) : null;
      relPos?.loadStateDict(prefixed(t, 'relpos.'));
      const rotary = spec.rotary
        ? new RotaryEmbedding(spec.rotary['dim'] as number, camel(spec.rotary))
        : null;
      rotary?.loadStateDict(prefixed(t, 'rotary.'));

      const x = t['input.x']!;
      const n = x.shape[1]!;
      const memLen = t['input.mem']?.shape[1] ?? 0;
      const rotFor = (len: number, offset = 0): AttentionForwardOptions =>
        rotary ? { rotary: rotary.forward(tf.sub(tf.range(0, len, 1, 'int32'), offset)) } : {};
      const call: AttentionForwardOptions = {
        mask: t['input.mask'],
        context: t['input.context'],
        contextMask: t['input.context_mask'],
        mem: t['input.mem'],
        memMask: t['input.mem_mask'],
        attnMask: t['input.attn_mask'],
        prevAttn: t['input.prev_attn'],
        valueResidual: t['input.value_residual'],
        pos: t['input.pos'],
        relPos: relPos ?? undefined,
      };
      const errs: (string | null)[] = [];
      const before = tf.memory().numTensors;
      tf.tidy(() => {
        const r = attn.forward(x, { ...call, ...rotFor(n + memLen, memLen), returnIntermediates: true });
        errs.push(mismatch('out', r.out, t['output.out']!));
        if (t['output.pre_softmax_attn']) {
          errs.push(
            mismatch('pre_softmax_attn', r.intermediates.preSoftmaxAttn, t['output.pre_softmax_attn']),
          );
          errs.push(
            mismatch('post_softmax_attn', r.intermediates.postSoftmaxAttn, t['output.post_softmax_attn']!),
          );
        }
        errs.push(mismatch('cached_k', r.intermediates.cachedKv?.k, t['output.cached_k']!));
        errs.push(mismatch('cached_v', r.intermediates.cachedKv?.v, t['output.cached_v']!));

        if (meta.grads) {
          const w = t['input.grad_weight']!;
          const params = attn.namedParameters();
          const { grads } = tf.variableGrads(
            () =>
              tf.sum(tf.mul(attn.forward(x, { ...call, ...rotFor(n + memLen, memLen) }).out, w)) as tf.Scalar,
            params.map(([, v]) => v),
          );
          for (const [name, v] of params) {
            const exp = t[`output.grad.${name}`];
            if (exp) errs.push(mismatch(`grad.${name}`, grads[v.name], exp));
          }
          const gx = tf.grad((xx: tf.Tensor) =>
            tf.sum(tf.mul(attn.forward(xx, { ...call, ...rotFor(n + memLen, memLen) }).out, w)),
          )(x);
          errs.push(mismatch('grad_x', gx, t['output.grad_x']!));
        }

        if (meta.cache) {
          const b = x.shape[0]!;
          const d = x.shape[2]!;
          const prefix = attn.forward(tf.slice(x, [0, 0, 0], [b, n - 1, d]), {
            ...call,
            ...rotFor(n - 1),
            returnIntermediates: true,
          });
          const step = attn.forward(tf.slice(x, [0, n - 1, 0], [b, 1, d]), {
            ...call,
            ...rotFor(n),
            cache: prefix.intermediates.cachedKv!,
            returnIntermediates: true,
          });
          errs.push(mismatch('step_out', step.out, t['output.step_out']!));
          errs.push(mismatch('step_cached_k', step.intermediates.cachedKv?.k, t['output.step_cached_k']!));
          errs.push(mismatch('step_cached_v', step.intermediates.cachedKv?.v, t['output.step_cached_v']!));
        }
      });
      expect(tf.memory().numTensors).toBe(before);
      attn.dispose();
      relPos?.dispose();
      rotary?.dispose();
      tf.dispose(Object.values(t));
      expect(errs.filter((e) => e !== null)).toEqual([]);
    });
  }
});
